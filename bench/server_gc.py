"""Garbage collections inside FoldServe's worker processes under wrk load: this checkout
against another.

    python bench/server_gc.py --baseline ../before --seconds 10

Starts ``python -m service`` (defaults: access log on, FoldServe's worker count)
from each checkout with a ``sitecustomize`` that times every collection by
generation (``gc.callbacks``) in every process, drives it with wrk (64 clients,
batch-1 JSON), and prints per worker the number of collections, their total and
longest pause, beside wrk's p50 and p99, and how many requests each worker
answered (from the request ids of the access log). A full (generation 2)
collection stops the event loop for as long as it takes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import throughput_load as load
import throughput_servers as servers
from processes import free_port

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import atexit, gc, json, os, threading, time
pauses = {0: [], 1: [], 2: []}
started = [0.0]
def on_gc(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        pauses[info["generation"]].append((time.perf_counter() - started[0]) * 1e3)
def report():
    path = os.path.join(os.environ["GC_PROBE_DIR"], f"{os.getpid()}.json")
    with open(path, "w") as out:
        json.dump({"pauses": pauses, "frozen": gc.get_freeze_count()}, out)
def reset():  # after start-up and warm-up: count the measured load only
    for v in pauses.values():
        v.clear()
gc.callbacks.append(on_gc)
atexit.register(report)
import signal
signal.signal(signal.SIGUSR1, lambda *a: reset())
signal.signal(signal.SIGUSR2, lambda *a: report())
"""


def run(checkout: Path, args: argparse.Namespace, workdir: Path) -> list[str]:
    probe_dir = workdir / checkout.name
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    name, sample = load.model_input(args.repository, args.model)
    payload = load.make_payload(name, sample, 1, "json")
    body = payload.write(workdir, args.model)
    path = f"/v2/models/{args.model}/infer"
    port = free_port()
    command = [sys.executable, "-m", "service", "--repository", str(args.repository)]
    command += ["--providers", "cpu", "--port", str(port)]
    env = {
        **os.environ,
        "PYTHONPATH": f"{checkout}{os.pathsep}{probe_dir}",
        "GC_PROBE_DIR": str(probe_dir),
    }
    log = (workdir / f"{checkout.name}.log").open("wb")
    process = subprocess.Popen(command, cwd=checkout, env=env, stdout=log, stderr=log)
    server = servers.RunningServer(
        servers.ServerSpec("fold", "FoldServe", command), port, process, Path(log.name)
    )
    try:
        servers.wait_ready(server, path, payload.body, payload.headers)
        load.run_wrk(server.url + path, body, payload.headers, args.clients, 3)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        pids = [int(p) for p in children] or [process.pid]
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)  # forget start-up and warm-up
        raw = load.run_wrk(server.url + path, body, payload.headers, args.clients, args.seconds)
        for pid in pids:
            os.kill(pid, signal.SIGUSR2)  # write the report
        time.sleep(2.0)
    finally:
        servers.stop(server)
    lines = [
        f"{checkout}: {raw['requests'] / (raw['duration_us'] / 1e6):,.0f} req/s, "
        f"p50 {raw['p50_us'] / 1e3:.1f} ms, p99 {raw['p99_us'] / 1e3:.1f} ms"
    ]
    per_worker = collections.Counter(
        m[1] for m in re.finditer(r"\[([0-9a-f]{16})-[0-9a-f]+\]", Path(log.name).read_text())
    )
    if per_worker:  # request ids name their worker process (this checkout's, not uuid4)
        shares = ", ".join(f"{n:,}" for n in sorted(per_worker.values(), reverse=True))
        lines.append(f"  requests per worker (from the access log's request ids): {shares}")
    for pid in pids:
        if not (probe_dir / f"{pid}.json").exists():
            lines.append(f"  worker {pid}: no report (not a worker, or too slow to write it)")
            continue
        report = json.loads((probe_dir / f"{pid}.json").read_text())
        for gen, pauses in report["pauses"].items():
            if pauses:
                lines.append(
                    f"  worker {pid} gen {gen}: {len(pauses)} collections, total "
                    f"{sum(pauses):.1f} ms, longest {max(pauses):.1f} ms, median "
                    f"{sorted(pauses)[len(pauses) // 2]:.2f} ms (frozen objects: "
                    f"{report['frozen']})"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    args = parser.parse_args()
    args.repository = args.repository.resolve()
    with tempfile.TemporaryDirectory(prefix="server-gc-") as tmp:
        for checkout in [ROOT, *([args.baseline.resolve()] if args.baseline else [])]:
            print("\n".join(run(checkout, args, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
