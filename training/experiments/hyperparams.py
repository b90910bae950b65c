"""Claim 2 (higher learning rates usable) and BN's weakness at very small batches.

Both sweep an optimization setting (learning rate, batch size) for the BN model
and its no-BN twin on the same seeds; see :mod:`training.experiments.speed`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from training.experiments.plots import SweepPanel, plot_batch_sizes, plot_lr_sweep
from training.experiments.runs import (
    ACC_DELTA,
    SGD,
    ClaimResult,
    Runner,
    RunRecord,
    Table,
    tagged,
)
from training.experiments.settings import SuiteSettings
from training.experiments.stats import Comparison

BLOWUP_FACTOR = 2.0  # a training loss above this many times ln(classes) counts as diverged
ARMS = {"BN": True, "no BN": False}


def blew_up(run: RunRecord) -> bool:
    """Diverged: the training loss went non-finite or, in some epoch, above
    ``BLOWUP_FACTOR * ln(K)`` (K classes; ln K is the loss of a uniform guess).

    SGD at a too-large rate often sends the loss to 1e12 and back without ever
    producing NaN, which ``train()``'s own ``diverged`` flag does not catch.
    """
    limit = BLOWUP_FACTOR * math.log(run.model["num_classes"])
    return run.diverged or not all(math.isfinite(v) and v <= limit for v in run.loss_curve)


def final_accuracy(run: RunRecord) -> float:
    """Last-epoch test accuracy; a diverged run counts as a uniform guess (1/K)."""
    return 1.0 / run.model["num_classes"] if blew_up(run) else run.test_curve[-1]


def largest_usable(usable: list[bool], log_lrs: list[float]) -> float:
    """log10 of the largest usable rate; half a decade below the grid when none is."""
    below = log_lrs[0] - (log_lrs[1] - log_lrs[0] if len(log_lrs) > 1 else 1.0)
    return max((lg for lg, u in zip(log_lrs, usable, strict=True) if u), default=below)


def lr_sweep(runner: Runner, s: SuiteSettings, fig_dir: Path) -> ClaimResult:
    """Claim 2: BN makes higher learning rates usable (and training faster)."""
    comps: list[Comparison] = []
    panels: list[SweepPanel] = []
    table_rows: list[list[Any]] = []
    records: list[dict[str, Any]] = []
    log_lrs = [math.log10(lr) for lr in s.lr_grid]
    n_runs = n_blown = n_nan = 0
    for st in s.lr_settings:
        cells = {
            (arm, lr): runner.arm(st, s.seeds, {"norm": norm}, lr=lr, **SGD)
            for arm, norm in ARMS.items()
            for lr in s.lr_grid
        }
        acc = {cell: [final_accuracy(r) for r in runs] for cell, runs in cells.items()}
        best = max(float(np.mean(v)) for v in acc.values())
        for i, margin in enumerate(s.usable_margins):
            threshold = best - margin
            max_lr = {
                arm: [
                    largest_usable(
                        [
                            not blew_up(cells[arm, lr][k]) and acc[arm, lr][k] >= threshold
                            for lr in s.lr_grid
                        ],
                        log_lrs,
                    )
                    for k in range(s.seeds)
                ]
                for arm in ARMS
            }
            comps.append(
                Comparison(
                    f"{st.label}: largest usable learning rate, margin {100 * margin:.0f} pp",
                    "log10 of the largest usable lr",
                    "decades",
                    "log10(lr) BN - log10(lr) no BN",
                    "BN",
                    "no BN",
                    max_lr["BN"],
                    max_lr["no BN"],
                    direction=1,
                    delta=0.5,
                    role="primary" if i == 0 else "sensitivity",
                    note=f"usable: not diverged and last-epoch test accuracy >= {threshold:.1%}",
                )
            )
            if i == 0:
                panels.append(
                    SweepPanel(
                        st.label,
                        list(s.lr_grid),
                        threshold,
                        {a: [acc[a, lr] for lr in s.lr_grid] for a in ARMS},
                        {a: [[blew_up(r) for r in cells[a, lr]] for lr in s.lr_grid] for a in ARMS},
                    )
                )
        # speed at each arm's own best rate (chosen per seed on the validation curve)
        auc: dict[str, list[float]] = {}
        for arm in ARMS:
            auc[arm] = []
            for k in range(s.seeds):
                runs = [cells[arm, lr][k] for lr in s.lr_grid]
                pick = max(runs, key=lambda r: -1.0 if blew_up(r) else float(np.mean(r.val_curve)))
                auc[arm].append(float(np.mean(pick.test_curve)))
        comps.append(
            Comparison(
                f"{st.label}: mean test accuracy over the epochs, each arm at its best rate",
                "area under the test-accuracy curve",
                "%",
                "BN - no BN",
                "BN",
                "no BN",
                auc["BN"],
                auc["no BN"],
                direction=1,
                delta=ACC_DELTA,
                role="secondary",
                note="best rate per seed by the validation curve's mean",
            )
        )
        for lr in s.lr_grid:
            row: list[Any] = [st.label, lr]
            for arm in ARMS:
                runs = cells[arm, lr]
                ok = [a for r, a in zip(runs, acc[arm, lr], strict=True) if not blew_up(r)]
                row += [
                    [float(np.mean(ok)), float(np.std(ok, ddof=1))] if len(ok) > 1 else "-",
                    f"{sum(blew_up(r) for r in runs)}/{s.seeds}",
                ]
            table_rows.append(row)
        for (arm, lr), runs in cells.items():
            records += tagged(runs, setting=st.label, arm=arm, lr=lr)
            n_runs += len(runs)
            n_blown += sum(blew_up(r) for r in runs)
            n_nan += sum(r.diverged for r in runs)
    plot_lr_sweep(fig_dir / "lr_sweep.png", panels)
    rates = ", ".join(f"{lr:g}" for lr in s.lr_grid)
    return ClaimResult(
        "lr-sweep",
        2,
        "BN makes much higher learning rates usable",
        "With BN, much higher learning rates become usable, and training gets faster.",
        f"MLP settings, BN vs no-BN twin, {s.seeds} seeds per rate. SGD (momentum 0.9, "
        f"weight decay 1e-4, constant rate), batch 64, {s.lr_settings[0].epochs} epochs, at "
        f"the half-decade grid {rates}. A run *diverged* when its training loss became "
        f"non-finite or an epoch's mean training loss exceeded {BLOWUP_FACTOR:g} ln K (K "
        f"classes); its accuracy then counts as a uniform guess (1/K) and it is drawn as "
        f"diverged. Accuracy is that of the **last** epoch (no checkpoint selection, so a "
        f"run cannot look good from before a blow-up). A rate is *usable* for a run when "
        f"the run did not diverge and its accuracy is within the margin of the best mean "
        f"accuracy of any cell of the sweep: {100 * s.usable_margins[0]:.0f} points primary, "
        f"{', '.join(f'{100 * m:.0f}' for m in s.usable_margins[1:])} as sensitivity rows. "
        f"Metric: the largest usable rate per seed, in decades (grid resolution: half a "
        f"decade; none usable: half a decade below the grid). Speed is secondary: the mean "
        f"test accuracy over the epochs at each arm's best rate.",
        comps,
        reading="largest usable SGD rate on a half-decade grid",
        tables=[
            Table(
                "Last-epoch test accuracy of the runs that did not diverge, and divergence",
                ["setting", "lr", "BN accuracy", "BN diverged", "no BN accuracy", "no BN diverged"],
                ["", "lr", "%", "", "%", ""],
                table_rows,
            )
        ],
        figures=["lr_sweep.png"],
        runs=records,
        notes=[
            f"Of {n_runs} runs, {n_blown} diverged by this definition, of which {n_nan} with a "
            f"non-finite loss (the only kind `train()`'s own `diverged` flag reports)."
        ],
        caveats=["half-decade resolution; two small tabular/8x8 tasks"],
    )


def batch_size(runner: Runner, s: SuiteSettings, fig_dir: Path) -> ClaimResult:
    """The report's own claim: BN's advantage shrinks (or reverses) at very small batches."""
    st = s.speed[0]
    acc: dict[str, list[list[float]]] = {arm: [] for arm in ARMS}  # arm -> per size: per seed
    comps: list[Comparison] = []
    records: list[dict[str, Any]] = []
    for bs in s.batch_sizes:
        for arm, norm in ARMS.items():
            runs = runner.arm(st, s.seeds, {"norm": norm}, batch_size=bs, epochs=s.batch_epochs)
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
                role="secondary",
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
        10,
        "BN is weak at very small batches (the report's own claim)",
        "BN's benefit shrinks or reverses when batches are tiny, because the batch statistics "
        "it normalizes with (and the running averages used at inference) become noisy.",
        f"{st.label}, BN vs no-BN twin, {s.seeds} seeds, AdamW lr 3e-3 for both arms (not "
        f"tuned per arm), constant rate, {s.batch_epochs} epochs at each batch size "
        f"{', '.join(map(str, s.batch_sizes))} (so small batches take more steps). Metric: the "
        f"BN advantage (BN - no BN test accuracy, same seed) at batch {ref} minus the "
        f"advantage at each very small batch.",
        primary + comps,
        reading="BN's accuracy advantage at batch 64 minus that at tiny batches",
        figures=["batch_size.png"],
        runs=records,
        caveats=["one rate for both arms at every batch size"],
    )
