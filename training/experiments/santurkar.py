"""Claims 6 and 7: BN fixes internal covariate shift; BN smooths the loss.

Three arms on the same seeds and the same plain-SGD rate: no BN, BN, and
"noisy BN" (BN followed by a random per-unit scale and shift resampled every
step, :class:`~training.experiments.landscape.NoisyShift`). The measurements
are those of :mod:`training.experiments.landscape`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.experiments.landscape import ETAS, LandscapeRun, landscape_run
from training.experiments.plots import StepPanel, plot_steps
from training.experiments.runs import ACC_DELTA, ClaimResult, Runner
from training.experiments.settings import SuiteSettings
from training.experiments.stats import Comparison, Role

ARMS = {"BN": (True, 0.0), "no BN": (False, 0.0), "noisy BN": (True, 1.0)}
MILD = "noisy BN, mild"  # the sensitivity arm: a quarter of the noise
MILD_STRENGTH = 0.25


def _runs(runner: Runner, s: SuiteSettings) -> dict[str, list[LandscapeRun]]:
    if "landscape" not in runner.memo:
        st = s.santurkar
        out: dict[str, list[LandscapeRun]] = {}
        for arm, (norm, noise) in {**ARMS, MILD: (True, MILD_STRENGTH)}.items():
            out[arm] = []
            for seed in range(s.seeds):
                data = runner.data(st.dataset, seed)
                runner.trained += 1
                out[arm].append(
                    landscape_run(
                        st.model_config(data, norm=norm, init="he"),
                        data,
                        lr=s.santurkar_lr,
                        steps=s.santurkar_steps,
                        every=s.santurkar_every,
                        seed=seed,
                        noise=noise,
                    )
                )
        runner.memo["landscape"] = out
    result: dict[str, list[LandscapeRun]] = runner.memo["landscape"]
    return result


def _setup(s: SuiteSettings) -> str:
    st = s.santurkar
    return (
        f"Santurkar et al. (NeurIPS 2018) scaled down: {st.label} (ReLU, {st.depth} hidden "
        f"layers of {st.width}, He initialization so that the no-BN net's gradients neither "
        f"vanish nor explode), batch 64, plain SGD (no momentum, no weight decay) at lr "
        f"{s.santurkar_lr:g} for all arms: no BN, BN, and noisy BN (BN followed by a per-unit "
        f"random scale exp(N(0, 0.5^2)) and shift N(0, 1), resampled at every step; a mild "
        f"version with a quarter of that noise, exp(N(0, 0.125^2)) and N(0, 0.25^2), gives "
        f"the sensitivity row), "
        f"{s.santurkar_steps} steps, measured every {s.santurkar_every} steps on that step's "
        f"batch, {s.seeds} seeds. Per-seed values are means over the measurements."
    )


def _mean(values: list[float], skip_first: bool = False) -> float:
    v = [x for x in (values[1:] if skip_first else values) if math.isfinite(x)]
    return float(np.mean(v)) if v else 0.0


def _log_mean(values: list[float]) -> float:
    return math.log10(max(_mean(values), 1e-30))


def covariate_shift(runner: Runner, s: SuiteSettings, fig_dir: Path) -> ClaimResult:
    """Claim 6: BN fixes internal covariate shift."""
    runs = _runs(runner, s)

    def comp(
        label: str,
        unit: str,
        a: str,
        b: str,
        f: Callable[[LandscapeRun], float],
        direction: int,
        delta: float,
        definition: str,
        role: Role = "primary",
    ) -> Comparison:
        fn = f
        return Comparison(
            label,
            label,
            unit,
            definition,
            a,
            b,
            [fn(r) for r in runs[a]],
            [fn(r) for r in runs[b]],
            direction=direction,
            delta=delta,
            role=role,
        )

    comps = [
        comp("layer-input drift (|mean change| / std per unit)", "std", "BN", "no BN",
             lambda r: _mean(r.drift, skip_first=True), -1, 0.05, "no BN - BN"),
        comp("ICS: relative change of a layer's gradient when earlier layers step", "ratio",
             "BN", "no BN", lambda r: _mean(r.ics), -1, 0.05, "no BN - BN"),
        comp(f"test accuracy after {s.santurkar_steps} steps", "%", "BN", "noisy BN",
             lambda r: r.test_accuracy, 1, ACC_DELTA, "BN - noisy BN"),
        comp(f"test accuracy after {s.santurkar_steps} steps, mild noise", "%", "BN", MILD,
             lambda r: r.test_accuracy, 1, ACC_DELTA, "BN - noisy BN (mild)", "sensitivity"),
        comp("layer-input drift, mild noisy BN vs no BN", "std", MILD, "no BN",
             lambda r: _mean(r.drift, skip_first=True), 1, 0.05, "noisy BN (mild) - no BN",
             "secondary"),
        comp("layer-input drift, noisy BN vs no BN", "std", "noisy BN", "no BN",
             lambda r: _mean(r.drift, skip_first=True), 1, 0.05, "noisy BN - no BN",
             "secondary"),
        comp("test accuracy, noisy BN vs no BN", "%", "noisy BN", "no BN",
             lambda r: r.test_accuracy, 1, ACC_DELTA, "noisy BN - no BN", "secondary"),
        comp("ICS: cosine of a layer's gradient before/after earlier layers step", "cos",
             "BN", "no BN", lambda r: _mean(r.ics_cos), 1, 0.05, "BN - no BN", "secondary"),
    ]  # fmt: skip
    steps = runs["BN"][0].steps
    plot_steps(
        fig_dir / "covariate_shift.png",
        steps,
        [
            StepPanel(
                "layer-input drift between measurements",
                "|d mean| / std",
                {a: [r.drift for r in rs] for a, rs in runs.items()},
                skip_first=True,
            ),
            StepPanel(
                "ICS (Santurkar): ||G - G'|| / ||G||",
                "relative change",
                {a: [r.ics for r in rs] for a, rs in runs.items()},
            ),
            StepPanel(
                "training loss (batch)",
                "cross-entropy",
                {a: [r.train_loss for r in rs] for a, rs in runs.items()},
            ),
        ],  # fmt: skip
        "Internal covariate shift: BN, no BN and noisy BN (mean ± 1 std over seeds)",
    )
    return ClaimResult(
        "covariate-shift",
        6,
        "BN fixes internal covariate shift",
        "BN works by fixing internal covariate shift: every layer's input keeps a similar mean "
        "and spread while the earlier layers train.",
        _setup(s) + " *Drift*: mean over hidden layers and units of |change of the unit's "
        "mean input| / its earlier std, between consecutive measurements (on 256 validation "
        "rows, training mode). *ICS* as Santurkar et al. define it: G is the gradient of "
        "layer k's weight, G' the same after all earlier layers took their SGD step on the "
        "batch; the relative change ||G - G'|| / ||G||, averaged over layers k >= 2. If "
        "the claim's mechanism were right, BN would cut both, and noisy BN (shift restored) "
        "would train worse than BN.",
        comps,
        reading="layer-input drift, Santurkar's gradient ICS, and whether noisy BN trains as "
        "well as BN",
        figures=["covariate_shift.png"],
        caveats=["one 4-layer MLP, 300 steps, one common rate for the three arms"],
    )


def smooth_loss(runner: Runner, s: SuiteSettings, fig_dir: Path) -> ClaimResult:
    """Claim 7: BN smooths the loss (along the gradient direction)."""
    runs = _runs(runner, s)
    comps = []
    for label, attr in (
        ("loss range along the gradient (log10)", "loss_range"),
        ("effective beta-smoothness (log10)", "beta"),
    ):
        comps.append(
            Comparison(
                label,
                label,
                "decades",
                "log10 no BN - log10 BN",
                "BN",
                "no BN",
                [_log_mean(getattr(r, attr)) for r in runs["BN"]],
                [_log_mean(getattr(r, attr)) for r in runs["no BN"]],
                direction=-1,
                delta=0.1,
            )
        )
    plot_steps(
        fig_dir / "smoothness.png",
        runs["BN"][0].steps,
        [
            StepPanel(
                "loss range along -gradient",
                "max - min loss (log scale)",
                {a: [r.loss_range for r in rs] for a, rs in runs.items()},
                log=True,
            ),
            StepPanel(
                "effective beta-smoothness",
                "max ||dg|| / ||step|| (log scale)",
                {a: [r.beta for r in rs] for a, rs in runs.items()},
                log=True,
            ),
        ],  # fmt: skip
        "Loss landscape along the gradient direction (mean ± 1 std over seeds)",
    )
    return ClaimResult(
        "smoothness",
        7,
        "BN smooths the loss function",
        "BN makes the loss landscape smoother: the loss and its gradient change less along "
        "a training step.",
        _setup(s) + f" At each measurement, with g the batch gradient, the loss and gradient "
        f"are evaluated at w - eta * g for eta = lr x {', '.join(f'{e:g}' for e in ETAS)}. "
        f"*Loss range*: max - min of the batch loss over those points and w. *Effective "
        f"beta*: max over them of ||grad(w - eta g) - g|| / ||eta g||. Metrics: log10 of "
        f"their means over the run.",
        comps,
        reading="loss range and gradient change along the gradient (Santurkar's measures)",
        figures=["smoothness.png"],
        caveats=["one MLP and one rate; BN rescales the gradient itself, so steps differ"],
    )
