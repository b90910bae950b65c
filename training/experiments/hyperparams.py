"""Claim 2 (higher learning rates usable) and BN's weakness at very small batches.

Both sweep an optimization setting (learning rate, batch size) for the BN model
and its no-BN twin; see :mod:`training.experiments.claims` for the conventions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from training.experiments.plots import SweepPanel, plot_batch_sizes, plot_lr_sweep
from training.experiments.runs import (
    ACC_DELTA,
    ClaimResult,
    Runner,
    RunRecord,
    SuiteSettings,
    Table,
    tagged,
)
from training.experiments.stats import Comparison

USABLE_MARGIN = 0.05  # a learning rate is usable within 5 points of the sweep's best accuracy
BLOWUP_FACTOR = 2.0  # a training loss above this many times ln(classes) counts as diverged


def blew_up(run: RunRecord) -> bool:
    """Diverged: the training loss went non-finite or, in some epoch, above
    ``BLOWUP_FACTOR * ln(K)`` (K classes; ln K is the loss of a uniform guess).

    SGD at a too-large rate often sends the loss to 1e12 and back without ever
    producing NaN, which ``train()``'s own ``diverged`` flag does not catch.
    """
    limit = BLOWUP_FACTOR * math.log(run.model["num_classes"])
    return run.diverged or not all(math.isfinite(v) and v <= limit for v in run.loss_curve)


def lr_sweep(runner: Runner, s: SuiteSettings, fig_dir: Path) -> ClaimResult:
    """Claim 2: BN makes higher learning rates usable."""
    comps: list[Comparison] = []
    panels: list[SweepPanel] = []
    table_rows: list[list[Any]] = []
    records: list[dict[str, Any]] = []
    all_runs: list[RunRecord] = []
    arms = {"BN": True, "no BN": False}
    log_lrs = [math.log10(lr) for lr in s.lr_grid]
    for st in (st for st in s.settings if st.model == "mlp"):
        cells = {
            (arm, lr): runner.arm(
                st, s.seeds, {"norm": norm}, {"optimizer": "sgd", "lr": lr}, s.lr_epochs
            )
            for arm, norm in arms.items()
            for lr in s.lr_grid
        }
        best = max(float(np.mean([r.test_accuracy for r in runs])) for runs in cells.values())
        threshold = best - USABLE_MARGIN
        usable = {
            cell: [not blew_up(r) and r.test_accuracy >= threshold for r in runs]
            for cell, runs in cells.items()
        }
        max_lr: dict[str, list[float]] = {}
        width: dict[str, list[float]] = {}
        for arm in arms:
            per_seed = [[usable[arm, lr][i] for lr in s.lr_grid] for i in range(s.seeds)]
            max_lr[arm] = [
                max((lg for lg, u in zip(log_lrs, us, strict=True) if u), default=log_lrs[0] - 1)
                for us in per_seed
            ]
            width[arm] = [float(sum(us)) for us in per_seed]
        comps += [
            Comparison(
                f"{st.label}: largest usable learning rate",
                "log10 of the largest usable lr",
                "decades",
                "log10(lr) BN - log10(lr) no BN (none usable: one decade below the grid)",
                "BN",
                "no BN",
                max_lr["BN"],
                max_lr["no BN"],
                direction=1,
                delta=0.5,
                note=f"usable: did not diverge and test accuracy >= {threshold:.1%}",
            ),
            Comparison(
                f"{st.label}: usable decades",
                "usable grid points (one per decade)",
                "decades",
                "BN count - no-BN count",
                "BN",
                "no BN",
                width["BN"],
                width["no BN"],
                direction=1,
                delta=0.5,
                primary=False,
            ),
        ]
        for lr in s.lr_grid:
            row: list[Any] = [st.label, lr]
            for arm in arms:
                acc = [r.test_accuracy for r in cells[arm, lr]]
                row += [
                    [float(np.mean(acc)), float(np.std(acc, ddof=1))],
                    f"{sum(blew_up(r) for r in cells[arm, lr])}/{s.seeds}",
                    f"{sum(usable[arm, lr])}/{s.seeds}",
                ]
            table_rows.append(row)
        panels.append(
            SweepPanel(
                st.label,
                list(s.lr_grid),
                threshold,
                {
                    arm: [[r.test_accuracy for r in cells[arm, lr]] for lr in s.lr_grid]
                    for arm in arms
                },
                {
                    arm: [float(np.mean([blew_up(r) for r in cells[arm, lr]])) for lr in s.lr_grid]
                    for arm in arms
                },
            )
        )
        for (arm, lr), runs in cells.items():
            records += tagged(runs, setting=st.label, arm=arm, lr=lr)
            all_runs += runs
    plot_lr_sweep(fig_dir / "lr_sweep.png", panels)
    rates = ", ".join(f"{lr:g}" for lr in s.lr_grid)
    orders = math.log10(s.lr_grid[-1] / s.lr_grid[0])
    return ClaimResult(
        "lr-sweep",
        "BN makes higher learning rates usable",
        "With BN, training tolerates larger learning rates than without it.",
        f"MLP settings, BN vs no-BN twin, {s.seeds} seeds per learning rate. SGD with "
        f"momentum 0.9, weight decay 1e-4, constant rate, batch 64, {s.lr_epochs} epochs, at "
        f"learning rates {rates} ({orders:.0f} orders of magnitude). A run *diverged* when "
        f"its training loss became non-finite or an epoch's mean training loss exceeded "
        f"{BLOWUP_FACTOR:g} ln K (K classes; ln K is the loss of a uniform guess). The accuracy "
        f"shown is that of the checkpoint `train()` keeps (best validation accuracy, possibly "
        f"from before a blow-up). A rate is *usable* for a run when the run did not diverge "
        f"and its test accuracy is within {100 * USABLE_MARGIN:.0f} percentage points of the "
        f"best mean accuracy of any cell of the sweep. Metric: the largest usable rate per "
        f"seed, in decades (the grid's resolution is one decade, so seeds often agree exactly "
        f"and the CI then has zero width).",
        comps,
        tables=[
            Table(
                "Test accuracy, divergence and usability per learning rate",
                [
                    "setting",
                    "lr",
                    "BN accuracy",
                    "BN diverged",
                    "BN usable",
                    "no BN accuracy",
                    "no BN diverged",
                    "no BN usable",
                ],
                ["", "lr", "%", "", "", "%", "", ""],
                table_rows,
            )
        ],
        figures=["lr_sweep.png"],
        runs=records,
        notes=[
            f"Of {len(all_runs)} runs, {sum(blew_up(r) for r in all_runs)} diverged by this "
            f"definition, of which {sum(r.diverged for r in all_runs)} with a non-finite loss "
            f"(the only kind `train()`'s own `diverged` flag reports)."
        ],
    )


def batch_size(runner: Runner, s: SuiteSettings, fig_dir: Path) -> ClaimResult:
    """BN's known weakness: its advantage shrinks (or reverses) at very small batches."""
    st = s.settings[0]
    arms = {"BN": True, "no BN": False}
    acc: dict[str, list[list[float]]] = {arm: [] for arm in arms}  # arm -> per size: per seed
    comps: list[Comparison] = []
    records: list[dict[str, Any]] = []
    for bs in s.batch_sizes:
        for arm, norm in arms.items():
            runs = runner.arm(
                st, s.heavy_seeds, {"norm": norm}, {"batch_size": bs}, epochs=s.batch_epochs
            )
            acc[arm].append([r.test_accuracy for r in runs])
            records += tagged(runs, arm=arm, batch_size=bs)
        comps.append(
            Comparison(
                f"batch {bs}: test accuracy",
                "test accuracy",
                "%",
                "BN - no BN",
                "BN",
                "no BN",
                acc["BN"][-1],
                acc["no BN"][-1],
                direction=1,
                delta=ACC_DELTA,
                primary=False,
            )
        )
    advantage = {
        bs: [b - p for b, p in zip(acc["BN"][i], acc["no BN"][i], strict=True)]
        for i, bs in enumerate(s.batch_sizes)
    }
    ref = s.batch_reference
    primary = [
        Comparison(
            f"BN advantage at batch {ref} vs at batch {bs}",
            "BN - no BN test accuracy",
            "pp",
            f"advantage at {ref} - advantage at {bs}",
            f"batch {ref}",
            f"batch {bs}",
            advantage[ref],
            advantage[bs],
            direction=1,
            delta=ACC_DELTA,
        )
        for bs in s.small_batches
    ]
    plot_batch_sizes(
        fig_dir / "batch_size.png",
        list(s.batch_sizes),
        acc,
        f"{st.label}: test accuracy vs batch size ({s.batch_epochs} epochs)",
    )
    return ClaimResult(
        "batch-size",
        "BN is weak at very small batches",
        "BN's benefit shrinks or reverses when batches are tiny, because the batch statistics "
        "it normalizes with (and the running averages used at inference) become noisy.",
        f"{st.label}, BN vs no-BN twin, {s.heavy_seeds} seeds, AdamW lr 3e-3, constant rate, "
        f"{s.batch_epochs} epochs at each batch size {', '.join(map(str, s.batch_sizes))} "
        f"(so small batches take more steps). Metric: the BN advantage (BN - no BN test "
        f"accuracy, same seed) at batch {ref} minus the advantage at each very small batch.",
        primary + comps,
        figures=["batch_size.png"],
        runs=records,
    )
