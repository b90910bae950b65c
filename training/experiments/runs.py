"""Budgets, training runs and result records shared by the BN experiments.

A :class:`Runner` trains zoo models through :func:`training.train.train` and
caches each run by its full configuration, so experiments that need the same
run (the BN twin at the default settings, say) train it once per suite.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from training.data import Dataset, load_dataset
from training.experiments.stats import Comparison, Verdict, claim_verdict
from training.train import TrainConfig, evaluate, train
from training.zoo import ModelConfig

log = logging.getLogger(__name__)

ACC_DELTA = 0.01  # the smallest accuracy difference that matters: one percentage point
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {"optimizer": "adamw", "lr": 3e-3},
    "sgd": {"optimizer": "sgd", "lr": 1e-2},
}


@dataclass(frozen=True)
class Setting:
    """One (dataset, zoo model) pair the claims are tested on."""

    dataset: str
    model: str
    target: float  # validation accuracy that counts as "trained" (claim 1)
    epochs: int  # training budget of one run
    width: int | None = None

    @property
    def label(self) -> str:
        return f"{self.dataset} {self.model}"

    def model_config(self, data: Dataset, **overrides: Any) -> ModelConfig:
        return ModelConfig(
            self.model, data.input_shape, data.num_classes, width=self.width, **overrides
        )


@dataclass(frozen=True)
class SuiteSettings:
    """Budgets of one suite run.

    ``full()`` runs in about five minutes on one CPU core; ``quick()`` in seconds,
    for tests (its numbers are real but too small to mean much).
    """

    mode: str
    seeds: int  # seeds of the cheap experiments
    heavy_seeds: int  # seeds of the costly ones (lr sweep, deep sigmoid nets, tiny batches)
    settings: tuple[Setting, ...]
    lr_grid: tuple[float, ...]
    lr_epochs: int
    depths: tuple[int, ...]
    sigmoid_width: int
    sigmoid_batch: int
    sigmoid_lr: float
    sigmoid_epochs: int
    batch_sizes: tuple[int, ...]
    batch_reference: int  # the "normal" batch size that small batches are compared with
    small_batches: tuple[int, ...]  # the "very small" batch sizes of the weakness claim
    batch_epochs: int
    dropout: float = 0.3

    @classmethod
    def full(cls) -> SuiteSettings:
        return cls(
            mode="full",
            seeds=5,
            heavy_seeds=3,
            settings=(
                Setting("digits", "mlp", target=0.95, epochs=20),
                Setting("digits", "cnn", target=0.95, epochs=12, width=16),
                Setting("breast_cancer", "mlp", target=0.95, epochs=20),
            ),
            lr_grid=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
            lr_epochs=10,
            depths=(3, 5, 7, 10),
            sigmoid_width=100,
            sigmoid_batch=60,
            sigmoid_lr=0.1,
            sigmoid_epochs=15,
            batch_sizes=(2, 4, 16, 64, 256),
            batch_reference=64,
            small_batches=(2, 4),
            batch_epochs=4,
        )

    @classmethod
    def quick(cls) -> SuiteSettings:
        return cls(
            mode="quick",
            seeds=2,
            heavy_seeds=2,
            settings=(
                Setting("digits", "mlp", target=0.9, epochs=3),
                Setting("breast_cancer", "mlp", target=0.9, epochs=3),
            ),
            lr_grid=(1e-3, 1e-1, 10.0),
            lr_epochs=2,
            depths=(3, 5),
            sigmoid_width=32,
            sigmoid_batch=60,
            sigmoid_lr=0.1,
            sigmoid_epochs=2,
            batch_sizes=(16, 64),
            batch_reference=64,
            small_batches=(16,),
            batch_epochs=1,
        )

    def with_seeds(self, seeds: int) -> SuiteSettings:
        if seeds < 2:
            raise ValueError(f"seeds must be >= 2 to measure a spread, got {seeds}")
        return replace(self, seeds=seeds, heavy_seeds=seeds)


@dataclass
class RunRecord:
    """One training run as reported: the kept (best-validation) checkpoint's numbers."""

    dataset: str
    seed: int
    model: dict[str, Any]
    train: dict[str, Any]
    test_accuracy: float
    val_accuracy: float
    train_accuracy: float  # eval mode, on the training split
    train_loss: float  # eval-mode mean cross-entropy, training split
    test_loss: float
    diverged: bool
    seconds: float
    val_curve: list[float]  # (epochs run,): validation accuracy after each epoch
    loss_curve: list[float]  # (epochs run,): mean training loss (train mode) of each epoch
    time_curve: list[float]  # (epochs run,): seconds since the start, after each epoch


