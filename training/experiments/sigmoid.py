"""Claim 4, deep sigmoid MLPs, and its SGD loop that records per-layer gradient norms.

:func:`training.train.train` has no gradient hooks, so this loop mirrors it
(same seeding, standardization, shuffling and best-validation checkpoint) and
adds the norms. "Layer" means each ``nn.Linear`` of a zoo MLP in forward order:
the hidden layers (input side first), then the output layer.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.data import Dataset
from training.experiments.plots import SigmoidData, plot_sigmoid
from training.experiments.runs import ClaimResult, Runner, SuiteSettings, Table
from training.experiments.stats import Comparison
from training.train import evaluate, seed_everything
from training.zoo import ModelConfig, build_model


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
    would hide a vanishing gradient from the accuracy numbers.
    """
    seed_everything(seed)
    device = torch.device("cpu")
    mean, std = data.standardization()
    model = build_model(model_cfg, mean, std)
    layers = _linear_layers(model)
    init = _init_norms(model, data, batch_size, init_batches, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    ds = TensorDataset(torch.from_numpy(data.X_train), torch.from_numpy(data.y_train))
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        drop_last=len(ds) % batch_size == 1,
    )
    epoch_norms: list[list[float]] = []
    val_acc: list[float] = []
    best_acc, best_state = -1.0, copy.deepcopy(model.state_dict())
    diverged = False
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        sums, steps = [0.0] * len(layers), 0
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            if not math.isfinite(float(loss.detach())):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            sums = [s + n for s, n in zip(sums, _step_norms(layers), strict=True)]
            steps += 1
            opt.step()
        if diverged:
            break
        epoch_norms.append([s / max(steps, 1) for s in sums])
        _, acc = evaluate(model, data.X_val, data.y_val, device)
        val_acc.append(acc)
        if acc > best_acc:
            best_acc, best_state = acc, copy.deepcopy(model.state_dict())
    seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    _, test_acc = evaluate(model, data.X_test, data.y_test, device)
    _, train_acc = evaluate(model, data.X_train, data.y_train, device)
    return GradientRun(init, epoch_norms, val_acc, test_acc, train_acc, diverged, seconds)


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
