"""Claims 1, 3 and 5: fewer epochs, regularization, BN before vs after the activation.

Each experiment takes a :class:`Runner`, the suite's budgets and the figure
directory, writes its figure and returns a :class:`ClaimResult` whose
comparisons carry every per-seed number the verdict is computed from. All
three reuse the same default runs (the runner's cache trains them once).
Seed ``i`` fixes both the data split and the initialization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.experiments.plots import BarPanel, CurvePanel, plot_bars, plot_learning_curves
from training.experiments.report import format_ci, format_effect
from training.experiments.runs import (
    ACC_DELTA,
    OPTIMIZERS,
    ClaimResult,
    Runner,
    RunRecord,
    SuiteSettings,
    Table,
    tagged,
)
from training.experiments.stats import Comparison


def epochs_to_target(curve: list[float], target: float, budget: int) -> int:
    """First epoch (1-based) with validation accuracy >= ``target``; ``budget + 1`` if never."""
    return next((i + 1 for i, acc in enumerate(curve) if acc >= target), budget + 1)


def _seconds_to_target(run: RunRecord, target: float) -> float:
    """Wall time to the target epoch, or the whole run's time when it never got there."""
    k = epochs_to_target(run.val_curve, target, len(run.val_curve))
    return run.time_curve[min(k, len(run.time_curve)) - 1]


def epochs(runner: Runner, s: SuiteSettings, fig_dir: Path) -> ClaimResult:
    """Claim 1: BN reaches a target validation accuracy in fewer epochs."""
    variants = [(st, "adamw") for st in s.settings] + [(s.settings[0], "sgd")]
    comps: list[Comparison] = []
    panels: list[CurvePanel] = []
    rows: list[list[Any]] = []
    records: list[dict[str, Any]] = []
    for st, opt in variants:
        label = f"{st.label} ({opt})"
        bn = runner.arm(st, s.seeds, {"norm": True}, OPTIMIZERS[opt])
        plain = runner.arm(st, s.seeds, {"norm": False}, OPTIMIZERS[opt])
        e_bn = [float(epochs_to_target(r.val_curve, st.target, st.epochs)) for r in bn]
        e_plain = [float(epochs_to_target(r.val_curve, st.target, st.epochs)) for r in plain]
        reached = (
            f"reached target: BN {sum(e <= st.epochs for e in e_bn)}/{len(bn)}, "
            f"no BN {sum(e <= st.epochs for e in e_plain)}/{len(plain)}"
        )
        comps.append(
            Comparison(
                f"{label}: epochs to {st.target:.0%} val. accuracy",
                "epochs to target",
                "epochs",
                "no-BN epochs - BN epochs (runs that never reach it count budget + 1)",
                "BN",
                "no BN",
                e_bn,
                e_plain,
                direction=-1,
                delta=1.0,
                note=reached,
            )
        )
        t_bn = [_seconds_to_target(r, st.target) for r in bn]
        t_plain = [_seconds_to_target(r, st.target) for r in plain]
        comps.append(
            Comparison(
                f"{label}: wall time to target",
                "seconds to target",
                "s",
                "no-BN seconds - BN seconds (never reached: whole run)",
                "BN",
                "no BN",
                t_bn,
                t_plain,
                direction=-1,
                delta=0.1 * float(np.mean(t_plain)),
                primary=False,
                note="delta = 10% of the no-BN mean",
            )
        )
        per_epoch = [[r.seconds / max(len(r.val_curve), 1) for r in arm] for arm in (bn, plain)]
        rows.append(
            [
                label,
                st.epochs,
                [np.mean(per_epoch[0]), np.std(per_epoch[0], ddof=1)],
                [np.mean(per_epoch[1]), np.std(per_epoch[1], ddof=1)],
            ]
        )
        panels.append(
            CurvePanel(
                label,
                st.target,
                {"BN": [r.val_curve for r in bn], "no BN": [r.val_curve for r in plain]},
            )
        )
        records += tagged(bn, variant=label, arm="BN") + tagged(plain, variant=label, arm="no BN")
    plot_learning_curves(fig_dir / "epochs.png", panels)
    settings_text = "; ".join(
        f"{st.label}: target {st.target:.0%}, budget {st.epochs} epochs"
        + (f", width {st.width}" if st.width else "")
        for st in s.settings
    )
    return ClaimResult(
        "epochs",
        "BN trains in fewer epochs",
        "A network with BN reaches a given accuracy in fewer epochs than its no-BN twin.",
        f"Zoo models with BN (Linear/Conv -> BN -> ReLU) and their `norm=False` twins, "
        f"{s.seeds} seeds each. {settings_text}. AdamW (lr 3e-3, weight decay 1e-4) with a "
        f"constant rate, batch 64; the first setting is repeated with SGD (lr 0.01, "
        f"momentum 0.9). Metric: the first epoch whose validation accuracy reaches the target; "
        f"wall time to that epoch is secondary (single CPU thread).",
        comps,
        tables=[
            Table(
                "Cost of one epoch",
                ["setting", "budget (epochs)", "BN s/epoch", "no BN s/epoch"],
                ["", "", "s", "s"],
                rows,
            )
        ],
        figures=["epochs.png"],
        runs=records,
    )


