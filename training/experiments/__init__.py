"""The BN claims, tested on FoldServe's own training module: plots, results JSON, report.

``run_experiments(["all"], quick=False, out_dir=Path("docs"))`` writes
``docs/experiments.md``, ``docs/experiments.json`` (every per-seed number the
report shows) and ``docs/experiments/*.png``. Each experiment compares BN zoo
models with their no-BN twins over seeds; verdicts come from the fixed rules in
:mod:`training.experiments.stats`, never by hand.

The package, in the order a suite run uses it: ``settings`` (budgets),
``tasks`` (the harder image task, the small training subset), ``runs``
(cached training runs, per-arm tuning, result records), the claims
(``speed``: 1 and 9; ``hyperparams``: 2 and batch size; ``generalization``:
3 and 5; ``sigmoid`` with ``gradients``: 4; ``santurkar`` with
``landscape``: 6 and 7; ``affine``: 8), ``stats`` (paired tests, Holm,
detectable effects, verdict rules), ``plots`` (the PNG figures) and
``report`` (the markdown, from the JSON alone).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from training.experiments.affine import gamma_beta
from training.experiments.generalization import placement, regularization
from training.experiments.hyperparams import batch_size, lr_sweep
from training.experiments.report import render_report
from training.experiments.runs import ClaimResult, Runner
from training.experiments.santurkar import covariate_shift, smooth_loss
from training.experiments.settings import SuiteSettings
from training.experiments.sigmoid import deep_sigmoid
from training.experiments.speed import convergence, epochs
from training.experiments.stats import RULES, apply_holm

log = logging.getLogger(__name__)

Experiment = Callable[[Runner, SuiteSettings, Path], ClaimResult]
EXPERIMENTS: dict[str, Experiment] = {
    "epochs": epochs,  # claim 1: fewer epochs to a target accuracy
    "lr-sweep": lr_sweep,  # claim 2: higher learning rates usable
    "regularization": regularization,  # claim 3: BN regularizes
    "deep-sigmoid": deep_sigmoid,  # claim 4: vanishing/exploding gradients, saturation
    "placement": placement,  # claim 5: BN before vs after the activation
    "covariate-shift": covariate_shift,  # claim 6: internal covariate shift
    "smoothness": smooth_loss,  # claim 7: smoother loss
    "gamma-beta": gamma_beta,  # claim 8: gamma and beta restore the identity
    "convergence": convergence,  # claim 9: better convergence in most models
    "batch-size": batch_size,  # the report's own: BN at very small batches
}
# Experiments that share runs (one cache) go to the same worker process.
GROUPS = (("epochs", "convergence", "placement"),)
REPORT_NAME, JSON_NAME, FIGURE_DIR = "experiments.md", "experiments.json", "experiments"


def json_safe(x: Any) -> Any:
    """``x`` with non-finite floats (a diverged run's loss) as ``None``: JSON has no inf/NaN."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


class ExperimentError(ValueError):
    """Unknown experiment name or bad option; the message names the valid choices."""


def resolve_names(names: list[str]) -> list[str]:
    """Expand ``"all"``, drop duplicates (keeping suite order), reject unknown names."""
    unknown = [n for n in names if n != "all" and n not in EXPERIMENTS]
    if unknown or not names:
        raise ExperimentError(
            f"unknown experiment(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from all, {', '.join(EXPERIMENTS)}"
        )
    wanted = set(EXPERIMENTS) if "all" in names else set(names)
    return [n for n in EXPERIMENTS if n in wanted]


def _groups(selected: list[str], workers: int) -> list[list[str]]:
    """Split ``selected`` into at most ``workers`` lists, keeping :data:`GROUPS` together."""
    units: list[list[str]] = []
    for g in GROUPS:
        if any(n in selected for n in g):
            units.append([n for n in selected if n in g])
    units += [[n] for n in selected if not any(n in g for g in GROUPS)]
    out: list[list[str]] = [[] for _ in range(max(1, min(workers, len(units))))]
    for i, unit in enumerate(units):  # the big shared group first, the rest round-robin
        out[0 if i == 0 else 1 + (i - 1) % max(len(out) - 1, 1) if len(out) > 1 else 0] += unit
    return [g for g in out if g]


def _run_group(
    names: list[str], settings: SuiteSettings, fig_dir: Path, log_level: int = logging.WARNING
) -> tuple[list[Any], int]:
    """One worker: its own Runner and cache, torch on one thread; returns (claims, runs).

    A spawned worker has no logging set up: it logs at the parent's level to stderr.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=log_level, format="%(asctime)s %(processName)s %(message)s")
    torch.set_num_threads(1)
    runner = Runner(settings)
    claims = []
    for name in names:
        t0 = time.perf_counter()
        claim = EXPERIMENTS[name](runner, settings, fig_dir)
        claim.seconds = time.perf_counter() - t0
        claim.figures = [f"{FIGURE_DIR}/{f}" for f in claim.figures]
        claims.append(claim)
        log.info("experiment %s done (%.0f s)", name, claim.seconds)
    return claims, runner.trained


def run_experiments(
    names: list[str],
    *,
    quick: bool,
    out_dir: Path,
    seeds: int | None = None,
    progress: bool = False,
    workers: int | None = None,
) -> Path:
    """Run the named experiments (``"all"``: every one) and return the report's path.

    ``quick`` shrinks every budget so the suite runs in seconds (for tests);
    ``seeds`` overrides the number of seeds (>= 2) of every experiment;
    ``workers`` (default: the settings', 2 in full mode) runs groups of
    experiments in that many processes of one torch thread each. Holm's
    correction then runs over every comparison of every claim.
    Raises :class:`ExperimentError` on an unknown name or ``seeds < 2``.
    """
    selected = resolve_names(names)
    settings = SuiteSettings.quick() if quick else SuiteSettings.full()
    if seeds is not None:
        if seeds < 2:
            raise ExperimentError(f"--seeds must be at least 2 to measure a spread, got {seeds}")
        settings = settings.with_seeds(seeds)
    n_workers = workers or settings.workers
    fig_dir = Path(out_dir) / FIGURE_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    groups = _groups(selected, n_workers)
    claims: list[ClaimResult] = []
    trained = 0
    threads = torch.get_num_threads()
    try:
        if len(groups) == 1:
            done = [_run_group(groups[0], settings, fig_dir)]
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(len(groups), mp_context=ctx) as pool:
                level = logging.getLogger().getEffectiveLevel()
                futures = [pool.submit(_run_group, g, settings, fig_dir, level) for g in groups]
                done = [
                    f.result() for f in tqdm(futures, desc="worker groups", disable=not progress)
                ]
    finally:
        torch.set_num_threads(threads)
    for group_claims, n in done:
        claims += group_claims
        trained += n
    claims.sort(key=lambda c: c.number)
    apply_holm([c for claim in claims for c in claim.comparisons])
    for claim in claims:
        log.info("claim %d %s: %s", claim.number, claim.key, claim.verdict)
    results = json_safe(
        {
            "names": names,
            "mode": settings.mode,
            "generated_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
            "torch": torch.__version__,
            "threads": 1,
            "workers": len(groups),
            "runs_trained": trained,
            "total_seconds": time.perf_counter() - start,
            "json_name": JSON_NAME,
            "rules": RULES,
            "settings": asdict(settings),
            "claims": [c.to_dict() for c in claims],
        }
    )
    out = Path(out_dir)
    (out / JSON_NAME).write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    report = out / REPORT_NAME
    report.write_text(render_report(results))
    return report
