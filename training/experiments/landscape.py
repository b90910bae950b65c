"""Santurkar et al. (NeurIPS 2018), scaled down: internal covariate shift and loss smoothness.

Measured on a plain SGD loop of its own (no momentum, so "the step the earlier
layers take" is exactly ``-lr * grad``), because every measurement needs the
model between a backward pass and its update, on copies, with the step's batch:

- :func:`gradient_shift`: Santurkar's ICS, the change of layer k's weight
  gradient when the layers before it take their own update on the same batch;
- :func:`input_drift`: how far each hidden layer's input moves (per-unit mean,
  in units of its std) between two measurements;
- :func:`smoothness`: the loss and gradient along the gradient direction:
  the range of the loss over a few step sizes, and the largest gradient change
  per unit of step (an effective beta-smoothness).
- :class:`NoisyShift`: the "noisy BN" arm: after each BN, a random per-unit
  scale and shift resampled at every step, which restores distribution shift.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from training.data import Dataset
from training.train import evaluate, seed_everything
from training.zoo import NetworkConfig, build_model

ETAS = (0.25, 0.5, 1.0, 2.0, 4.0)  # step sizes along -grad, in units of the learning rate


class NoisyShift(nn.Module):
    """``x * scale + shift`` per unit, both resampled at every training forward pass.

    scale ~ exp(N(0, (strength / 2)^2)), shift ~ N(0, strength^2): non-zero mean and
    non-unit variance that change every step. Identity in eval mode or when frozen.
    """

    def __init__(self, units: int, generator: torch.Generator, strength: float = 1.0) -> None:
        super().__init__()
        self.units, self.gen, self.strength = units, generator, strength
        self.frozen = False
        self.scale = torch.ones(units)
        self.shift = torch.zeros(units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if not self.frozen:
            z = torch.randn(2, self.units, generator=self.gen) * self.strength
            self.scale, self.shift = torch.exp(0.5 * z[0]), z[1]
        return x * self.scale + self.shift


def add_noise(model: nn.Module, seed: int, strength: float = 1.0) -> None:
    """Put a :class:`NoisyShift` right after every BatchNorm1d of ``model`` (in place)."""
    gen = torch.Generator().manual_seed(seed + 50_000)
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm1d):
                noise = NoisyShift(child.num_features, gen, strength)
                parent._modules[name] = nn.Sequential(child, noise)


def _set_frozen(model: nn.Module, frozen: bool) -> None:
    for m in model.modules():
        if isinstance(m, NoisyShift):
            m.frozen = frozen


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = nn.functional.cross_entropy(model(x), y)
    return out


def gradient_shift(
    model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, lr: float, k: int
) -> tuple[float, float]:
    """(||G - G'|| / ||G||, cos(G, G')) for the k-th Linear (0-based, k >= 1) of ``model``.

    G: the loss gradient w.r.t. that layer's weight. G': the same after every
    parameter of the top-level children *before* the one holding that layer took
    its plain SGD step ``-lr * grad`` on the same batch. Works on a copy.
    """
    probe = copy.deepcopy(model)
    _set_frozen(probe, True)
    target = _linears(probe)[k]
    children = list(probe.children())
    owner = next(i for i, c in enumerate(children) if any(m is target for m in c.modules()))
    earlier = [p for c in children[:owner] for p in c.parameters()]
    probe.zero_grad(set_to_none=True)
    _loss(probe, x, y).backward()  # type: ignore[no-untyped-call]
    assert target.weight.grad is not None
    g = target.weight.grad.detach().clone()
    with torch.no_grad():
        for p in earlier:
            if p.grad is not None:
                p.sub_(lr * p.grad)
    probe.zero_grad(set_to_none=True)
    _loss(probe, x, y).backward()  # type: ignore[no-untyped-call]
    g2 = target.weight.grad.detach()
    rel = float((g - g2).norm() / g.norm().clamp_min(1e-30))
    cos = float(nn.functional.cosine_similarity(g.flatten(), g2.flatten(), dim=0))
    return rel, cos


@torch.no_grad()
def layer_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mean, std) per unit of the input to every Linear but the first (training mode)."""
    stats: list[tuple[np.ndarray, np.ndarray]] = []
    probe = copy.deepcopy(model).train()
    _set_frozen(probe, False)
    hooks = [
        lin.register_forward_hook(
            lambda _m, inp, _o: stats.append(
                (inp[0].mean(0).numpy(), inp[0].std(0).numpy())  # (units,) each
            )
        )
        for lin in _linears(probe)[1:]
    ]
    probe(x)
    for h in hooks:
        h.remove()
    return stats


