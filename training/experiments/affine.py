"""Claim 8: gamma and beta restore what normalization takes away (the layer can be the identity).

A BN unit computes ``gamma * (x - mu) / sigma + beta``; it is the identity when
``gamma = sigma`` and ``beta = mu``. The experiment measures, per BN unit, how
far gamma and beta are from those values at initialization and after training.
"""

from __future__ import annotations

import math
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


@torch.no_grad()
def identity_distances(model: nn.Module, X: np.ndarray) -> tuple[float, float, list[float]]:
    """(median |ln(|gamma| / sigma)|, median |beta - mu| / sigma, [median gamma, median sigma])
    over every BN unit, with mu and sigma the BN input's per-unit statistics on ``X``."""
    inputs: list[torch.Tensor] = []
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    hooks = [bn.register_forward_hook(lambda _m, i, _o: inputs.append(i[0])) for bn in bns]
    model.eval()
    model(torch.from_numpy(X))
    for h in hooks:
        h.remove()
    log_ratio, shift, gammas, sigmas = [], [], [], []
    for bn, x in zip(bns, inputs, strict=True):
        mu, sigma = x.mean(0), (x.var(0, unbiased=False) + bn.eps).sqrt()
        assert bn.weight is not None and bn.bias is not None
        log_ratio.append((bn.weight.abs().clamp_min(1e-12) / sigma).log().abs())
        shift.append((bn.bias - mu).abs() / sigma)
        gammas.append(bn.weight.abs())
        sigmas.append(sigma)
    return (
        float(torch.cat(log_ratio).median()),
        float(torch.cat(shift).median()),
        [float(torch.cat(gammas).median()), float(torch.cat(sigmas).median())],
    )


def _initial(runner: Runner, cfg: Any, data: Dataset, seed: int) -> nn.Module:
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
            cfg = st.model_config(data, norm=True)
            start.append(identity_distances(_initial(runner, cfg, data, seed), data.X_train))
        for i, (what, unit) in enumerate(
            (("|ln(gamma / sigma)|, median over units", "ln"),
             ("|beta - mu| / sigma, median over units", "std"))
        ):  # fmt: skip
            comps.append(
                Comparison(
                    f"{st.label}: {what}",
                    what,
                    unit,
                    "at init - after training",
                    "after training",
                    "at init",
                    [float(e[i]) for e in end],  # type: ignore[arg-type]
                    [float(b[i]) for b in start],  # type: ignore[arg-type]
                    direction=-1,
                    delta=0.05,
                )
            )
        for label, vals in (("at init", start), ("after training", end)):
            rows.append(
                [st.label, label]
                + [[float(np.mean(c)), float(np.std(c, ddof=1))] for c in zip(*[
                    (v[0], v[1], v[2][0], v[2][1]) for v in vals], strict=True)]
            )  # fmt: skip
        panels_g.append(
            BarPanel(st.label, {"init": [b[0] for b in start], "end": [e[0] for e in end]})
        )
        panels_b.append(
            BarPanel(st.label, {"init": [b[1] for b in start], "end": [e[1] for e in end]})
        )
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
        f"gamma = sigma and beta = mu. Metrics: the median over units of |ln(gamma / sigma)| "
        f"and of |beta - mu| / sigma, after training vs at initialization (gamma = 1, "
        f"beta = 0) of the same seed.",
        comps,
        reading="distance of gamma from sigma and of beta from mu, before vs after training",
        tables=[
            Table(
                "Medians over units (mean ± std over seeds)",
                ["setting", "when", "|ln(gamma/sigma)|", "|beta - mu|/sigma", "gamma", "sigma"],
                ["", "", "g", "g", "g", "g"],
                rows,
            )
        ],
        figures=["gamma_beta.png"],
        notes=[
            "The claim says the layer *can* learn the identity; this measures whether "
            "training moves it there. Moving towards it is not reaching it: the table "
            "gives the remaining distance."
        ],
        caveats=["two MLPs; sigma itself changes as earlier layers train"],
    )


__all__ = ["gamma_beta", "identity_distances", "math"]
