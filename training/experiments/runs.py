"""Training runs, per-arm tuning and result records shared by the BN experiments.

A :class:`Runner` trains zoo models through :func:`training.train.train` and
caches each run by its full configuration, so experiments that need the same
run train it once per worker process. :meth:`Runner.tuned` gives each arm its
own learning rate (and warm-up) from a half-decade grid, chosen on the
validation split of tuning seeds that the comparisons never use.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from training.data import Dataset
from training.experiments.settings import Setting, SuiteSettings
from training.experiments.stats import Comparison, Verdict, claim_verdict
from training.experiments.tasks import load_task
from training.train import TrainConfig, evaluate, train

log = logging.getLogger(__name__)

ACC_DELTA = 0.01  # the smallest accuracy difference that matters: one percentage point
HALF_DECADES = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
TUNING_SEED0 = 1000  # tuning seeds are 1000, 1001, ...; comparisons use 0, 1, ...
SGD: dict[str, Any] = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4}


@dataclass
class RunRecord:
    """One training run as reported: numbers of the checkpoint ``train()`` returned."""

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
    test_curve: list[float]  # (epochs run,): test accuracy after each epoch
    loss_curve: list[float]  # (epochs run,): mean training loss (train mode) of each epoch


@dataclass
class Tuned:
    """An arm's hyperparameters chosen on validation: ``grid`` rows are [lr, warm-up, score]."""

    lr: float
    warmup: float
    grid: list[list[float]]


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
    number: int  # the claim's number in the list (10+: the report's own claims)
    title: str
    claim: str
    setup: str  # markdown
    comparisons: list[Comparison]
    reading: str = ""  # what was measured, in one phrase (the summary table's wording)
    tables: list[Table] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)  # paths relative to the report
    notes: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)  # carried into the summary table
    runs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verdict(self) -> Verdict:
        return claim_verdict([c.outcome for c in self.comparisons if c.primary])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict
        return d


def train_config(seed: int, epochs: int, **overrides: Any) -> TrainConfig:
    """The experiments' default: AdamW (lr 3e-3), constant rate, CPU; ``overrides`` win."""
    kw: dict[str, Any] = {"optimizer": "adamw", "lr": 3e-3, "schedule": "constant"}
    kw.update(overrides)
    return TrainConfig(epochs=epochs, seed=seed, device="cpu", **kw)


def extend(best: float, tried: list[float]) -> list[float]:
    """The next half-decade rate beyond the grid's edge when ``best`` sits on that edge."""
    i = HALF_DECADES.index(best)
    if best == min(tried) and i > 0:
        return [HALF_DECADES[i - 1]]
    if best == max(tried) and i + 1 < len(HALF_DECADES):
        return [HALF_DECADES[i + 1]]
    return []


def curve_score(run: RunRecord) -> float:
    """Tuning score: mean validation accuracy over the epochs (0 for a diverged run).

    The area under the validation curve rewards a rate that gets high early, which
    is what the speed claims compare, and punishes one that is unstable later.
    """
    if run.diverged or not run.val_curve:
        return 0.0
    return float(np.mean(run.val_curve))


