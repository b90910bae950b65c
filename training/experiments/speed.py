"""Claims 1 and 9: BN trains in fewer epochs, and improves convergence in most models.

Both compare each setting's BN model with its no-BN twin, each arm with its own
learning rate and warm-up (:meth:`Runner.tuned`), trained with SGD for the
setting's budget on the comparison seeds; the runs are shared (one cache).
Seed ``i`` fixes both the data split and the initialization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.experiments.plots import BarPanel, CurvePanel, plot_bars, plot_learning_curves
from training.experiments.runs import (
    ACC_DELTA,
    SGD,
    TUNING_SEED0,
    ClaimResult,
    Runner,
    RunRecord,
    Table,
    Tuned,
    grid_text,
    tagged,
)
from training.experiments.settings import Setting, SuiteSettings
from training.experiments.stats import Comparison

ARMS = {"BN": {"norm": True}, "no BN": {"norm": False}}


def epochs_to_target(curve: list[float], target: float, budget: int) -> int:
    """First epoch (1-based) with accuracy >= ``target``; ``budget + 1`` if never."""
    return next((i + 1 for i, acc in enumerate(curve) if acc >= target), budget + 1)


def grid_scores(t: Tuned) -> str:
    """``0.03/0: 91.2%, 0.1/1: 93.0%``: every (lr, warm-up) tried and its score."""
    return ", ".join(f"{lr:g}/{w:g}: {100 * score:.1f}%" for lr, w, score in t.grid)


def late_gain(curve: list[float]) -> float:
    """Accuracy gained over the last quarter of the budget: ~0 once a curve has flattened."""
    k = max(1, len(curve) // 4)
    return curve[-1] - curve[-1 - k] if len(curve) > k else 0.0


def speed_arms(
    runner: Runner, st: Setting, s: SuiteSettings
) -> dict[str, tuple[Tuned, list[RunRecord]]]:
    """Each arm tuned on validation, then run on the comparison seeds (cached)."""
    return {
        arm: runner.tuned_arm(
            st, s.seeds, kw, st.lrs, st.warmups, epochs=st.budget(kw["norm"]), **SGD
        )
        for arm, kw in ARMS.items()
    }


def reference_accuracy(runner: Runner, st: Setting, s: SuiteSettings, t: Tuned, kw: Any) -> float:
    """Mean best validation accuracy of an arm's tuning runs at its chosen rate."""
    seeds = range(TUNING_SEED0, TUNING_SEED0 + s.tuning_seeds)
    runs = [
        runner.record(
            runner.run(
                st, seed, kw, lr=t.lr, warmup_epochs=t.warmup, epochs=st.budget(kw["norm"]), **SGD
            )
        )
        for seed in seeds
    ]
    return float(np.mean([max(r.val_curve) for r in runs]))


def epochs(runner: Runner, s: SuiteSettings, fig_dir: Path) -> ClaimResult:
    """Claim 1: BN reaches a target test accuracy in fewer epochs, both arms tuned."""
    comps: list[Comparison] = []
    panels: list[CurvePanel] = []
    rows: list[list[Any]] = []
    tuning: list[list[Any]] = []
    records: list[dict[str, Any]] = []
    for st in s.speed:
        arms = speed_arms(runner, st, s)
        tuning += [[st.label, arm, grid_scores(t)] for arm, (t, _) in arms.items()]
        ref = min(reference_accuracy(runner, st, s, arms[a][0], ARMS[a]) for a in ARMS)
        for i, frac in enumerate(s.target_fractions):
            target = frac * ref
            e = {
                a: [
                    float(epochs_to_target(r.test_curve, target, st.budget(ARMS[a]["norm"])))
                    for r in runs
                ]
                for a, (_, runs) in arms.items()
            }
            reached = ", ".join(
                f"{a} {sum(v <= st.budget(ARMS[a]['norm']) for v in e[a])}/{s.seeds}" for a in e
            )
            comps.append(
                Comparison(
                    f"{st.label}: epochs to {target:.1%} test accuracy ({frac:.0%} of reference)",
                    "epochs to target",
                    "epochs",
                    "no-BN epochs - BN epochs (never reached: budget + 1)",
                    "BN",
                    "no BN",
                    e["BN"],
                    e["no BN"],
                    direction=-1,
                    delta=1.0,
                    role="primary" if i == 0 else "sensitivity",
                    note=f"reached: {reached}",
                )
            )
        for arm, (t, runs) in arms.items():
            final = [r.test_curve[-1] for r in runs]
            gain = [late_gain(r.test_curve) for r in runs]
            rows.append(
                [
                    st.label,
                    arm,
                    grid_text(t),
                    st.budget(ARMS[arm]["norm"]),
                    [float(np.mean(final)), float(np.std(final, ddof=1))],
                    [float(np.mean(gain)), float(np.std(gain, ddof=1))],
                ]
            )
            records += tagged(runs, setting=st.label, arm=arm)
        panels.append(
            CurvePanel(
                f"{st.label}\n" + ", ".join(f"{a}: {grid_text(t)}" for a, (t, _) in arms.items()),
                s.target_fractions[0] * ref,
                {a: [r.test_curve for r in runs] for a, (_, runs) in arms.items()},
            )
        )
    plot_learning_curves(fig_dir / "epochs.png", panels, "test accuracy")
    stuck = [f"{row[0]} {row[1]}" for row in rows if row[4][0] < 1.5 / 10]  # 10 classes
    notes = (
        [
            f"Stayed at chance (mean final test accuracy under 15%) at its tuned rate: "
            f"{', '.join(stuck)}; its tuning grid below shows every rate tried did the same. "
            f"Its epochs to target count as budget + 1 (never reached)."
        ]
        if stuck
        else []
    )
    budgets = "; ".join(
        f"{st.label}: {st.epochs}"
        + (f" (BN), {st.plain_epochs} (no BN)" if st.plain_epochs else "")
        + " epochs"
        for st in s.speed
    )
    return ClaimResult(
        "epochs",
        1,
        "BN trains in fewer epochs",
        "Networks with BN train in far fewer epochs than without it.",
        f"Zoo models with BN and their `norm=False` twins; `digits_hard` is the harder image "
        f"task (digits upsampled to 12x12, rotated, shifted, occluded, with pixel noise). "
        f"SGD (momentum 0.9, weight decay 1e-4, constant rate after an optional linear "
        f"warm-up), batch 64. Each arm gets its own learning rate (and warm-up) from a "
        f"half-decade grid, chosen by the mean validation accuracy over the epochs on "
        f"{s.tuning_seeds} tuning seeds that the comparison never uses; then {s.seeds} "
        f"comparison seeds. Budgets (the no-BN arm of the image models gets more epochs, "
        f"since its curve rises for longer): {budgets}. Target: a fraction of "
        f"the reference accuracy (the lower of the two arms' mean best validation accuracy on "
        f"the tuning seeds), {s.target_fractions[0]:.0%} primary, the others as sensitivity rows. "
        f"Metric: the first epoch whose *test* accuracy reaches the target.",
        comps,
        reading="epochs to a common test-accuracy target, each arm at its own tuned rate",
        tables=[
            Table(
                "Chosen rates, budgets and whether the curves flattened",
                [
                    "setting",
                    "arm",
                    "chosen on validation",
                    "budget (epochs)",
                    "final test accuracy",
                    "test accuracy gained in the last quarter of the budget",
                ],
                ["", "", "", "", "%", "pp"],
                rows,
            ),
            Table(
                "Tuning grids: lr / warm-up epochs: mean validation accuracy over the epochs",
                ["setting", "arm", "grid (tuning seeds)"],
                ["", "", ""],
                tuning,
            ),
        ],
        figures=["epochs.png"],
        runs=records,
        notes=notes,
        caveats=["small models and datasets; epochs of 1-2k samples"]
        + [f"{x} never trained" for x in stuck],
    )


