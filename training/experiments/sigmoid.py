"""Claim 4, deep sigmoid MLPs, trained by :func:`training.train.train` with gradient norms.

"Layer" means each ``nn.Linear`` of a zoo MLP in forward order: the hidden
layers (input side first), then the output layer. The norms come from
``train``'s ``on_backward`` hook, so these runs share the seeding,
standardization, shuffling and best-validation checkpoint of every other run.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.data import Dataset
from training.experiments.plots import SigmoidData, plot_sigmoid
from training.experiments.runs import ClaimResult, Runner, SuiteSettings, Table
from training.experiments.stats import Comparison
from training.train import TrainConfig, train
from training.zoo import ModelConfig


@dataclass
class GradientRun:
    """Norms are Frobenius norms of ``dL/dW`` for each Linear weight (L: mean cross-entropy)."""

    init_norms: list[float]  # (layers,): mean over `init_batches` batches at initialization
    epoch_norms: list[list[float]]  # (epochs, layers): mean over each epoch's SGD steps
    val_accuracy: list[float]  # (epochs,)
    test_accuracy: float  # of the best-validation checkpoint
    train_accuracy: float
    diverged: bool
    seconds: float


def _linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _step_norms(layers: list[nn.Linear]) -> list[float]:
    return [float(lin.weight.grad.norm()) if lin.weight.grad is not None else 0.0 for lin in layers]


def _init_norms(
    model: nn.Module, data: Dataset, batch_size: int, batches: int, seed: int
) -> list[float]:
    """Mean gradient norms over a few random batches, on a copy (no update, stats untouched)."""
    probe = copy.deepcopy(model).train()
    layers = _linear_layers(probe)
    gen = torch.Generator().manual_seed(seed + 10_000)
    X, y = torch.from_numpy(data.X_train), torch.from_numpy(data.y_train)
    total = [0.0] * len(layers)
    for _ in range(batches):
        idx = torch.randperm(len(X), generator=gen)[:batch_size]
        probe.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(probe(X[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
        total = [t + n for t, n in zip(total, _step_norms(layers), strict=True)]
    return [t / batches for t in total]


class _GradientRecorder:
    """``train``'s ``on_backward`` hook: norms at initialization, then summed per epoch.

    The first call comes before the first update, so the initialization probe
    runs there, on a copy of the freshly built model. The probe draws from its
    own generator, never torch's global one, so training is unchanged by it.
    """

    def __init__(self, data: Dataset, batch_size: int, init_batches: int, seed: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.init_batches, self.seed = init_batches, seed
        self.init_norms: list[float] | None = None
        self.sums: dict[int, list[float]] = {}  # epoch -> (layers,) sum over its steps
        self.steps: defaultdict[int, int] = defaultdict(int)

    def __call__(self, model: nn.Module, epoch: int) -> None:
        if self.init_norms is None:
            self.init_norms = _init_norms(
                model, self.data, self.batch_size, self.init_batches, self.seed
            )
        norms = _step_norms(_linear_layers(model))
        sums = self.sums.get(epoch, [0.0] * len(norms))
        self.sums[epoch] = [s + n for s, n in zip(sums, norms, strict=True)]
        self.steps[epoch] += 1

    def epoch_means(self, epochs: int) -> list[list[float]]:
        """(epochs, layers): each epoch's mean norms, for epochs ``1..epochs``."""
        return [[s / self.steps[e] for s in self.sums[e]] for e in range(1, epochs + 1)]


def train_with_gradient_norms(
    model_cfg: ModelConfig,
    data: Dataset,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    momentum: float = 0.9,
    init_batches: int = 5,
) -> GradientRun:
    """Train with SGD (momentum, no weight decay, constant rate) on CPU, recording gradient norms.

    Plain SGD on purpose: adaptive optimizers rescale each parameter's step and
    would hide a vanishing gradient from the accuracy numbers. A diverged
    epoch (non-finite training loss, the last one ``train`` runs) is left out
    of ``epoch_norms`` and ``val_accuracy``: its norms are not numbers.
    """
    cfg = TrainConfig(
        optimizer="sgd",
        lr=lr,
        schedule="constant",
        epochs=epochs,
        batch_size=batch_size,
        weight_decay=0.0,
        momentum=momentum,
        seed=seed,
        device="cpu",
    )
    recorder = _GradientRecorder(data, batch_size, init_batches, seed)
    result = train(model_cfg, data, cfg, progress=False, on_backward=recorder)
    m = result.metrics
    completed = len(result.history) - int(m["diverged"])
    assert recorder.init_norms is not None  # train runs at least one step
    return GradientRun(
        recorder.init_norms,
        recorder.epoch_means(completed),
        [h["val_accuracy"] for h in result.history[:completed]],
        m["test_accuracy"],
        m["train_accuracy"],
        m["diverged"],
        m["seconds"],
    )


def attenuation(norms: list[float], depth: int) -> float:
    """log10(||g|| of the last hidden layer / ||g|| of the first); > 0 means vanishing."""
    return math.log10(max(norms[depth - 1], 1e-30) / max(norms[0], 1e-30))