class Runner:
    """Trains runs for one worker on CPU, caching datasets, runs, models and tunings."""

    def __init__(self, settings: SuiteSettings) -> None:
        self.s = settings
        self._data: dict[tuple[str, int], Dataset] = {}
        self._runs: dict[str, RunRecord] = {}
        self._tuned: dict[str, Tuned] = {}
        self.models: dict[str, nn.Module] = {}  # run key -> the returned checkpoint
        self.memo: dict[str, Any] = {}  # other experiments' shared results, by name
        self.trained = 0

    def data(self, name: str, seed: int) -> Dataset:
        if (name, seed) not in self._data:
            self._data[name, seed] = load_task(name, seed, self.s.small_train)
        return self._data[name, seed]

    def run(self, setting: Setting, seed: int, model_kw: dict[str, Any], **train_kw: Any) -> str:
        """Train (or fetch) one run and return its cache key (see :meth:`record`)."""
        data = self.data(setting.dataset, seed)
        model_cfg = setting.model_config(data, **model_kw)
        cfg = train_config(seed, train_kw.pop("epochs", setting.epochs), **train_kw)
        key = json.dumps([setting.dataset, model_cfg.to_dict(), asdict(cfg)], sort_keys=True)
        if key in self._runs:
            return key
        test_curve: list[float] = []

        def on_epoch(model: nn.Module, epoch: int) -> None:
            test_curve.append(evaluate(model, data.X_test, data.y_test, torch.device("cpu"))[1])

        result = train(model_cfg, data, cfg, progress=False, on_epoch=on_epoch)
        m, cpu = result.metrics, result.model
        train_loss, _ = evaluate(cpu, data.X_train, data.y_train, torch.device("cpu"))
        test_loss, _ = evaluate(cpu, data.X_test, data.y_test, torch.device("cpu"))
        self._runs[key] = RunRecord(
            setting.dataset,
            seed,
            model_cfg.to_dict(),
            asdict(cfg),
            m["test_accuracy"],
            m["val_accuracy"],
            m["train_accuracy"],
            train_loss,
            test_loss,
            m["diverged"],
            m["seconds"],
            [h["val_accuracy"] for h in result.history],
            test_curve[: len(result.history)],
            [h["train_loss"] for h in result.history],
        )
        self.models[key] = cpu
        self.trained += 1
        return key

    def record(self, key: str) -> RunRecord:
        return self._runs[key]

    def arm(
        self, setting: Setting, seeds: int, model_kw: dict[str, Any], **train_kw: Any
    ) -> list[RunRecord]:
        """One arm of a comparison: a run per seed ``0..seeds-1``."""
        return [self.record(self.run(setting, s, model_kw, **train_kw)) for s in range(seeds)]

    def tuned(
        self,
        setting: Setting,
        model_kw: dict[str, Any],
        lrs: tuple[float, ...],
        warmups: tuple[float, ...] = (0.0,),
        **train_kw: Any,
    ) -> Tuned:
        """This arm's best (lr, warm-up) by :func:`curve_score` on the tuning seeds.

        When the best rate sits on an edge of ``lrs``, the next half-decade rate beyond
        that edge is tried too, up to ``max_extensions`` (a suite setting) times.
        """
        key = json.dumps([setting, model_kw, lrs, warmups, train_kw], sort_keys=True, default=str)
        if key not in self._tuned:
            grid: list[list[float]] = []
            tried: list[float] = []
            todo = list(lrs)
            while todo:
                for lr in todo:
                    grid += [self._score(setting, model_kw, lr, w, train_kw) for w in warmups]
                tried += todo
                best = max(grid, key=lambda row: row[2])  # first best: the smaller rate on a tie
                done = len(tried) - len(lrs) >= self.s.max_extensions
                todo = [] if done else extend(best[0], tried)
            grid.sort()
            self._tuned[key] = Tuned(best[0], best[1], grid)
            log.debug("tuned %s %s: lr %g warm-up %g", setting.label, model_kw, best[0], best[1])
        return self._tuned[key]

    def _score(
        self, setting: Setting, model_kw: dict[str, Any], lr: float, w: float, kw: dict[str, Any]
    ) -> list[float]:
        """[lr, warm-up, mean curve score over the tuning seeds]."""
        seeds = range(TUNING_SEED0, TUNING_SEED0 + self.s.tuning_seeds)
        scores = [
            curve_score(self.record(self.run(setting, s, model_kw, lr=lr, warmup_epochs=w, **kw)))
            for s in seeds
        ]
        return [lr, w, float(np.mean(scores))]

    def tuned_arm(
        self,
        setting: Setting,
        seeds: int,
        model_kw: dict[str, Any],
        lrs: tuple[float, ...],
        warmups: tuple[float, ...] = (0.0,),
        **train_kw: Any,
    ) -> tuple[Tuned, list[RunRecord]]:
        """Tune this arm, then run it on the comparison seeds with its own choice."""
        t = self.tuned(setting, model_kw, lrs, warmups, **train_kw)
        runs = self.arm(setting, seeds, model_kw, lr=t.lr, warmup_epochs=t.warmup, **train_kw)
        return t, runs


def tagged(runs: list[RunRecord], **tags: Any) -> list[dict[str, Any]]:
    """Run records as dicts for the results JSON, each with ``tags`` (arm, setting, ...)."""
    return [{**tags, **asdict(r)} for r in runs]


def grid_text(t: Tuned) -> str:
    """``lr 0.03, warm-up 1 epoch`` for a setup or table cell."""
    warm = f", warm-up {t.warmup:g} epoch" if t.warmup else ""
    return f"lr {t.lr:g}{warm}"
