"""The training loop: seeded, per-epoch validation, best checkpoint kept.

A run directory holds ``model.pt`` (a state_dict, loadable with
``weights_only=True``), ``config.json`` (model, dataset and training settings:
enough to rebuild the network) and ``metrics.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

from training.data import Dataset, load_dataset
from training.distributed import DistributedContext, all_reduce_sum, data_parallel
from training.zoo import NetworkConfig, build_model

log = logging.getLogger(__name__)

BackwardHook = Callable[[nn.Module, int], None]
"""Called with ``(model, epoch)`` (1-based) after each backward pass, before the optimizer step."""
EpochHook = Callable[[nn.Module, int], None]
"""Called with ``(model, epoch)`` after each epoch's validation; the model is in eval mode."""


@dataclass
class TrainConfig:
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = 3e-3
    schedule: Literal["cosine", "constant"] = "cosine"
    epochs: int = 10
    batch_size: int = 64
    weight_decay: float = 1e-4
    momentum: float = 0.9
    seed: int = 0
    device: str = "auto"
    warmup_epochs: float = 0.0  # linear learning-rate warm-up from 0 over this many epochs
    keep: Literal["best", "last"] = "best"  # checkpoint returned: best validation or last epoch
    # float64 lets two runs that differ only in float32 rounding be compared at 1e-5: in
    # float32, one step's rounding can flip a max-pool or ReLU near-tie, and the runs part
    dtype: Literal["float32", "float64"] = "float32"


@dataclass
class DatasetSpec:
    """How the dataset was obtained, so a run can be rebuilt and re-evaluated."""

    name: str
    seed: int = 0
    path: str | None = None
    label_column: str | None = None
    shape: list[int] | None = None
    num_classes: int | None = None
    n_samples: int | None = None

    def load(self) -> Dataset:
        """The dataset, split as when it was recorded; raises ``training.data.DatasetError``."""
        synthetic: dict[str, Any] = {}
        if self.shape is not None:
            synthetic["shape"] = tuple(self.shape)
        if self.num_classes is not None:
            synthetic["num_classes"] = self.num_classes
        if self.n_samples is not None:
            synthetic["n_samples"] = self.n_samples
        return load_dataset(
            self.name, seed=self.seed, path=self.path, label_column=self.label_column, **synthetic
        )


@dataclass
class TrainResult:
    model: nn.Sequential  # best checkpoint, eval mode, on CPU
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(
    model: nn.Module, X: np.ndarray, y: np.ndarray, device: torch.device, batch_size: int = 512
) -> tuple[float, float]:
    """Return ``(mean cross-entropy, accuracy)`` of ``model`` in eval mode, in its dtype."""
    model.eval()
    dtype = next(model.parameters()).dtype
    loss_sum, correct = 0.0, 0
    for i in range(0, len(X), batch_size):
        xb = torch.from_numpy(X[i : i + batch_size]).to(device, dtype)
        yb = torch.from_numpy(y[i : i + batch_size]).to(device)
        logits = model(xb)
        loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / len(X), correct / len(X)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose 'sgd' or 'adamw'")


