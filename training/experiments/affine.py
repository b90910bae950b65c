"""Claim 8: gamma and beta restore what normalization takes away (the layer can be the identity).

A BN unit computes ``gamma * (x - mu) / sigma + beta``; it is the identity when
``gamma = sigma`` and ``beta = mu``. The experiment measures, per BN unit, how
far gamma and beta are from those values at initialization and after training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.data import Dataset
from training.experiments.plots import BarPanel, plot_bars
from training.experiments.runs import ClaimResult, Runner, Table
from training.experiments.settings import SuiteSettings
from training.experiments.stats import Comparison
from training.train import seed_everything
from training.zoo import build_model

TRAIN = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}


@dataclass
class IdentityDistance:
    """Medians over a model's BN units; mu, sigma: the BN input's per-unit mean and std."""

    gamma: float  # |ln(|gamma| / sigma)|: 0 when gamma restores the input's scale
    beta: float  # |beta - mu| / sigma: 0 when beta restores the input's mean
    gamma_untrained: float  # |ln(1 / sigma)|: the same with gamma left at its initial 1
    beta_untrained: float  # |mu| / sigma: the same with beta left at its initial 0
    gamma_median: float
    sigma_median: float


@torch.no_grad()
def identity_distances(model: nn.Module, X: np.ndarray) -> IdentityDistance:
    """How far each BN unit of ``model`` is from the identity map, on inputs ``X`` (eval mode)."""
    inputs: list[torch.Tensor] = []
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    hooks = [bn.register_forward_hook(lambda _m, i, _o: inputs.append(i[0])) for bn in bns]
    model.eval()
    model(torch.from_numpy(X))
    for h in hooks:
        h.remove()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("g", "b", "g1", "b0", "gm", "s")}
    for bn, x in zip(bns, inputs, strict=True):
        mu, sigma = x.mean(0), (x.var(0, unbiased=False) + bn.eps).sqrt()
        assert bn.weight is not None and bn.bias is not None
        parts["g"].append((bn.weight.abs().clamp_min(1e-12) / sigma).log().abs())
        parts["b"].append((bn.bias - mu).abs() / sigma)
        parts["g1"].append(sigma.log().abs())
        parts["b0"].append(mu.abs() / sigma)
        parts["gm"].append(bn.weight.abs())
        parts["s"].append(sigma)
    med = {k: float(torch.cat(v).median()) for k, v in parts.items()}
    return IdentityDistance(med["g"], med["b"], med["g1"], med["b0"], med["gm"], med["s"])


def _initial(cfg: Any, data: Dataset, seed: int) -> nn.Module:
    seed_everything(seed)  # as train() does before it builds the model
    return build_model(cfg, *data.standardization())


def gamma_beta(runner: Runner, s: SuiteSettings, fig_dir: Path) -> ClaimResult:
    """Claim 8: training moves gamma towards sigma and beta towards mu."""
    comps: list[Comparison] = []
    rows: list[list[Any]] = []
    panels_g, panels_b = [], []
    for st in s.affine:
        end, start = [], []
        for seed in range(s.seeds):
            data = runner.data(st.dataset, seed)
            key = runner.run(st, seed, {"norm": True}, keep="last", **TRAIN)
            end.append(identity_distances(runner.models[key], data.X_train))
            init = _initial(st.model_config(data, norm=True), data, seed)
            start.append(identity_distances(init, data.X_train))
        for what, unit, attr in (
            ("|ln(gamma / sigma)|", "ln", "gamma"),
            ("|beta - mu| / sigma", "std", "beta"),
        ):
            learned = [getattr(e, attr) for e in end]
            comps += [
                Comparison(
                    f"{st.label}: {what} after training, learned vs left at its initial value",
                    what,
                    unit,
                    "untrained distance - learned distance",
                    "learned",
                    "initial value",
                    learned,
                    [getattr(e, f"{attr}_untrained") for e in end],
                    direction=-1,
                    delta=0.05,
                ),
                Comparison(
                    f"{st.label}: {what}, after training vs at initialization",
                    what,
                    unit,
                    "distance at init - distance after training",
                    "after training",
                    "at init",
                    learned,
                    [getattr(b, attr) for b in start],
                    direction=-1,
                    delta=0.05,
                    role="secondary",
                ),
            ]
        for label, vals in (("at init", start), ("after training", end)):
            cols = [
                [
                    v.gamma,
                    v.gamma_untrained,
                    v.beta,
                    v.beta_untrained,
                    v.gamma_median,
                    v.sigma_median,
                ]
                for v in vals
            ]
            rows.append(
                [st.label, label]
                + [[float(np.mean(c)), float(np.std(c, ddof=1))] for c in zip(*cols, strict=True)]
            )
        panels_g.append(BarPanel(st.label, {
            "init": [b.gamma for b in start],
            "end, learned": [e.gamma for e in end],
            "end, gamma = 1": [e.gamma_untrained for e in end],
        }))  # fmt: skip
        panels_b.append(BarPanel(st.label, {
            "init": [b.beta for b in start],
            "end, learned": [e.beta for e in end],
            "end, beta = 0": [e.beta_untrained for e in end],
        }))  # fmt: skip
    plot_bars(
        fig_dir / "gamma_beta.png",
        [
            ("|ln(gamma / sigma)| (0: identity)", panels_g),
            ("|beta - mu| / sigma (0: identity)", panels_b),
        ],
        "Distance of BN's affine parameters from the identity, per seed (median over units)",
        percent_rows=(),
    )
    return ClaimResult(
        "gamma-beta",
        8,
        "gamma and beta restore what normalization takes away",
        "BN's learned scale and shift let the layer undo the normalization: gamma moves "
        "towards the input's standard deviation and beta towards its mean.",
        f"BN MLPs ({', '.join(st.label for st in s.affine)}; "
        f"{', '.join(str(st.epochs) for st in s.affine)} epochs), SGD lr {TRAIN['lr']:g}, "
        f"momentum 0.9, **no weight decay** (which would pull gamma to 0), last epoch's "
        f"weights, {s.seeds} seeds. For every BN unit, mu and sigma are the mean and std of "
        f"its input over the training split (eval mode); the unit is the identity when "
        f"gamma = sigma and beta = mu. Distances are medians over units of |ln(gamma / sigma)| "
        f"and |beta - mu| / sigma. Since sigma and mu move too while the earlier layers "
        f"train, the primary comparison holds them fixed at their end-of-training values: the "
        f"learned gamma (beta) against gamma = 1 (beta = 0), the values it started from. "
        f"Before vs after training is secondary.",
        comps,
        reading="distance of the learned gamma (beta) from sigma (mu), against leaving it at 1 (0)",
        tables=[
            Table(
                "Medians over units (mean ± std over seeds)",
                [
                    "setting",
                    "when",
                    "|ln(gamma/sigma)|",
                    "same, gamma = 1",
                    "|beta - mu|/sigma",
                    "same, beta = 0",
                    "gamma",
                    "sigma",
                ],
                ["", "", "g", "g", "g", "g", "g", "g"],
                rows,
            )  # fmt: skip
        ],
        figures=["gamma_beta.png"],
        notes=[
            "The claim says the layer *can* learn the identity; this measures whether "
            "training moves it there. Moving towards it is not reaching it: the table "
            "gives the remaining distance."
        ],
        caveats=["two MLPs; sigma itself changes as earlier layers train"],
    )