@dataclass
class Table:
    """Extra numbers of a claim; ``units[i]`` formats column ``i`` ("" keeps it as text)."""

    title: str
    header: list[str]
    units: list[str]
    rows: list[list[Any]]


@dataclass
class ClaimResult:
    key: str
    title: str
    claim: str
    setup: str  # markdown
    comparisons: list[Comparison]
    tables: list[Table] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)  # paths relative to the report
    notes: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verdict(self) -> Verdict:
        return claim_verdict([c.outcome for c in self.comparisons if c.primary])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict
        return d


class Runner:
    """Trains runs for one suite on CPU, caching datasets and identical runs."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, int], Dataset] = {}
        self._runs: dict[str, RunRecord] = {}
        self.trained = 0

    def data(self, name: str, seed: int) -> Dataset:
        if (name, seed) not in self._data:
            self._data[name, seed] = load_dataset(name, seed=seed)
        return self._data[name, seed]

    def run(self, dataset: str, model_cfg: ModelConfig, train_cfg: TrainConfig) -> RunRecord:
        """Train (or fetch from the cache) one run; the data split uses ``train_cfg.seed``."""
        key = json.dumps([dataset, model_cfg.to_dict(), asdict(train_cfg)], sort_keys=True)
        if key not in self._runs:
            data = self.data(dataset, train_cfg.seed)
            result = train(model_cfg, data, train_cfg, progress=False)
            m, cpu = result.metrics, result.model
            train_loss, _ = evaluate(cpu, data.X_train, data.y_train, torch.device("cpu"))
            test_loss, _ = evaluate(cpu, data.X_test, data.y_test, torch.device("cpu"))
            self._runs[key] = RunRecord(
                dataset,
                train_cfg.seed,
                model_cfg.to_dict(),
                asdict(train_cfg),
                m["test_accuracy"],
                m["val_accuracy"],
                m["train_accuracy"],
                train_loss,
                test_loss,
                m["diverged"],
                m["seconds"],
                [h["val_accuracy"] for h in result.history],
                [h["train_loss"] for h in result.history],
                [h["seconds"] for h in result.history],
            )
            self.trained += 1
            log.debug("trained %s on %s seed %d", model_cfg.name, dataset, train_cfg.seed)
        return self._runs[key]

    def arm(
        self,
        setting: Setting,
        seeds: int,
        model_kw: dict[str, Any],
        train_kw: dict[str, Any] | None = None,
        epochs: int | None = None,
    ) -> list[RunRecord]:
        """One arm of a comparison: a run per seed ``0..seeds-1`` (AdamW, constant rate)."""
        out = []
        for seed in range(seeds):
            data = self.data(setting.dataset, seed)
            cfg = train_config(seed, epochs or setting.epochs, **(train_kw or {}))
            out.append(self.run(setting.dataset, setting.model_config(data, **model_kw), cfg))
        return out

    def warm_up(self) -> None:
        """One tiny uncached run per arm, so first-call overheads stay out of timings."""
        data = self.data("digits", 0)
        for norm in (True, False):
            cfg = ModelConfig("mlp", data.input_shape, data.num_classes, norm=norm)
            train(cfg, data, TrainConfig(epochs=1, device="cpu"), progress=False)


def train_config(seed: int, epochs: int, **overrides: Any) -> TrainConfig:
    """The experiments' default: AdamW (lr 3e-3), constant rate, CPU; ``overrides`` win."""
    kw: dict[str, Any] = {**OPTIMIZERS["adamw"], "schedule": "constant", "device": "cpu"}
    kw.update(overrides)
    return TrainConfig(epochs=epochs, seed=seed, **kw)


def tagged(runs: list[RunRecord], **tags: Any) -> list[dict[str, Any]]:
    """Run records as dicts for the results JSON, each with ``tags`` (arm, setting, ...)."""
    return [{**tags, **asdict(r)} for r in runs]