def input_drift(
    before: list[tuple[np.ndarray, np.ndarray]], after: list[tuple[np.ndarray, np.ndarray]]
) -> float:
    """Mean over layers and units of |mean change| / (earlier std + 1e-3)."""
    shifts = [
        np.abs(m1 - m0) / (s0 + 1e-3) for (m0, s0), (m1, _) in zip(before, after, strict=True)
    ]
    return float(np.mean(np.concatenate(shifts)))


def smoothness(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float
) -> tuple[float, float]:
    """(loss range, effective beta) along -grad at the step sizes ``lr * ETAS``.

    Loss range: max - min of the batch loss over those points and the current one.
    Effective beta: max over them of ||grad(w - eta g) - g|| / ||eta g||.
    """
    probe = copy.deepcopy(model)
    _set_frozen(probe, True)
    params = [p for p in probe.parameters() if p.requires_grad]
    probe.zero_grad(set_to_none=True)
    loss0 = _loss(probe, x, y)
    loss0.backward()  # type: ignore[no-untyped-call]
    g = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    start = [p.detach().clone() for p in params]
    g_norm = math.sqrt(sum(float((t * t).sum()) for t in g))
    losses, beta = [float(loss0.detach())], 0.0
    for eta in ETAS:
        with torch.no_grad():
            for p, p0, gi in zip(params, start, g, strict=True):
                p.copy_(p0 - eta * lr * gi)
        probe.zero_grad(set_to_none=True)
        loss = _loss(probe, x, y)
        loss.backward()  # type: ignore[no-untyped-call]
        losses.append(float(loss.detach()))
        change = math.sqrt(
            sum(
                float(((p.grad if p.grad is not None else 0.0) - gi).pow(2).sum())
                for p, gi in zip(params, g, strict=True)
            )
        )
        beta = max(beta, change / max(eta * lr * g_norm, 1e-30))
    finite = [v for v in losses if math.isfinite(v)]
    return (max(finite) - min(finite) if finite else math.inf), beta


@dataclass
class LandscapeRun:
    """Measurements every ``every`` steps of one run (lists: one value per measurement)."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    ics: list[float] = field(default_factory=list)  # mean over layers k >= 1 of the relative change
    ics_cos: list[float] = field(default_factory=list)
    drift: list[float] = field(default_factory=list)  # since the previous measurement
    loss_range: list[float] = field(default_factory=list)
    beta: list[float] = field(default_factory=list)
    test_accuracy: float = 0.0


def landscape_run(
    cfg: NetworkConfig, data: Dataset, *, lr: float, steps: int, every: int, seed: int, noise: float
) -> LandscapeRun:
    """Train with plain SGD (batch 64) for ``steps`` steps, measuring every ``every`` steps.

    ``noise`` > 0 puts a :class:`NoisyShift` of that strength after every BN layer.
    """
    seed_everything(seed)
    model = build_model(cfg, *data.standardization())
    if noise > 0:
        add_noise(model, seed, noise)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    X, Y = torch.from_numpy(data.X_train), torch.from_numpy(data.y_train)
    probe_x = torch.from_numpy(data.X_val[:256])
    out, previous = LandscapeRun(), layer_inputs(model, probe_x)
    depth = len(_linears(model))
    for step in range(steps):
        idx = torch.randint(0, len(X), (64,), generator=gen)
        model.train()
        loss = _loss(model, X[idx], Y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        if step % every == 0 and math.isfinite(float(loss.detach())):
            shifts = [gradient_shift(model, X[idx], Y[idx], lr, k) for k in range(1, depth)]
            out.steps.append(step)
            out.train_loss.append(float(loss.detach()))
            out.ics.append(float(np.mean([r for r, _ in shifts])))
            out.ics_cos.append(float(np.mean([c for _, c in shifts])))
            current = layer_inputs(model, probe_x)
            out.drift.append(input_drift(previous, current))
            previous = current
            rng, beta = smoothness(model, X[idx], Y[idx], lr)
            out.loss_range.append(rng)
            out.beta.append(beta)
        opt.step()
    out.test_accuracy = evaluate(model, data.X_test, data.y_test, torch.device("cpu"))[1]
    return out
