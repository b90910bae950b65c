"""Claims 3 and 5: BN as a regularizer, and BN before vs after the activation.

Every arm is tuned on validation (its own learning rate) before it runs on the
comparison seeds; see :mod:`training.experiments.speed` for the conventions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.experiments.plots import BarPanel, plot_bars
from training.experiments.runs import ACC_DELTA, SGD, ClaimResult, Runner, Table, grid_text, tagged
from training.experiments.settings import SuiteSettings
from training.experiments.speed import ARMS, speed_arms
from training.experiments.stats import Comparison


def regularization(runner: Runner, s: SuiteSettings, fig_dir: Path) -> ClaimResult:
    """Claim 3: BN regularizes (narrows the train/test gap); dropout as the reference."""
    st = s.regularization
    arms: dict[str, dict[str, Any]] = {
        "no BN": {"norm": False},
        "BN": {"norm": True},
        "dropout": {"norm": False, "dropout": s.dropout},
    }
    tuned = {
        arm: runner.tuned_arm(st, s.seeds, kw, s.reg_lrs, (0.0,), keep="last")
        for arm, kw in arms.items()
    }
    runs = {arm: r for arm, (_, r) in tuned.items()}
    gap = {a: [r.train_accuracy - r.test_accuracy for r in rs] for a, rs in runs.items()}
    test = {a: [r.test_accuracy for r in rs] for a, rs in runs.items()}
    loss_gap = {a: [r.test_loss - r.train_loss for r in rs] for a, rs in runs.items()}

    def comp(metric: str, unit: str, key: str, values: dict[str, list[float]], **kw: Any) -> Any:
        return Comparison(
            f"{st.label}: {metric}",
            metric,
            unit,
            kw.pop("definition"),
            key,
            "no BN",
            values[key],
            values["no BN"],
            **kw,
        )

    comps = [
        comp("test accuracy", "%", "BN", test, definition="BN - no BN", direction=1,
             delta=ACC_DELTA),
        comp("train - test accuracy gap", "pp", "BN", gap, definition="no-BN gap - BN gap",
             direction=-1, delta=ACC_DELTA),
        comp("test - train loss gap", "nats", "BN", loss_gap, definition="no-BN gap - BN gap",
             direction=-1, delta=0.05, role="secondary"),
        comp("test accuracy, dropout (reference)", "%", "dropout", test,
             definition="dropout - no BN", direction=1, delta=ACC_DELTA, role="secondary"),
        comp("accuracy gap, dropout (reference)", "pp", "dropout", gap,
             definition="no-BN gap - dropout gap", direction=-1, delta=ACC_DELTA,
             role="secondary"),
    ]  # fmt: skip
    rows = []
    for arm, rs in runs.items():
        tr = [r.train_accuracy for r in rs]
        rows.append(
            [
                arm,
                grid_text(tuned[arm][0]),
                [np.mean(tr), np.std(tr, ddof=1)],
                [np.mean(test[arm]), np.std(test[arm], ddof=1)],
                [np.mean(gap[arm]), np.std(gap[arm], ddof=1)],
            ]
        )
    plot_bars(
        fig_dir / "regularization.png",
        [
            ("test accuracy (%)", [BarPanel(st.label, test)]),
            ("train - test accuracy (pp)", [BarPanel(st.label, gap)]),
        ],
        f"{s.small_train} training digits, last epoch of {st.epochs} (bars: mean, dots: seeds)",
        percent_rows=(0, 1),
    )
    return ClaimResult(
        "regularization",
        3,
        "BN acts as a regularizer",
        "BN reduces overfitting: with BN the model generalizes better, with a smaller gap "
        "between training and test accuracy.",
        f"digits MLP (width {st.width}) trained on a stratified subset of {s.small_train} "
        f"training images (validation and test splits unchanged) for {st.epochs} epochs with "
        f"AdamW (weight decay 1e-4, constant rate); the **last** epoch's weights are evaluated "
        f"(no checkpoint selection, so no early stopping). Arms: no BN, BN, and dropout "
        f"{s.dropout:g} without BN as a known regularizer (the reference that shows whether "
        f"the setup can see regularization at all). Each arm's rate is chosen on validation "
        f"from {', '.join(f'{x:g}' for x in s.reg_lrs)}; {s.seeds} seeds. Metrics: test "
        f"accuracy and the train - test accuracy gap.",
        comps,
        reading="test accuracy and generalization gap on 200 training images, no early stopping",
        tables=[
            Table(
                "Per arm (mean ± std over seeds)",
                ["arm", "chosen on validation", "train accuracy", "test accuracy", "gap"],
                ["", "", "%", "%", "pp"],
                rows,
            )
        ],
        figures=["regularization.png"],
        runs=[rec for arm, rs in runs.items() for rec in tagged(rs, arm=arm)],
        caveats=["one small MLP on one small task"],
    )


def placement(runner: Runner, s: SuiteSettings, fig_dir: Path) -> ClaimResult:
    """Claim 5: BN before the activation works better than after it."""
    comps: list[Comparison] = []
    panels: list[BarPanel] = []
    records: list[dict[str, Any]] = []
    choices = []
    for st in s.speed[:2]:
        base = speed_arms(runner, st, s)
        after_t, after = runner.tuned_arm(
            st,
            s.seeds,
            {"norm": True, "bn_position": "after"},
            st.lrs,
            st.warmups,
            epochs=st.epochs,
            **SGD,
        )
        before_t, before = base["BN"]
        acc = {
            "BN before": [r.test_curve[-1] for r in before],
            "BN after": [r.test_curve[-1] for r in after],
            "no BN": [r.test_curve[-1] for r in base["no BN"][1]],
        }
        comps.append(
            Comparison(
                f"{st.label}: test accuracy after {st.epochs} epochs",
                "test accuracy",
                "%",
                "before - after",
                "BN before",
                "BN after",
                acc["BN before"],
                acc["BN after"],
                direction=1,
                delta=ACC_DELTA,
            )
        )
        choices.append(f"{st.label}: before {grid_text(before_t)}, after {grid_text(after_t)}")
        panels.append(BarPanel(st.label, acc))
        records += tagged(after, setting=st.label, arm="BN after")
    plot_bars(
        fig_dir / "placement.png",
        [("test accuracy, last epoch (%)", panels)],
        "BN before vs after the activation (no BN for reference)",
        percent_rows=(0,),
    )
    return ClaimResult(
        "placement",
        5,
        "BN before the activation works better than after",
        "Placing BN between the linear/conv layer and the activation (layer -> BN -> ReLU) "
        "gives better models than placing it after the activation (layer -> ReLU -> BN).",
        f"The settings, budgets and protocol of claim 1 for {len(s.speed[:2])} models, "
        f"`bn_position='before'` vs `'after'`, each placement with its own rate chosen on "
        f"validation ({'; '.join(choices)}); {s.seeds} seeds. In 'after' mode every conv "
        f"keeps its bias (it feeds a ReLU, not BN). Metric: last-epoch test accuracy.",
        comps,
        reading=f"last-epoch test accuracy; a difference under {100 * ACC_DELTA:.0f} point "
        "counts as none",
        figures=["placement.png"],
        runs=records,
        notes=[f"Arms of the no-BN reference: {', '.join(ARMS)}, from claim 1's runs."],
        caveats=["two small models; a difference under 1 point counts as none"],
    )
