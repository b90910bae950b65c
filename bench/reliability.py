"""Reliability under change: hot swaps under load, a corrupt version refused, no leak on reload.

    python bench/reliability.py                                  # 20 swaps, 100 cycles
    python bench/reliability.py --quick --json reliability.json  # 3 versions, 10 cycles
    python bench/reliability.py --versions 2 --cycles 10 --json r.json  # what tests/ runs

1. Hot swap under load. A breast_cancer MLP (width 16, 1 epoch) is trained once;
   version v is that network with its last bias shifted by ``v * BIAS_STEP`` (so every
   version answers differently), exported with ``training.export.export_run``. Both
   run in a process of their own (in this one, the export would hold the GIL from the
   clients; and this one never imports torch).
   ``python -m service --workers 2`` serves version 1; ``--clients`` threads send the
   same V2 infer request without pause, each request on a new connection
   (``Connection: close``, so requests spread over the workers), while ``--versions``
   more versions are exported and loaded one after another (``POST
   /v2/repository/models/{name}/load`` with the API key). Halfway, a corrupt version is
   planted (the last version copied to the next number through a temporary directory
   and a rename, then its ``model.onnx`` overwritten with garbage): its load must be
   refused (400) while the previous version serves on; it is then removed, as an
   operator would, and the next export takes its number.
   Every answer is checked against the outputs ONNX Runtime computes directly from the
   ``model.onnx`` of the version the answer names (``model_version``), atol 1e-5.
2. Load/unload cycles: VmRSS of every worker process (the server's children) before,
   halfway through and after ``--cycles`` unload + load pairs of the model with all its
   versions, without traffic.

Figures: requests sent, failed (any status but 200, or no answer), mismatched (outputs
unlike those of the version named, or a version never completed), and after each load
the share of the next ``--fresh`` requests started after the load answered that the
new version served (goal 100%); RSS growth per worker (goal < 10%).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from processes import vm_rss_kib
from reliability_server import LoadClients, Outcome, Server, serve
from tqdm import tqdm

from foldserve.model_format import FOLDED_FILE, VersionMetadata
from service.models.sessions import CPU
from service.process.machine import machine_facts

if TYPE_CHECKING:
    from training.train import Run

# torch and training are imported only in the exporter process, which trains and exports:
# this one sends the load and checks the answers (no second copy of torch to import).

MODEL = "breast_cancer_mlp"
API_KEY = "reliability-key"
BIAS_STEP = 0.01  # logits of version v are version 0's plus v * BIAS_STEP
ATOL = 1e-5
Exporter = Callable[[int], Path]  # exports version N, returns its directory
RSS_GOAL = 0.10


# -- the model versions ----------------------------------------------------------------


def train_base(runs: Path) -> Path:
    """The one training run every version derives from (seconds on a CPU); its directory
    (in the exporter process)."""
    from training.data import load_dataset
    from training.train import DatasetSpec, TrainConfig, save_run, train
    from training.zoo import NetworkConfig

    ds = load_dataset("breast_cancer", seed=0)
    model_cfg = NetworkConfig("mlp", ds.input_shape, ds.num_classes, width=16)
    cfg = TrainConfig(epochs=1, seed=0)
    result = train(model_cfg, ds, cfg, progress=False)
    save_run(runs / MODEL, result, model_cfg, DatasetSpec("breast_cancer"), cfg, ds.labels)
    return runs / MODEL


def shifted(run: Run, offset: float) -> Run:
    """A copy of ``run`` whose output bias is moved by ``offset`` (the run is untouched)."""
    import torch

    out = copy.deepcopy(run)
    last = [m for m in out.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias.add_(offset)
    return out


def onnx_outputs(version_dir: Path, x: np.ndarray) -> np.ndarray:
    """What the version's ``model.onnx`` answers for ``x``, straight from ONNX Runtime."""
    session = ort.InferenceSession(
        str(version_dir / FOLDED_FILE), providers=["CPUExecutionProvider"]
    )
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def export_version(run_dir: Path, repository: Path, version: int) -> Path:
    """Export the run, its output bias moved by ``version * BIAS_STEP``, as ``version``
    (in the exporter process)."""
    from training.export import export_run
    from training.train import load_run

    result = export_run(shifted(load_run(run_dir), version * BIAS_STEP), repository, MODEL)
    if result.version != version:
        raise RuntimeError(f"export wrote version {result.version}, expected {version}")
    return result.path


