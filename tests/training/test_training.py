"""Training learns, records every epoch, keeps the best one, and a run reloads bit for bit.

Also the zoo's BN models and their no-BN twins. Torch runs on one thread here:
the models are tiny, and one thread is faster and robust to a busy machine.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training.data import Dataset, load_dataset
from training.train import (
    DatasetSpec,
    RunError,
    TrainConfig,
    TrainResult,
    evaluate,
    load_run,
    save_run,
    seed_everything,
    train,
)
from training.zoo import NetworkConfig, build_model, count_batchnorms

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_on(
    dataset: str, cfg: TrainConfig, model: str = "mlp", **model_kw: Any
) -> tuple[Dataset, NetworkConfig, TrainResult]:
    ds = load_dataset(dataset, seed=0)
    mcfg = NetworkConfig(model, ds.input_shape, ds.num_classes, **model_kw)
    return ds, mcfg, train(mcfg, ds, cfg, progress=False)


def initial_model(mcfg: NetworkConfig, ds: Dataset, seed: int) -> torch.nn.Sequential:
    """The network ``train`` starts from: same seed, same standardization."""
    seed_everything(seed)
    return build_model(mcfg, *ds.standardization())


# --- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "dataset", "cfg", "bar"),
    [
        ("cnn", "digits", TrainConfig(epochs=10), 0.98),
        ("mlp", "breast_cancer", TrainConfig(epochs=30, batch_size=32, lr=1e-3), 0.95),
        ("mlp", "wine", TrainConfig(epochs=50, batch_size=16, lr=3e-3), 0.95),
    ],
)
def test_training_learns_the_bundled_datasets(model, dataset, cfg, bar):
    ds, _, result = train_on(dataset, cfg, model)
    majority = np.bincount(ds.y_test).max() / len(ds.y_test)
    assert majority < bar  # the bar is far above guessing the most frequent class
    assert result.metrics["test_accuracy"] >= bar, result.metrics
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert not result.metrics["diverged"]


def test_history_has_every_epoch_and_the_best_one_is_kept():
    cfg = TrainConfig(optimizer="sgd", lr=0.5, schedule="constant", epochs=8, batch_size=16)
    ds, _, result = train_on("wine", cfg, width=16)  # a noisy run: its last epoch is not its best
    m, history = result.metrics, result.history
    assert m["epochs"] == len(history) == cfg.epochs
    assert [h["epoch"] for h in history] == list(range(1, cfg.epochs + 1))
    assert all(math.isfinite(v) for h in history for v in h.values())
    seconds = [h["seconds"] for h in history]
    assert seconds == sorted(seconds) and seconds[-1] <= m["seconds"]
    val = [h["val_accuracy"] for h in history]
    assert m["val_accuracy"] == max(val)
    assert m["best_epoch"] == val.index(max(val)) + 1 < cfg.epochs
    assert not result.model.training
    # the returned model is the best epoch's checkpoint, not the last epoch's weights
    assert evaluate(result.model, ds.X_val, ds.y_val, CPU)[1] == m["val_accuracy"]
    assert evaluate(result.model, ds.X_test, ds.y_test, CPU)[1] == m["test_accuracy"]
    assert evaluate(result.model, ds.X_train, ds.y_train, CPU)[1] == m["train_accuracy"]


def test_divergence_stops_the_run_and_keeps_the_initial_weights():
    cfg = TrainConfig(optimizer="sgd", lr=1e3, schedule="constant", epochs=5, batch_size=16)
    ds, mcfg, result = train_on("wine", cfg, norm=False, width=16)
    m = result.metrics
    assert m["diverged"] and m["epochs"] == len(result.history) == 1
    assert not math.isfinite(result.history[0]["train_loss"])
    assert m["best_epoch"] == 0
    init = initial_model(mcfg, ds, cfg.seed).state_dict()
    for name, value in result.model.state_dict().items():
        assert torch.equal(value, init[name]), name


def test_same_seed_same_run_other_seed_other_run():
    ds = load_dataset("wine", seed=0)
    mcfg = NetworkConfig("mlp", ds.input_shape, ds.num_classes, width=16)
    runs = [
        train(mcfg, ds, TrainConfig(epochs=3, batch_size=16, seed=s), progress=False)
        for s in (7, 7, 8)
    ]

    def curves(r: TrainResult) -> list[list[float]]:
        return [[h["train_loss"], h["val_loss"], h["val_accuracy"]] for h in r.history]

    assert curves(runs[0]) == curves(runs[1])
    a, b = runs[0].model.state_dict(), runs[1].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert curves(runs[0])[0][0] != curves(runs[2])[0][0]


def test_run_roundtrip_gives_identical_outputs(tmp_path: Path):
    ds = load_dataset("wine", seed=0)
    mcfg = NetworkConfig("mlp", ds.input_shape, ds.num_classes, width=16)
    cfg = TrainConfig(epochs=3, batch_size=16, seed=7)
    result = train(mcfg, ds, cfg, progress=False)
    spec = DatasetSpec("wine")
    save_run(tmp_path, result, mcfg, spec, cfg, ds.labels)
    run = load_run(tmp_path)
    x = torch.from_numpy(ds.X_test)
    with torch.no_grad():
        assert torch.equal(run.model(x), result.model(x))
    assert not run.model.training
    mean, std = ds.standardization()  # the standardization travels inside the model
    assert torch.equal(run.model[0].mean, torch.from_numpy(mean))
    assert torch.equal(run.model[0].std, torch.from_numpy(std))
    assert run.model_cfg == mcfg
    assert run.metrics == result.metrics
    assert run.config["train"] == asdict(cfg) and run.config["dataset"] == asdict(spec)
    assert run.labels == ds.labels
    assert json.loads((tmp_path / "metrics.json").read_text())["history"] == result.history


def test_a_float64_run_trains_in_float64_and_loads_as_the_float32_network(tmp_path: Path):
    ds = load_dataset("wine", seed=0)
    mcfg = NetworkConfig("mlp", ds.input_shape, ds.num_classes, width=16)
    cfg = TrainConfig(epochs=2, batch_size=16, dtype="float64")
    result = train(mcfg, ds, cfg, progress=False)
    floats = [v for v in result.model.state_dict().values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float64 for v in floats)
    assert evaluate(result.model, ds.X_test, ds.y_test, CPU)[1] == result.metrics["test_accuracy"]
    save_run(tmp_path, result, mcfg, DatasetSpec("wine"), cfg, ds.labels)
    run = load_run(tmp_path)
    assert next(run.model.parameters()).dtype == torch.float32
    x = torch.from_numpy(ds.X_test)  # (N, 13) float32
    with torch.no_grad():
        expected = result.model(x.double())
        assert float((run.model(x).double() - expected).abs().max()) < 1e-5


@pytest.mark.parametrize(
    ("spec", "direct"),
    [
        (DatasetSpec("wine", seed=3), {"name": "wine", "seed": 3}),
        (
            DatasetSpec("synthetic", seed=1, shape=[2, 4, 4], num_classes=3, n_samples=90),
            {"name": "synthetic", "seed": 1, "shape": (2, 4, 4), "num_classes": 3, "n_samples": 90},
        ),
    ],
)
def test_a_recorded_dataset_spec_rebuilds_the_same_splits(spec: DatasetSpec, direct):
    ds, again = spec.load(), load_dataset(**direct)
    assert ds.input_shape == again.input_shape and ds.labels == again.labels
    for split in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test"):
        np.testing.assert_array_equal(getattr(ds, split), getattr(again, split))
    other = DatasetSpec(**{**asdict(spec), "seed": spec.seed + 1}).load()
    assert not np.array_equal(other.y_test, ds.y_test)  # the seed picks the split


def test_load_run_names_what_is_missing(tmp_path: Path):
    with pytest.raises(RunError, match="not a run directory \\(missing model.pt\\)"):
        load_run(tmp_path)


@pytest.mark.parametrize(("n_train", "steps"), [(32, 2), (33, 2), (34, 3)])
def test_a_last_batch_of_one_sample_is_dropped(n_train: int, steps: int):
    """BN cannot normalize a single sample per channel: such a batch would raise."""
    ds = load_dataset("synthetic", shape=(5,), num_classes=2, n_samples=100, seed=0)
    ds.X_train, ds.y_train = ds.X_train[:n_train], ds.y_train[:n_train]
    per_epoch: Counter[int] = Counter()
    cfg = TrainConfig(epochs=2, batch_size=16)
    train(
        NetworkConfig("mlp", (5,), 2),
        ds,
        cfg,
        progress=False,
        on_backward=lambda _model, epoch: per_epoch.update([epoch]),
    )
    assert per_epoch == {1: steps, 2: steps}


def test_on_backward_sees_every_step_before_its_update():
    ds = load_dataset("wine", seed=0)  # 115 training rows: 8 batches of 16
    mcfg = NetworkConfig("mlp", ds.input_shape, ds.num_classes, width=16)
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def record(model: torch.nn.Module, epoch: int) -> None:
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert first.weight.grad is not None
        seen.append((epoch, first.weight.detach().clone(), first.weight.grad.clone()))

    cfg = TrainConfig(epochs=2, batch_size=16, seed=3)
    train(mcfg, ds, cfg, progress=False, on_backward=record)
    assert [epoch for epoch, _, _ in seen] == [1] * 8 + [2] * 8
    init_first = next(
        m for m in initial_model(mcfg, ds, cfg.seed).modules() if isinstance(m, torch.nn.Linear)
    )
    assert torch.equal(seen[0][1], init_first.weight.detach())
    assert float(seen[0][2].norm()) > 0
    for (_, before, _), (_, after, _) in zip(seen, seen[1:], strict=False):
        assert not torch.equal(before, after)  # an update happened between two calls


# --- zoo ----------------------------------------------------------------------------------------


def weighted_layers(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (type(m).__name__, tuple(m.weight.shape))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    ]


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "mobilenet"])
@pytest.mark.parametrize("position", ["before", "after"])
def test_zoo_twins(name, position):
    shape = (30,) if name == "mlp" else (3, 16, 16)
    bn = build_model(NetworkConfig(name, shape, 4, bn_position=position))
    plain = build_model(NetworkConfig(name, shape, 4, norm=False, bn_position=position))
    # the twin is the same network without its BNs: one BN per layer but the classifier
    assert weighted_layers(bn) == weighted_layers(plain)
    assert count_batchnorms(bn) == len(weighted_layers(bn)) - 1
    assert count_batchnorms(plain) == 0
    x = torch.randn(3, *shape)
    assert bn.eval()(x).shape == plain.eval()(x).shape == (3, 4)
    if position == "after" and name != "resnet":
        # after: an activation sits directly before every BN
        mods = list(bn.modules())
        for i, m in enumerate(mods):
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                assert not isinstance(mods[i - 1], torch.nn.Linear | torch.nn.Conv2d)


def test_mobilenet_uses_depthwise_convs():
    model = build_model(NetworkConfig("mobilenet", (3, 16, 16), 4))
    depthwise = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1
    ]
    assert len(depthwise) == 3
    assert all(m.bias is None for m in depthwise)
