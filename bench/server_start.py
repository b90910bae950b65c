"""What starting ``python -m service --workers N`` costs: seconds until every worker
answers, and the CPU and resident memory of the supervisor and of each worker then.

    python bench/server_start.py --repository models
    python bench/server_start.py --repository models --baseline ../foldserve-prev  # A/B

Each start is a fresh process tree on a free port of 127.0.0.1 (gRPC off), stopped
once measured. Ready: ``throughput_servers.wait_ready`` on ``/v2/health/ready`` (200
on ``READY_IN_A_ROW`` new connections in a row: the kernel spreads them over the
workers' sockets). CPU is user + system from /proc when ready; RSS is VmRSS. With
``--baseline`` (another checkout, e.g. a ``git worktree`` of an earlier commit) the
starts alternate between the two, and the table gives each figure's median and this
checkout's ratio to it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from processes import process_tree_cpu_seconds, server_worker_pids, vm_rss_kib
from throughput_servers import ROOT, ServerSpec, start, stop, wait_ready

from service.models.sessions import CPU
from service.process.machine import machine_facts


@dataclass(frozen=True)
class Start:
    ready_s: float
    supervisor_cpu_s: float
    workers_cpu_s: float  # all workers together
    supervisor_rss_mib: float
    worker_rss_mib: float  # the mean over the workers


def measure(spec: ServerSpec, workers: int, log_dir: Path, limit: float = 120.0) -> Start:
    t0 = time.monotonic()
    server = start(spec, log_dir)
    try:
        wait_ready(server, "/v2/health/ready", None, {}, limit, pause=0.02)
        ready = time.monotonic() - t0
        pid = server.process.pid
        pids = server_worker_pids(pid)
        if len(pids) != workers:
            raise RuntimeError(f"{spec.label}: {len(pids)} workers, not {workers}")
        workers_cpu = sum(process_tree_cpu_seconds(p) for p in pids)
        # The rest of the tree: the supervisor (and multiprocessing's resource tracker).
        supervisor_cpu = process_tree_cpu_seconds(pid) - workers_cpu
        return Start(
            ready,
            supervisor_cpu,
            workers_cpu,
            vm_rss_kib(pid) / 1024,
            statistics.fmean(vm_rss_kib(p) / 1024 for p in pids),
        )
    finally:
        stop(server)


def spec_for(root: Path, repository: Path, workers: int, label: str) -> ServerSpec:
    command = [sys.executable, "-m", "service", "--repository", str(repository.resolve())]
    command += ["--workers", str(workers), "--providers", "cpu", "--threads", "1"]
    env = {"FOLDSERVE_GRPC_PORT": "0", "FOLDSERVE_DRAIN_SECONDS": "0"}
    return ServerSpec(label, label, command, env, root.resolve())


FIELDS = (
    ("ready_s", "ready (s)"),
    ("supervisor_cpu_s", "supervisor CPU (s)"),
    ("workers_cpu_s", "workers' CPU (s)"),
    ("supervisor_rss_mib", "supervisor RSS (MiB)"),
    ("worker_rss_mib", "worker RSS (MiB)"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--starts", type=int, default=5, help="starts of each checkout")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    args = parser.parse_args()
    if args.starts < 1 or args.workers < 2:
        parser.error("--starts must be >= 1 and --workers >= 2 (a supervisor and its workers)")
    specs = [spec_for(ROOT, args.repository, args.workers, "this checkout")]
    if args.baseline is not None:
        specs.append(spec_for(args.baseline, args.repository, args.workers, "baseline"))
    facts = machine_facts(CPU)
    print(
        f"machine: {facts['cpu']}, {facts['usable_cpus']} usable CPUs; load average "
        f"{' '.join(f'{v:.2f}' for v in facts['load_average'] or [])}; "
        f"python -m service --workers {args.workers}, {args.starts} starts each"
    )
    starts: dict[str, list[Start]] = {spec.key: [] for spec in specs}
    with tempfile.TemporaryDirectory(prefix="foldserve-start-") as tmp:
        for _ in range(args.starts):
            for spec in specs:  # alternating: the machine's noise falls on both alike
                starts[spec.key].append(measure(spec, args.workers, Path(tmp)))
    medians = {
        key: {name: statistics.median(getattr(s, name) for s in runs) for name, _ in FIELDS}
        for key, runs in starts.items()
    }
    header = ["", *(spec.key for spec in specs)]
    if args.baseline is not None:
        header.append("ratio")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, title in FIELDS:
        row = [title, *(f"{medians[spec.key][name]:.2f}" for spec in specs)]
        if args.baseline is not None:
            row.append(f"{medians['this checkout'][name] / medians['baseline'][name]:.2f}x")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