def deep_sigmoid(runner: Runner, s: SuiteSettings, fig_dir: Path) -> ClaimResult:
    """Claim 4: BN mitigates vanishing gradients in deep sigmoid networks."""
    arms = {"BN": True, "no BN": False}
    runs: dict[tuple[int, str], list[GradientRun]] = {}
    for depth in s.depths:
        for arm, norm in arms.items():
            runs[depth, arm] = []
            for seed in range(s.heavy_seeds):
                data = runner.data("digits", seed)
                cfg = ModelConfig(
                    "mlp",
                    data.input_shape,
                    data.num_classes,
                    norm=norm,
                    depth=depth,
                    width=s.sigmoid_width,
                    activation="sigmoid",
                )
                runner.trained += 1
                runs[depth, arm].append(
                    train_with_gradient_norms(
                        cfg,
                        data,
                        lr=s.sigmoid_lr,
                        epochs=s.sigmoid_epochs,
                        batch_size=s.sigmoid_batch,
                        seed=seed,
                    )
                )
    comps: list[Comparison] = []
    rows: list[list[Any]] = []
    records: list[dict[str, Any]] = []
    for depth in s.depths:
        init = {arm: [attenuation(r.init_norms, depth) for r in runs[depth, arm]] for arm in arms}
        last = {
            arm: [
                attenuation((r.epoch_norms or [r.init_norms])[-1], depth) for r in runs[depth, arm]
            ]
            for arm in arms
        }
        acc = {arm: [r.test_accuracy for r in runs[depth, arm]] for arm in arms}
        comps += [
            Comparison(
                f"depth {depth}: gradient attenuation at init",
                "attenuation",
                "decades",
                "no-BN attenuation - BN attenuation",
                "BN",
                "no BN",
                init["BN"],
                init["no BN"],
                direction=-1,
                delta=0.5,
            ),
            Comparison(
                f"depth {depth}: test accuracy",
                "test accuracy",
                "%",
                "BN - no BN",
                "BN",
                "no BN",
                acc["BN"],
                acc["no BN"],
                direction=1,
                delta=0.01,
            ),
            Comparison(
                f"depth {depth}: attenuation in the last epoch",
                "attenuation",
                "decades",
                "no-BN attenuation - BN attenuation",
                "BN",
                "no BN",
                last["BN"],
                last["no BN"],
                direction=-1,
                delta=0.5,
                primary=False,
            ),
        ]
        for arm in arms:
            first = [r.init_norms[0] for r in runs[depth, arm]]
            rows.append(
                [
                    depth,
                    arm,
                    [np.mean(first), np.std(first, ddof=1)],
                    [np.mean(init[arm]), np.std(init[arm], ddof=1)],
                    [np.mean(last[arm]), np.std(last[arm], ddof=1)],
                    [np.mean(acc[arm]), np.std(acc[arm], ddof=1)],
                ]
            )
            records += [
                {"depth": depth, "arm": arm, "seed": seed, **asdict(r)}
                for seed, r in enumerate(runs[depth, arm])
            ]
    plot_sigmoid(
        fig_dir / "deep_sigmoid.png",
        SigmoidData(
            list(s.depths),
            {k: [r.init_norms for r in v] for k, v in runs.items()},
            {
                (d, arm): [[attenuation(n, d) for n in r.epoch_norms] for r in v]
                for (d, arm), v in runs.items()
            },
            {arm: [[r.test_accuracy for r in runs[d, arm]] for d in s.depths] for arm in arms},
        ),
        list(arms),
    )
    return ClaimResult(
        "deep-sigmoid",
        "BN mitigates vanishing gradients in deep sigmoid networks",
        "Without BN, gradients shrink layer by layer towards the input of a deep sigmoid "
        "network and it trains poorly; BN keeps them alive.",
        f"The original paper used MNIST, 3 hidden layers of 100 sigmoid units, batch 60. Here: "
        f"digits (8x8), zoo MLPs with {', '.join(map(str, s.depths))} hidden layers of "
        f"{s.sigmoid_width} sigmoid units (PyTorch default init), Linear -> BN -> sigmoid vs "
        f"the no-BN twin, batch {s.sigmoid_batch}, plain SGD (lr {s.sigmoid_lr:g}, momentum "
        f"0.9, no weight decay, constant rate) for {s.sigmoid_epochs} epochs, "
        f"{s.heavy_seeds} seeds. Gradient norms are Frobenius norms of each Linear weight's "
        f"gradient, averaged over 5 random batches at initialization (no update) and over "
        f"each epoch's steps during training. *Attenuation* = log10(norm at the last hidden "
        f"layer / norm at the first hidden layer), in decades: > 0 means the gradient "
        f"vanishes towards the input. Metrics: attenuation at initialization and test accuracy "
        f"per depth.",
        comps,
        tables=[
            Table(
                "Per depth and arm (mean ± std over seeds)",
                [
                    "hidden layers",
                    "arm",
                    "first-layer grad norm at init",
                    "attenuation at init",
                    "attenuation, last epoch",
                    "test accuracy",
                ],
                ["", "", "g", "decades", "decades", "%"],
                rows,
            )
        ],
        figures=["deep_sigmoid.png"],
        runs=records,
        notes=[
            "Plain SGD is used on purpose: AdamW rescales each parameter's step and would "
            "mask a vanishing gradient.",
            "Both arms use the same learning rate and budget, tuned for neither; a no-BN "
            "sigmoid net may train with another rate, a longer budget or a better "
            "initialization. The gradient numbers show what it would be up against.",
        ],
    )
