"""Folded vs unfolded latency of every default model, in every runtime we serve or train with.

    python bench/fold_latency.py [--batch-sizes 1,8,64] [--seconds-per-cell 6]

For each default model in ``--repository`` (its training run in ``--runs``) and each
batch size, times the folded against the unfolded network, interleaved, in:

- ``torch eager``: the trained ``nn.Module`` against its folded copy
  (``training.bench_torch.bench_folding``);
- ``ORT opt off``: ``model.onnx`` against ``model.unfolded.onnx`` with ONNX Runtime's
  graph optimizations disabled (what folding itself buys);
- ``ORT default``: the same files as the service runs them (ORT_ENABLE_ALL);
- ``ORT CUDA``: as ``ORT default`` on the CUDA provider, where it really starts.

The ORT cells go through the service's own code (``ModelRepository`` ->
``service.fold_latency.measure.measure_model``), so they measure what ``/fold-latency`` reports.
Iterations per cell are sized from a short pilot so each cell takes about
``--seconds-per-cell``. Prints the table with its conditions (command, machine,
date, load average) and writes it, with a plot, into ``docs/benchmarks.md``
between ``<!-- fold_latency:start -->`` and ``<!-- fold_latency:end -->``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from fold_latency_report import CONTROL, END, RUNTIMES, START, Cell, plot, table, verdicts
from markdown_section import publish

from foldserve.latency_stats import paired_speedup
from service.fold_latency.measure import (
    LatencyParams,
    measure_model,
    random_feeds,
    time_interleaved,
)
from service.models.repository import ModelRepository
from service.models.served_version import ServedVersion, ServingOptions
from service.models.sessions import CUDA, SessionFactory
from service.observability.metrics import ServiceMetrics
from service.process.machine import machine_facts, usable_cpus
from service.settings import ProviderChoice, Settings
from training.bench_torch import bench_folding
from training.defaults import DEFAULT_MODELS
from training.train import load_run

MIN_ITERATIONS, MAX_ITERATIONS = 50, 5000
QUIET_CORES = 0.2  # other processes' CPU use under which a cell may start


class OtherCpu:
    """CPU time used by other processes since creation, in cores: /proc/stat's busy time
    minus this process's own (NaN where there is no /proc/stat)."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        try:
            ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return math.nan, 0.0, time.monotonic()
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        own = sum(os.times()[:2])
        return busy, own, time.monotonic()

    def cores(self) -> float:
        busy, own, now = self._read()
        busy0, own0, then = self._start
        return max(0.0, (busy - busy0) - (own - own0)) / max(now - then, 1e-9)


def wait_for_quiet(max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until other processes use < QUIET_CORES; return their use."""
    deadline = time.monotonic() + max_wait
    while True:
        meter = OtherCpu()
        time.sleep(0.5)
        cores = meter.cores()
        if not cores >= QUIET_CORES or time.monotonic() > deadline:
            return cores
        time.sleep(2.0)


def iterations_for(per_call_s: float, seconds: float) -> int:
    """Interleaved pairs that fit in ``seconds`` (each pair is two calls)."""
    wanted = int(seconds / max(2 * per_call_s, 1e-7))
    return max(MIN_ITERATIONS, min(MAX_ITERATIONS, wanted))


def ort_cell(model: ServedVersion, runtime: str, batch: int, isolate: bool, seconds: float) -> Cell:
    pilot = measure_model(model, LatencyParams(batch, iterations=5, warmup=3, isolate=isolate))
    per_call = (pilot.folded.mean_ms + pilot.unfolded.mean_ms) / 2e3
    params = LatencyParams(batch, iterations_for(per_call, seconds), warmup=20, isolate=isolate)
    r = measure_model(model, params)
    return Cell(
        model.name,
        batch,
        runtime,
        r.unfolded.p50_ms,
        r.folded.p50_ms,
        r.speedup.ratio,
        r.speedup.ci95[0],
        r.speedup.ci95[1],
        params.iterations,
        r.max_abs_diff,
    )


def torch_cell(name: str, runs: Path, batch: int, seconds: float) -> Cell:
    run = load_run(runs / name)
    shape = run.model_cfg.input_shape
    pilot = bench_folding(run.model, shape, batch_size=batch, iterations=10, warmup=5)
    per_call = float(np.mean(pilot.folded_s) + np.mean(pilot.unfolded_s)) / 2
    iterations = iterations_for(per_call, seconds)
    r = bench_folding(run.model, shape, batch_size=batch, iterations=iterations, warmup=10)
    speedup = paired_speedup(r.unfolded_s, r.folded_s)
    unfolded_ms, folded_ms = r.p50_ms()
    return Cell(
        name,
        batch,
        "torch eager",
        unfolded_ms,
        folded_ms,
        speedup.ratio,
        speedup.ci_low,
        speedup.ci_high,
        iterations,
        r.max_abs_diff,
    )


def load_models(
    repository: Path, providers: ProviderChoice, threads: int
) -> dict[str, ServedVersion]:
    """The default models' served versions, loaded and checked as the service does."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, repository=repository, providers=providers, threads=threads
    )
    repo = ModelRepository(repository, ServingOptions.from_settings(settings, ServiceMetrics()))
    repo.load_all()
    entries = {entry.name: entry for entry in repo.entries()}
    found = {}
    for spec in DEFAULT_MODELS:
        status = entries[spec.name].default() if spec.name in entries else None
        if status is not None and status.model is not None:
            found[spec.name] = status.model
        else:
            print(f"{spec.name}: not served from {repository}, skipped", file=sys.stderr)
    return found


