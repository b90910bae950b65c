"""The BN claims, tested on FoldServe's own training module: plots, results JSON, report.

``run_experiments(["all"], quick=False, out_dir=Path("docs"))`` writes
``docs/experiments.md``, ``docs/experiments.json`` (every per-seed number the
report shows) and ``docs/experiments/*.png``. Each experiment compares BN zoo
models with their no-BN twins over seeds; verdicts come from the fixed rules in
:mod:`training.experiments.stats`, never by hand.

The package, in the order a suite run uses it: ``runs`` (budgets, cached
training runs, result records), the claims (``claims``: epochs, regularization,
placement; ``hyperparams``: learning rate and batch size; ``sigmoid``: gradient
norms in deep sigmoid nets), ``stats`` (Welch intervals, verdict rules),
``plots`` (the PNG figures) and ``report`` (the markdown, from the JSON alone).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from training.experiments.claims import epochs, placement, regularization
from training.experiments.hyperparams import batch_size, lr_sweep
from training.experiments.report import render_report
from training.experiments.runs import ClaimResult, Runner, SuiteSettings
from training.experiments.sigmoid import deep_sigmoid
from training.experiments.stats import RULES

log = logging.getLogger(__name__)

Experiment = Callable[[Runner, SuiteSettings, Path], ClaimResult]
EXPERIMENTS: dict[str, Experiment] = {
    "epochs": epochs,  # claim 1: fewer epochs to a target accuracy
    "lr-sweep": lr_sweep,  # claim 2: higher learning rates usable
    "regularization": regularization,  # claim 3: BN regularizes
    "deep-sigmoid": deep_sigmoid,  # claim 4: vanishing gradients in deep sigmoid nets
    "placement": placement,  # claim 5: BN before vs after the activation
    "batch-size": batch_size,  # BN's weakness at very small batches
}
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


def run_experiments(
    names: list[str],
    *,
    quick: bool,
    out_dir: Path,
    seeds: int | None = None,
    progress: bool = False,
) -> Path:
    """Run the named experiments (``"all"``: every one) and return the report's path.

    ``quick`` shrinks every budget so the suite runs in seconds (for tests);
    ``seeds`` overrides the number of seeds (>= 2) of every experiment. Torch
    runs on one CPU thread meanwhile (restored afterwards): the models are tiny,
    and one thread keeps wall times comparable on a shared machine.
    Raises :class:`ExperimentError` on an unknown name or ``seeds < 2``.
    """
    selected = resolve_names(names)
    settings = SuiteSettings.quick() if quick else SuiteSettings.full()
    if seeds is not None:
        if seeds < 2:
            raise ExperimentError(f"--seeds must be at least 2 to measure a spread, got {seeds}")
        settings = settings.with_seeds(seeds)
    fig_dir = Path(out_dir) / FIGURE_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    claims: list[ClaimResult] = []
    try:
        runner = Runner()
        if not quick:  # quick timings mean nothing; skip the warm-up there
            runner.warm_up()
        for name in tqdm(selected, desc="experiments", unit="exp", disable=not progress):
            t0 = time.perf_counter()
            claim = EXPERIMENTS[name](runner, settings, fig_dir)
            claim.seconds = time.perf_counter() - t0
            claim.figures = [f"{FIGURE_DIR}/{f}" for f in claim.figures]
            claims.append(claim)
            log.info("experiment %s: %s (%.0f s)", name, claim.verdict, claim.seconds)
    finally:
        torch.set_num_threads(threads)
    results = json_safe(
        {
            "names": names,
            "mode": settings.mode,
            "generated_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
            "torch": torch.__version__,
            "threads": 1,
            "runs_trained": runner.trained,
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
