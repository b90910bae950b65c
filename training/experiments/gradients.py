"""Gradient norms per layer and saturated units, recorded while :func:`train` trains (claim 4).

"Layer" means each ``nn.Linear`` of a zoo MLP in forward order: the hidden
layers (input side first), then the output layer. The norms come from
``train``'s ``on_backward`` hook, so these runs share the seeding,
standardization and shuffling of every other run.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training.data import Dataset
from training.train import TrainConfig, train
from training.zoo import NetworkConfig, build_model


@dataclass
class GradientRun:
    """Norms are Frobenius norms of ``dL/dW`` for each Linear weight (L: mean cross-entropy)."""

    init_norms: list[float]  # (layers,): mean over `init_batches` batches at initialization
    epoch_norms: list[list[float]]  # (epochs, layers): mean over each epoch's SGD steps
    val_accuracy: list[float]  # (epochs,)
    test_accuracy: float  # of the last epoch (no checkpoint selection)
    train_accuracy: float
    diverged: bool
    seconds: float
    saturated_init: list[float]  # (thresholds,): share of saturated sigmoid outputs at init
    saturated_end: list[float]  # (thresholds,): the same after training (eval mode, test split)


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
    model_cfg: NetworkConfig,
    data: Dataset,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    momentum: float = 0.9,
    init_batches: int = 5,
    thresholds: tuple[float, ...] = (),
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
        keep="last",
    )
    torch.manual_seed(seed)  # train() seeds the same way before it builds the model
    initial = build_model(model_cfg, *data.standardization())
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
        saturated_share(initial, data.X_test, thresholds),
        saturated_share(result.model, data.X_test, thresholds),
    )


@torch.no_grad()
def saturated_share(model: nn.Module, X: np.ndarray, thresholds: tuple[float, ...]) -> list[float]:
    """Per threshold t: the share of sigmoid outputs (all units, all rows of ``X``) that are
    < t or > 1 - t, in eval mode; [] for a model without sigmoids."""
    outputs: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().flatten()))
        for m in model.modules()
        if isinstance(m, nn.Sigmoid)
    ]
    model.eval()
    model(torch.from_numpy(X))
    for h in hooks:
        h.remove()
    if not outputs:
        return []
    s = torch.cat(outputs)
    return [float(((s < t) | (s > 1 - t)).float().mean()) for t in thresholds]


def attenuation(norms: list[float], depth: int) -> float:
    """log10(||g|| of the last hidden layer / ||g|| of the first); > 0 means vanishing."""
    return math.log10(max(norms[depth - 1], 1e-30) / max(norms[0], 1e-30))