def regularization(runner: Runner, s: SuiteSettings, fig_dir: Path) -> ClaimResult:
    """Claim 3: BN regularizes (narrows the train/test gap); dropout for comparison."""
    arms: dict[str, dict[str, Any]] = {
        "no BN": {"norm": False},
        "BN": {"norm": True},
        "dropout": {"norm": False, "dropout": s.dropout},
        "BN + dropout": {"norm": True, "dropout": s.dropout},
    }
    comps: list[Comparison] = []
    gap_panels, acc_panels = [], []
    rows: list[list[Any]] = []
    records: list[dict[str, Any]] = []
    for st in (st for st in s.settings if st.model == "mlp"):
        runs = {arm: runner.arm(st, s.seeds, kw) for arm, kw in arms.items()}
        gap = {arm: [r.train_accuracy - r.test_accuracy for r in rs] for arm, rs in runs.items()}
        loss_gap = {arm: [r.test_loss - r.train_loss for r in rs] for arm, rs in runs.items()}
        test = {arm: [r.test_accuracy for r in rs] for arm, rs in runs.items()}
        comps += [
            Comparison(
                f"{st.label}: train - test accuracy gap",
                "accuracy gap",
                "pp",
                "no-BN gap - BN gap",
                "BN",
                "no BN",
                gap["BN"],
                gap["no BN"],
                direction=-1,
                delta=ACC_DELTA,
            ),
            Comparison(
                f"{st.label}: test accuracy",
                "test accuracy",
                "%",
                "BN - no BN",
                "BN",
                "no BN",
                test["BN"],
                test["no BN"],
                direction=1,
                delta=ACC_DELTA,
                primary=False,
            ),
            Comparison(
                f"{st.label}: test - train loss gap",
                "cross-entropy gap",
                "nats",
                "no-BN gap - BN gap",
                "BN",
                "no BN",
                loss_gap["BN"],
                loss_gap["no BN"],
                direction=-1,
                delta=0.05,
                primary=False,
            ),
            Comparison(
                f"{st.label}: accuracy gap, dropout {s.dropout:g} (reference)",
                "accuracy gap",
                "pp",
                "no-dropout gap - dropout gap",
                "dropout",
                "no BN",
                gap["dropout"],
                gap["no BN"],
                direction=-1,
                delta=ACC_DELTA,
                primary=False,
            ),
        ]
        for arm, rs in runs.items():
            tr = [r.train_accuracy for r in rs]
            rows.append(
                [
                    st.label,
                    arm,
                    [np.mean(tr), np.std(tr, ddof=1)],
                    [np.mean(test[arm]), np.std(test[arm], ddof=1)],
                    [np.mean(gap[arm]), np.std(gap[arm], ddof=1)],
                    [np.mean(loss_gap[arm]), np.std(loss_gap[arm], ddof=1)],
                ]
            )
            records += tagged(rs, setting=st.label, arm=arm)
        gap_panels.append(BarPanel(st.label, gap))
        acc_panels.append(BarPanel(st.label, test))
    plot_bars(
        fig_dir / "regularization.png",
        [("test accuracy (%)", acc_panels), ("train - test accuracy (pp)", gap_panels)],
        "Generalization with BN, dropout, both or neither (bars: mean, dots: seeds)",
    )
    return ClaimResult(
        "regularization",
        "BN acts as a regularizer",
        "BN reduces overfitting: the gap between training and test accuracy is smaller with BN.",
        f"The MLP settings of claim 1 (AdamW, constant rate, same budgets; the zoo CNN is left "
        f"out because its dropout acts only in the head) in four arms: no BN, BN, "
        f"dropout {s.dropout:g} without BN (a known regularizer, as a reference) and BN with "
        f"dropout; {s.seeds} seeds. Accuracies and losses are of the checkpoint `train()` keeps "
        f"(best validation accuracy), evaluated in eval mode on the training and test splits. "
        f"Metric: train accuracy - test accuracy.",
        comps,
        tables=[
            Table(
                "Per arm (mean ± std over seeds)",
                [
                    "setting",
                    "arm",
                    "train accuracy",
                    "test accuracy",
                    "accuracy gap",
                    "loss gap (nats)",
                ],
                ["", "", "%", "%", "pp", "nats"],
                rows,
            )
        ],
        figures=["regularization.png"],
        runs=records,
        notes=[
            "The kept checkpoint is chosen on validation accuracy, which is itself a mild "
            "form of early stopping for every arm alike.",
            _reference_note([c for c in comps if "(reference)" in c.label]),
        ],
    )