def train(
    model_cfg: NetworkConfig,
    data: Dataset,
    cfg: TrainConfig,
    *,
    progress: bool = True,
    on_backward: BackwardHook | None = None,
    distributed: DistributedContext | None = None,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    """Train a zoo model on ``data``; keep the epoch with the best validation accuracy.

    The last partial batch is dropped when it would hold a single sample, since
    BN cannot normalize one value per channel in training mode.
    With ``distributed`` (one call per torchrun process), ``cfg.batch_size`` is
    the global batch: each process trains a DDP replica on its
    ``batch_size / world_size`` samples of it, drawn by a DistributedSampler
    (seeded with ``cfg.seed``, reshuffled each epoch, the shards padded to equal
    length), and the BN layers are SyncBatchNorm unless the context says not.
    Every process evaluates the same replica and returns the same result.
    ``on_backward`` sees every step's gradients (``param.grad``) before the
    update; its first call sees the weights as initialized. It must not change
    the model; neither may ``on_epoch``. ``cfg.warmup_epochs`` scales the rate
    linearly from 0 over that many epochs' steps; ``cfg.keep="last"`` returns
    the last epoch's weights instead of the best validation epoch's.
    ``cfg.dtype`` is the precision of the weights, the data and the returned model.
    A run stops after the first epoch whose training loss is not finite.
    Metrics: ``test_accuracy``, ``val_accuracy``, ``train_accuracy``, ``epochs``,
    ``seconds``, ``best_epoch``, ``diverged``, ``world_size``,
    ``samples_per_second`` (training samples, all processes together, per second
    of the training steps alone) and the per-epoch ``history``.
    """
    seed_everything(cfg.seed)
    device = distributed.device if distributed is not None else resolve_device(cfg.device)
    world_size = distributed.world_size if distributed is not None else 1
    if cfg.batch_size % world_size:
        raise ValueError(
            f"batch size {cfg.batch_size} is the global batch: it must divide evenly "
            f"among {world_size} processes"
        )
    local_batch = cfg.batch_size // world_size
    dtype = getattr(torch, cfg.dtype)
    mean, std = data.standardization()
    model = build_model(model_cfg, mean, std).to(device, dtype)
    # ``net`` takes the training steps (a DDP replica when distributed); ``model`` is the
    # same parameters without the wrapper, for evaluation and checkpoints.
    net: nn.Module = model if distributed is None else data_parallel(model, distributed)
    opt = _optimizer(model, cfg)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
        if cfg.schedule == "cosine"
        else None
    )
    ds = TensorDataset(torch.from_numpy(data.X_train).to(dtype), torch.from_numpy(data.y_train))
    sampler: DistributedSampler[Any] | None = (
        None
        if distributed is None
        else DistributedSampler(
            ds, num_replicas=world_size, rank=distributed.rank, shuffle=True, seed=cfg.seed
        )
    )
    per_process = len(ds) if sampler is None else len(sampler)
    loader = DataLoader(
        ds,
        batch_size=local_batch,
        shuffle=sampler is None,
        sampler=sampler,
        generator=torch.Generator().manual_seed(cfg.seed) if sampler is None else None,
        drop_last=per_process % local_batch == 1,
    )
    best_acc, best_state, best_epoch = -1.0, copy.deepcopy(model.state_dict()), 0
    history: list[dict[str, float]] = []
    diverged = False
    start = time.perf_counter()
    step_seconds, samples_trained = 0.0, 0.0
    warmup_steps = round(cfg.warmup_epochs * len(loader))
    step = 0
    show = progress and (distributed is None or distributed.is_main)
    bar = tqdm(range(1, cfg.epochs + 1), disable=not show, desc="train", unit="epoch")
    for epoch in bar:
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        steps_start = time.perf_counter()
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            logits = net(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            if on_backward is not None:
                on_backward(model, epoch)
            if step < warmup_steps:  # scale the rate the schedule set, for this step only
                rates = [g["lr"] for g in opt.param_groups]
                for g in opt.param_groups:
                    g["lr"] *= (step + 1) / warmup_steps
            opt.step()
            if step < warmup_steps:
                for g, rate in zip(opt.param_groups, rates, strict=True):
                    g["lr"] = rate
            step += 1
            loss_sum += float(loss.detach()) * len(xb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(xb)
        if distributed is not None:
            loss_sum, correct_sum, seen_sum = all_reduce_sum([loss_sum, correct, seen], device)
            correct, seen = int(correct_sum), int(seen_sum)
        step_seconds += time.perf_counter() - steps_start
        samples_trained += seen
        if sched is not None:
            sched.step()
        train_loss = loss_sum / max(seen, 1)
        val_loss, val_acc = evaluate(model, data.X_val, data.y_val, device)
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_accuracy": correct / max(seen, 1),
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "seconds": time.perf_counter() - start,
            }
        )
        bar.set_postfix(loss=f"{train_loss:.4f}", val_acc=f"{val_acc:.4f}")
        if not np.isfinite(train_loss):
            diverged = True
            log.warning("training diverged at epoch %d (loss %s)", epoch, train_loss)
            break
        if on_epoch is not None:
            on_epoch(model, epoch)
        if val_acc > best_acc or cfg.keep == "last":
            best_acc, best_epoch = val_acc, epoch
            best_state = copy.deepcopy(model.state_dict())
    seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    _, test_acc = evaluate(model, data.X_test, data.y_test, device)
    _, train_acc = evaluate(model, data.X_train, data.y_train, device)
    metrics: dict[str, Any] = {
        "test_accuracy": test_acc,
        "val_accuracy": max(best_acc, 0.0),
        "train_accuracy": train_acc,
        "epochs": len(history),
        "best_epoch": best_epoch,
        "seconds": seconds,
        "diverged": diverged,
        "device": str(device),
        "world_size": world_size,
        "samples_per_second": samples_trained / step_seconds if step_seconds > 0 else 0.0,
        "history": history,
    }
    if distributed is not None:
        # The checkpoint's keys are the plain network's: hand back the plain network.
        model = build_model(model_cfg, mean, std).to(dtype)
        model.load_state_dict(best_state)
    return TrainResult(model.cpu().eval(), metrics, history)


def save_run(
    out: Path,
    result: TrainResult,
    model_cfg: NetworkConfig,
    data_spec: DatasetSpec,
    cfg: TrainConfig,
    labels: list[str],
    features: list[str] | None = None,
) -> None:
    """Write ``model.pt``, ``config.json`` and ``metrics.json`` into ``out``.

    ``config.json`` records ``labels`` (``labels[i]`` names output column ``i``) and
    ``features`` (the input's column names in order, ``[]`` when unknown).
    """
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result.model.state_dict(), out / "model.pt")
    config = {
        "model": model_cfg.to_dict(),
        "dataset": asdict(data_spec),
        "train": asdict(cfg),
        "labels": labels,
        "features": features or [],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=2))


@dataclass
class Run:
    """A trained run loaded from disk."""

    path: Path
    model: nn.Sequential
    model_cfg: NetworkConfig
    config: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        return list(self.config.get("labels", []))

    @property
    def features(self) -> list[str]:
        return list(self.config.get("features", []))


class RunError(ValueError):
    """A run directory that is missing files or cannot be rebuilt."""


def load_run(path: str | Path) -> Run:
    """Rebuild a run's model from ``config.json`` and load ``model.pt`` (eval mode)."""
    p = Path(path)
    for f in ("model.pt", "config.json"):
        if not (p / f).is_file():
            raise RunError(
                f"{p}: not a run directory (missing {f}); "
                "create one with `python -m training train --out DIR`"
            )
    config = json.loads((p / "config.json").read_text())
    model_cfg = NetworkConfig.from_dict(config["model"])
    model = build_model(model_cfg)
    state = torch.load(p / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    metrics_file = p / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return Run(p, model.eval(), model_cfg, config, metrics)
