"""Training reaches the quality bars on the real bundled data, deterministically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.data import load_dataset
from training.train import (
    DatasetSpec,
    TrainConfig,
    load_run,
    save_run,
    seed_everything,
    train,
)
from training.zoo import ModelConfig, build_model, count_batchnorms


@pytest.mark.parametrize(
    ("model", "dataset", "cfg", "bar"),
    [
        ("cnn", "digits", TrainConfig(epochs=10), 0.98),
        ("mlp", "breast_cancer", TrainConfig(epochs=30, batch_size=32, lr=1e-3), 0.95),
        ("mlp", "wine", TrainConfig(epochs=50, batch_size=16, lr=3e-3), 0.95),
    ],
)
def test_quality_bars(model, dataset, cfg, bar):
    ds = load_dataset(dataset, seed=0)
    result = train(ModelConfig(model, ds.input_shape, ds.num_classes), ds, cfg, progress=False)
    m = result.metrics
    assert m["test_accuracy"] >= bar, m
    assert m["epochs"] == cfg.epochs == len(m["history"])
    assert m["val_accuracy"] == max(h["val_accuracy"] for h in m["history"])


def test_same_seed_same_metrics_and_run_roundtrip(tmp_path: Path):
    ds = load_dataset("wine", seed=0)
    mcfg = ModelConfig("mlp", ds.input_shape, ds.num_classes, width=16)
    cfg = TrainConfig(epochs=3, batch_size=16, seed=7)
    a = train(mcfg, ds, cfg, progress=False)
    b = train(mcfg, ds, cfg, progress=False)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    save_run(tmp_path, a, mcfg, DatasetSpec("wine"), cfg, ds.labels)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test_accuracy", "val_accuracy", "history", "epochs", "seconds"):
        assert key in metrics
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "0.mean" in state  # standardization is part of the model
    run = load_run(tmp_path)
    x = torch.from_numpy(ds.X_test)
    with torch.no_grad():
        torch.testing.assert_close(run.model(x), a.model(x))
    assert run.labels == ds.labels


def test_single_sample_last_batch_is_dropped():
    ds = load_dataset("synthetic", shape=(5,), num_classes=2, n_samples=100, seed=0)
    ds.X_train, ds.y_train = ds.X_train[:33], ds.y_train[:33]  # 33 % 16 == 1
    cfg = TrainConfig(epochs=1, batch_size=16)
    result = train(ModelConfig("mlp", (5,), 2), ds, cfg, progress=False)
    assert result.metrics["epochs"] == 1


def test_on_backward_sees_every_step_before_its_update():
    ds = load_dataset("wine", seed=0)  # 115 training rows: 8 batches of 16
    mcfg = ModelConfig("mlp", ds.input_shape, ds.num_classes, width=16)
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def record(model: torch.nn.Module, epoch: int) -> None:
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert first.weight.grad is not None
        seen.append((epoch, first.weight.detach().clone(), first.weight.grad.clone()))

    cfg = TrainConfig(epochs=2, batch_size=16, seed=3)
    train(mcfg, ds, cfg, progress=False, on_backward=record)
    assert [epoch for epoch, _, _ in seen] == [1] * 8 + [2] * 8
    seed_everything(3)
    init = build_model(mcfg, *ds.standardization())
    init_first = next(m for m in init.modules() if isinstance(m, torch.nn.Linear))
    torch.testing.assert_close(seen[0][1], init_first.weight.detach(), rtol=0, atol=0)
    assert float(seen[0][2].norm()) > 0
    for (_, before, _), (_, after, _) in zip(seen, seen[1:], strict=False):
        assert not torch.equal(before, after)  # an update happened between two calls


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "mobilenet"])
@pytest.mark.parametrize("position", ["before", "after"])
def test_zoo_twins(name, position):
    shape = (30,) if name == "mlp" else (3, 16, 16)
    bn = build_model(ModelConfig(name, shape, 4, bn_position=position))
    plain = build_model(ModelConfig(name, shape, 4, norm=False, bn_position=position))
    assert count_batchnorms(bn) > 0
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
    model = build_model(ModelConfig("mobilenet", (3, 16, 16), 4))
    depthwise = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1
    ]
    assert len(depthwise) == 3
    assert all(m.bias is None for m in depthwise)