def plant_corrupt(model_dir: Path, source: int, version: int) -> Path:
    """Copy version ``source`` to ``version`` (temporary directory + rename, so the
    version appears whole), then overwrite its ``model.onnx`` with garbage."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-corrupt-", dir=model_dir))
    shutil.copytree(model_dir / str(source), tmp, dirs_exist_ok=True)
    target = model_dir / str(version)
    os.rename(tmp, target)
    (target / FOLDED_FILE).write_bytes(b"this is not an ONNX model" * 40)
    return target


# -- the run ---------------------------------------------------------------------------


@dataclass
class Swap:
    version: int  # the version loaded (or the corrupt one planted)
    status: int  # of the load call
    expected: int  # the version that should serve afterwards
    served: int  # of the next requests, how many the expected version answered
    checked: int


@dataclass
class Report:
    command: str
    date: str
    machine: str
    workers: int
    clients: int
    versions: int
    fresh: int
    cycles: int
    swaps: list[Swap] = field(default_factory=list)
    requests: int = 0
    failed: int = 0
    failed_statuses: dict[str, int] = field(default_factory=dict)
    mismatched: int = 0
    corrupt_status: int = 0
    corrupt_reason: str = ""
    swap_seconds: float = 0.0
    cycle_failures: int = 0
    cycle_seconds: float = 0.0
    rss_before_kib: dict[str, int] = field(default_factory=dict)
    rss_half_kib: dict[str, int] = field(default_factory=dict)  # after half the cycles
    rss_after_kib: dict[str, int] = field(default_factory=dict)

    @property
    def fresh_share(self) -> float:
        return sum(s.served for s in self.swaps) / max(1, sum(s.checked for s in self.swaps))

    @property
    def rss_growth(self) -> dict[str, float]:
        return {
            pid: self.rss_after_kib[pid] / before - 1
            for pid, before in self.rss_before_kib.items()
            if pid in self.rss_after_kib
        }


def mismatches(outcomes: list[Outcome], expected: dict[str, np.ndarray]) -> int:
    """Answers whose outputs are not those of the version they name."""
    bad = 0
    for o in outcomes:
        if o.status != 200:
            continue
        want = expected.get(o.version or "")
        if (
            want is None
            or o.outputs is None
            or o.outputs.shape != want.shape
            or not np.allclose(o.outputs, want, rtol=0, atol=ATOL)
        ):
            bad += 1
    return bad


def hot_swaps(
    server: Server, export: Exporter, repository: Path, x: np.ndarray, report: Report
) -> None:
    """Part 1: export and load ``report.versions`` versions under load, one corrupt."""
    model_dir = repository / MODEL
    expected = {"1": onnx_outputs(model_dir / "1", x)}
    corrupt_after = 1 + report.versions // 2
    t0 = time.monotonic()
    with LoadClients(server.port, MODEL, x, report.clients) as clients:
        version = 2
        for _ in tqdm(range(report.versions), desc="hot swaps", unit="version"):
            path = export(version)
            expected[str(version)] = onnx_outputs(path, x)
            r = server.manage(MODEL, "load")
            done = time.monotonic()
            after = clients.next_after(done, report.fresh)
            ok = r.status_code == 200
            served = sum(o.version == str(version) for o in after) if ok else 0
            report.swaps.append(Swap(version, r.status_code, version, served, len(after)))
            if version == corrupt_after:
                corrupt = plant_corrupt(model_dir, version, version + 1)
                r = server.manage(MODEL, "load")
                report.corrupt_status = r.status_code
                report.corrupt_reason = r.json().get("error", "")[:200]
                after = clients.next_after(time.monotonic(), report.fresh)
                served = sum(o.version == str(version) for o in after)
                report.swaps.append(Swap(version + 1, r.status_code, version, served, len(after)))
                shutil.rmtree(corrupt)
            version += 1
    report.swap_seconds = time.monotonic() - t0
    outcomes = clients.outcomes
    report.requests = len(outcomes)
    statuses = [o.status for o in outcomes if o.status != 200]
    report.failed = len(statuses)
    report.failed_statuses = {str(s): statuses.count(s) for s in sorted(set(statuses))}
    report.mismatched = mismatches(outcomes, expected)


def load_cycles(server: Server, report: Report) -> None:
    """Part 2: RSS of every worker before, halfway through and after ``report.cycles``
    unload + load pairs (growth that stops by halfway is the allocator settling; growth
    that goes on is a leak)."""
    report.rss_before_kib = {str(p): vm_rss_kib(p) for p in server.worker_pids()}
    t0 = time.monotonic()
    for cycle in tqdm(range(report.cycles), desc="load/unload", unit="cycle"):
        for action in ("unload", "load"):
            if server.manage(MODEL, action).status_code != 200:
                report.cycle_failures += 1
        if cycle + 1 == report.cycles // 2:
            report.rss_half_kib = {str(p): vm_rss_kib(p) for p in server.worker_pids()}
    report.cycle_seconds = time.monotonic() - t0
    report.rss_after_kib = {str(p): vm_rss_kib(p) for p in server.worker_pids()}


def run(args: argparse.Namespace, workdir: Path) -> Report:
    facts = machine_facts(CPU)
    load = " ".join(f"{v:.2f}" for v in facts["load_average"] or [])
    report = Report(
        command="python bench/reliability.py " + " ".join(sys.argv[1:]),
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{facts['cpu']}, {facts['cpu_count']} CPUs ({facts['usable_cpus']} usable), "
        f"{facts['machine']}, Python {facts['python']}, onnxruntime {facts['onnxruntime']}; "
        f"load average {load} at start",
        workers=args.workers,
        clients=args.clients,
        versions=args.versions,
        fresh=args.fresh,
        cycles=args.cycles,
    )
    repository, runtime = workdir / "models", workdir / "runtime"
    # One process trains and exports every version (torch is imported once, there).
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as exporter:
        run_dir = exporter.submit(train_base, workdir / "runs").result()

        def export(version: int) -> Path:
            return exporter.submit(export_version, run_dir, repository, version).result()

        export(1)
        reference = VersionMetadata.read(repository / MODEL / "1").reference.inputs["input"]
        x = reference.array()[:2]  # (2, 30): two real test samples
        with serve(repository, runtime, args.workers, API_KEY) as server:
            hot_swaps(server, export, repository, x, report)
            load_cycles(server, report)
    return report


def print_report(r: Report) -> None:
    print(f"command   {r.command}")
    print(f"date      {r.date}")
    print(f"machine   {r.machine}")
    print(
        f"server    python -m service --workers {r.workers} --providers cpu --threads 1, "
        f"model {MODEL} (MLP width 16)"
    )
    print(
        f"clients   {r.clients} threads, no pause, a new connection per request "
        f"(Connection: close), JSON batch of 2"
    )
    print()
    print(
        f"hot swap under load: {r.versions} versions exported and loaded in {r.swap_seconds:.1f} s"
    )
    shares = [f"{s.served}/{s.checked}" for s in r.swaps]
    print(f"  requests sent          {r.requests}")
    print(f"  failed (non-200)       {r.failed} {r.failed_statuses or ''}(goal 0)")
    print(f"  mismatched outputs     {r.mismatched} (goal 0)")
    print(
        f"  next {r.fresh} after a load    {100 * r.fresh_share:.1f}% served by the version "
        f"expected (goal 100%: {', '.join(shares)}; the corrupt one's by the one before)"
    )
    print(f"  corrupt version load   {r.corrupt_status} (goal 400: {r.corrupt_reason})")
    print(f"load/unload cycles: {r.cycles} in {r.cycle_seconds:.1f} s, {r.cycle_failures} failed")
    print(
        f"  {'worker':>8} {'RSS MiB before':>15} {'halfway':>8} {'after':>8} "
        f"{'growth':>8} (goal < {RSS_GOAL:.0%})"
    )
    for pid, before in r.rss_before_kib.items():
        half, after = r.rss_half_kib.get(pid), r.rss_after_kib.get(pid)
        if half is None or after is None:
            print(f"  {pid:>8} {before / 1024:>15.1f}  (worker gone: restarted?)")
            continue
        print(
            f"  {pid:>8} {before / 1024:>15.1f} {half / 1024:>8.1f} {after / 1024:>8.1f} "
            f"{100 * r.rss_growth[pid]:>7.1f}%"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", type=int, default=20, help="versions hot-swapped in")
    parser.add_argument("--cycles", type=int, default=100, help="unload + load pairs")
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    parser.add_argument("--fresh", type=int, default=20, help="requests checked after a load")
    parser.add_argument("--workers", type=int, default=2, help="server processes")
    parser.add_argument("--quick", action="store_true", help="3 versions, 10 cycles")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--workdir", type=Path, help="keep the repository here (else a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.versions, args.cycles = 3, 10
    if args.versions < 2:
        parser.error("--versions must be at least 2 (the corrupt one is planted halfway)")
    logging.basicConfig(level=logging.WARNING)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="foldserve-reliability-") as tmp:
            report = run(args, Path(tmp))
    print_report(report)
    if args.json:
        figures = {
            **asdict(report),
            "fresh_share": report.fresh_share,
            "rss_growth": report.rss_growth,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