def _reference_note(references: list[Comparison]) -> str:
    """What the known regularizer (dropout) did, i.e. whether the setup can see regularization."""
    seen = ", ".join(
        f"{c.label.split(':')[0]}: {format_effect(c.effect, c.unit)} "
        f"{format_ci(c.ci_low, c.ci_high, c.unit)}, {c.outcome}"
        for c in references
    )
    if any(c.outcome == "positive" for c in references):
        return f"Dropout, the reference regularizer, narrowed the gap measurably ({seen})."
    return (
        f"Dropout, the reference regularizer, did not narrow the gap measurably either "
        f"({seen}), so at this size the setup has little power to detect regularization."
    )


def placement(runner: Runner, s: SuiteSettings, fig_dir: Path) -> ClaimResult:
    """Claim 5: BN before the activation works better than after it."""
    comps: list[Comparison] = []
    panels: list[BarPanel] = []
    records: list[dict[str, Any]] = []
    for st in s.settings:
        before = runner.arm(st, s.seeds, {"norm": True, "bn_position": "before"})
        after = runner.arm(st, s.seeds, {"norm": True, "bn_position": "after"})
        plain = runner.arm(st, s.seeds, {"norm": False})
        comps.append(
            Comparison(
                f"{st.label}: test accuracy",
                "test accuracy",
                "%",
                "before - after",
                "BN before",
                "BN after",
                [r.test_accuracy for r in before],
                [r.test_accuracy for r in after],
                direction=1,
                delta=ACC_DELTA,
            )
        )
        comps.append(
            Comparison(
                f"{st.label}: epochs to {st.target:.0%} val. accuracy",
                "epochs to target",
                "epochs",
                "after epochs - before epochs",
                "BN before",
                "BN after",
                [float(epochs_to_target(r.val_curve, st.target, st.epochs)) for r in before],
                [float(epochs_to_target(r.val_curve, st.target, st.epochs)) for r in after],
                direction=-1,
                delta=1.0,
                primary=False,
            )
        )
        panels.append(
            BarPanel(
                st.label,
                {
                    "BN before": [r.test_accuracy for r in before],
                    "BN after": [r.test_accuracy for r in after],
                    "no BN": [r.test_accuracy for r in plain],
                },
            )
        )
        for arm, runs in (("BN before", before), ("BN after", after)):
            records += tagged(runs, setting=st.label, arm=arm)
    plot_bars(
        fig_dir / "placement.png",
        [("test accuracy (%)", panels)],
        "BN before vs after the activation (no BN for reference)",
    )
    return ClaimResult(
        "placement",
        "BN before the activation works better than after",
        "Placing BN between the linear/conv layer and the activation (layer -> BN -> ReLU) "
        "gives better models than placing it after the activation (layer -> ReLU -> BN).",
        f"The settings and budgets of claim 1 (AdamW, constant rate), `bn_position='before'` "
        f"vs `'after'`, {s.seeds} seeds. Metric: test accuracy of the kept checkpoint; epochs "
        f"to the target validation accuracy is secondary.",
        comps,
        figures=["placement.png"],
        runs=records,
    )