def convergence(runner: Runner, s: SuiteSettings, fig_dir: Path) -> ClaimResult:
    """Claim 9: BN improves convergence in most zoo models (final accuracy and loss)."""
    comps: list[Comparison] = []
    acc_panels, loss_panels = [], []
    for st in s.speed:
        arms = speed_arms(runner, st, s)
        final = {a: [r.test_curve[-1] for r in runs] for a, (_, runs) in arms.items()}
        loss = {a: [r.loss_curve[-1] for r in runs] for a, (_, runs) in arms.items()}
        budget = f"{st.epochs} epochs" + (
            f" (BN) and {st.plain_epochs} (no BN)" if st.plain_epochs else ""
        )
        comps += [
            Comparison(
                f"{st.label}: test accuracy after {budget}",
                "test accuracy",
                "%",
                "BN - no BN",
                "BN",
                "no BN",
                final["BN"],
                final["no BN"],
                direction=1,
                delta=ACC_DELTA,
            ),
            Comparison(
                f"{st.label}: training loss in the last epoch",
                "cross-entropy",
                "nats",
                "no-BN loss - BN loss",
                "BN",
                "no BN",
                loss["BN"],
                loss["no BN"],
                direction=-1,
                delta=0.02,
                role="secondary",
            ),
        ]
        if st.plain_epochs:
            comps.append(
                Comparison(
                    f"{st.label}: test accuracy after {st.epochs} epochs each",
                    "test accuracy",
                    "%",
                    "BN - no BN, both at the BN arm's budget",
                    "BN",
                    "no BN",
                    final["BN"],
                    [r.test_curve[st.epochs - 1] for r in arms["no BN"][1]],
                    direction=1,
                    delta=ACC_DELTA,
                    role="secondary",
                )
            )
        acc_panels.append(BarPanel(st.label, final))
        loss_panels.append(BarPanel(st.label, loss))
    plot_bars(
        fig_dir / "convergence.png",
        [("test accuracy, last epoch (%)", acc_panels), ("training loss, last epoch", loss_panels)],
        "Where each zoo model got in its own budget, each arm at its own tuned rate",
        percent_rows=(0,),
    )
    return ClaimResult(
        "convergence",
        9,
        "BN improves convergence in most models",
        "Across architectures, BN networks converge to better solutions in the same budget.",
        "The runs of claim 1 (each arm at its own tuned rate and warm-up, each with its own "
        f"budget, {s.seeds} seeds): every zoo model (mlp, cnn, resnet, mobilenet) on the harder "
        "image task, and the MLP on plain digits. Metric: test accuracy after each arm's last "
        "epoch (no checkpoint selection); the last epoch's training loss, and the accuracy "
        "of both arms at the BN arm's (shorter) budget, are secondary.",
        comps,
        reading="last-epoch test accuracy per zoo model, each arm at its own rate and budget",
        figures=["convergence.png"],
        caveats=["five small models; the harder task is still small (2.3k distorted digits)"],
    )