def control_cell(model: ServedVersion, batch: int, seconds: float) -> Cell:
    """Two sessions of the same ``model.onnx`` (ORT default), timed like a comparison."""
    data = model.file_bytes("folded")
    factory = SessionFactory("cpu", model.threads, "off")
    first, second = factory.create(data), factory.create(data)
    reference = {n: tuple(t.shape) for n, t in model.metadata.reference.inputs.items()}
    feeds = random_feeds(model.inputs, batch, 0, reference)
    pilot = time_interleaved(first, second, feeds, LatencyParams(batch, iterations=5, warmup=3))
    per_call = float(np.mean(pilot.folded_s) + np.mean(pilot.unfolded_s)) / 2
    iterations = iterations_for(per_call, seconds)
    t = time_interleaved(first, second, feeds, LatencyParams(batch, iterations, warmup=20))
    speedup = paired_speedup(t.unfolded_s, t.folded_s)
    return Cell(
        model.name,
        batch,
        CONTROL,
        float(np.median(t.unfolded_s)) * 1e3,
        float(np.median(t.folded_s)) * 1e3,
        speedup.ratio,
        speedup.ci_low,
        speedup.ci_high,
        iterations,
        t.max_abs_diff,
    )


def run_cell(model: ServedVersion, runtime: str, batch: int, runs: Path, seconds: float) -> Cell:
    if runtime == "torch eager":
        return torch_cell(model.name, runs, batch, seconds)
    if runtime == CONTROL:
        return control_cell(model, batch, seconds / 2)
    return ort_cell(model, runtime, batch, runtime == "ORT opt off", seconds)


def conditions(threads: int, cuda_gpu: str | None) -> list[str]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        f"command: `{shlex.join(['python', 'bench/fold_latency.py', *sys.argv[1:]])}`",
        f"machine: {cpu}, {os.cpu_count()} CPUs ({usable_cpus()} usable), "
        f"{platform.system()} {platform.machine()}, GPU: {cuda_gpu or 'none'}",
        f"software: python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}; {threads} intra-op threads in both ORT and torch",
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--batch-sizes", default="1,8,64")
    parser.add_argument("--seconds-per-cell", type=float, default=5.0)
    parser.add_argument(
        "--max-wait", type=float, default=60.0, help="seconds to wait for a quiet CPU per cell"
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="re-runs of a cell disturbed by other processes"
    )
    parser.add_argument("--threads", type=int, default=0, help="0: the CPUs usable here")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="a subset of these")
    parser.add_argument(
        "--models", default=",".join(m.name for m in DEFAULT_MODELS), help="a subset of these"
    )
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--plot", type=Path, default=Path("docs/fold_latency.png"))
    parser.add_argument("--json", type=Path, default=None, help="also write the cells here")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    runtimes = [r.strip() for r in args.runtimes.split(",")]
    threads = args.threads or usable_cpus()
    torch.set_num_threads(threads)

    load_start = os.getloadavg()
    started = time.monotonic()
    wanted = set(args.models.split(","))
    cpu_models = {
        n: m for n, m in load_models(args.repository, "cpu", threads).items() if n in wanted
    }
    cuda_models: dict[str, ServedVersion] = {}
    if "ORT CUDA" in runtimes and CUDA in ort.get_available_providers():
        loaded = load_models(args.repository, "cuda", threads)
        cuda_models = {n: m for n, m in loaded.items() if m.provider == CUDA and n in wanted}
    gpu = machine_facts(CUDA)["gpu"] if cuda_models else None

    jobs = [
        (model, batch, runtime)
        for name, model in cpu_models.items()
        for batch in batch_sizes
        for runtime in runtimes
        if runtime in ("torch eager", "ORT opt off", "ORT default", CONTROL)
    ]
    jobs += [(m, b, "ORT CUDA") for m in cuda_models.values() for b in batch_sizes]
    jobs.sort(key=lambda job: (list(cpu_models).index(job[0].name), job[1], RUNTIMES.index(job[2])))

    cells: list[Cell] = []
    waited = 0.0
    gc.disable()  # a collection inside a timed call would land on one variant only
    try:
        for i, (model, batch, runtime) in enumerate(jobs, 1):
            best: Cell | None = None
            for attempt in range(1 + args.retries):  # again when others took the CPU meanwhile
                t_wait = time.monotonic()
                before = wait_for_quiet(args.max_wait)
                t0, meter = time.monotonic(), OtherCpu()
                waited += t0 - t_wait
                cell = run_cell(model, runtime, batch, args.runs, args.seconds_per_cell)
                cell = replace(cell, other_cores=meter.cores())
                gc.collect()
                print(
                    f"[{i}/{len(jobs)}] {model.name} batch {batch} {runtime}: "
                    f"{cell.speedup:.3f}x [{cell.ci_low:.3f}, {cell.ci_high:.3f}] "
                    f"({cell.iterations} runs, {time.monotonic() - t0:.1f} s; other processes "
                    f"{before:.2f} cores before, {cell.other_cores:.2f} during; try {attempt + 1})",
                    file=sys.stderr,
                )
                if best is None or not cell.other_cores >= best.other_cores:
                    best = cell
                if not cell.other_cores >= QUIET_CORES:
                    break
            assert best is not None
            cells.append(best)
    finally:
        gc.enable()
    load_end = os.getloadavg()

    notes = conditions(threads, gpu)
    notes.append(
        f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in load_start)} at start, "
        f"{' '.join(f'{x:.2f}' for x in load_end)} at end; "
        f"total {time.monotonic() - started:.0f} s, of which {waited:.0f} s waiting for a "
        f"quiet CPU; `other CPU` = cores other processes used while the cell ran"
    )
    if "ORT CUDA" in runtimes and not cuda_models:
        notes.append("ORT CUDA: not measured, the CUDA provider does not start on this machine")
    lines = [
        "## Folded vs unfolded latency",
        "",
        "Speedup = unfolded p50 / folded p50 of interleaved runs on the same random batch; "
        "the interval is a 95% bootstrap over the paired runs (`foldserve/latency_stats.py`). "
        f"`{CONTROL}` is the control: `model.onnx` against itself in two sessions, so its "
        "distance from 1.000 is the method's own bias on this machine. "
        "Targets and the reasons behind misses: `docs/latency.md`.",
        "",
        *(f"- {note}" for note in notes),
        "",
        *table(cells),
        "",
        "Targets (met = the interval's lower bound reaches the target):",
        "",
        *verdicts(cells),
    ]
    if not args.no_write:
        plot(cells, args.plot, batch_sizes)
        rel = os.path.relpath(args.plot, args.doc.parent)
        lines += ["", f"![folded vs unfolded speedups]({rel})"]
    publish(lines, args.doc, START, END, write=not args.no_write)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(c) for c in cells], indent=1))


if __name__ == "__main__":
    main()
