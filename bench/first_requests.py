"""The first requests after readiness against the steady state, one client, checkouts alternated.

    python bench/first_requests.py --baseline ../before --rounds 5

Each round starts ``python -m service --workers 2`` from each checkout in turn (this one
and ``--baseline``, a git worktree), on a copy of the repository's breast_cancer MLP (or
bench/rollouts_server.py's stand-in where it has not been trained). From the first 200 of
``GET /v2/health/ready`` one client sends V2 JSON requests one after another, each on a new
connection (any worker may take it): the first ``--first`` of them, then, after a pause,
``--steady`` more. Issue 37's target: the first 100's p99 within 1.5x the steady p99.
A single client shows the cost of the first requests themselves (a worker's lazy starts,
a version not warmed); bench/rollouts.py's cold start shows it under load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from processes import free_port
from rollouts_server import MODEL, source_version

ROOT = Path(__file__).resolve().parent.parent


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, int(0.99 * len(values)) - 1)]


def one_round(root: Path, repository: Path, first: int, steady: int) -> dict[str, float]:
    """First and steady latencies (ms) of a server started from ``root``."""
    port = free_port()
    with tempfile.TemporaryDirectory() as runtime:
        command = [sys.executable, "-m", "service", "--repository", str(repository)]
        command += ["--port", str(port), "--grpc-port", "0", "--workers", "2"]
        command += ["--providers", "cpu", "--threads", "1", "--log-level", "warning"]
        command += ["--runtime-dir", runtime, "--no-access-log"]
        env = {**os.environ, "PYTHONPATH": str(root)}
        server = subprocess.Popen(command, cwd=root, env=env, stderr=subprocess.DEVNULL)
        limits = httpx.Limits(max_keepalive_connections=0)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", limits=limits) as client:
                deadline = time.monotonic() + 120
                while not ready(client):
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the server from {root} did not turn ready")
                    time.sleep(0.005)  # a poll of the server's state, not an ordering
                tensor = {"name": "input", "shape": [1, 30], "datatype": "FP32"}
                body = {"inputs": [{**tensor, "data": [0.5] * 30}]}
                firsts, failed = timed(client, body, first)
                time.sleep(2.0)  # the steady state: well after the start
                steadies, _ = timed(client, body, steady)
        finally:
            server.terminate()
            server.wait(timeout=60)
    return {
        "first_p99_ms": p99(firsts),
        "first_max_ms": max(firsts),
        "steady_p99_ms": p99(steadies),
        "ratio": p99(firsts) / p99(steadies),
        "first_failed": failed,
    }


def ready(client: httpx.Client) -> bool:
    try:
        return client.get("/v2/health/ready").status_code == 200
    except httpx.TransportError:  # refused: no worker listens yet
        return False


def timed(client: httpx.Client, body: dict[str, Any], count: int) -> tuple[list[float], int]:
    """Milliseconds of each answered request, and how many failed (a worker that listened
    before its models were loaded answered 503: the checkouts before 2026-12-08)."""
    out, failed = [], 0
    for _ in range(count):
        started = time.perf_counter()
        answer = client.post(f"/v2/models/{MODEL}/infer", json=body)
        if answer.status_code == 200:
            out.append((time.perf_counter() - started) * 1e3)
        else:
            failed += 1
    return out, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--first", type=int, default=100)
    parser.add_argument("--steady", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        repository = Path(work) / "models"
        shutil.copytree(source_version(Path(work)), repository / MODEL / "1")
        checkouts = {"this": ROOT, "baseline": args.baseline.resolve()}
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
        for number in range(args.rounds):
            for name, root in checkouts.items():
                result = one_round(root, repository, args.first, args.steady)
                rounds[name].append(result)
                print(f"round {number + 1} {name}: {json.dumps(result)}", flush=True)
    for name, results in rounds.items():
        ratios = [r["ratio"] for r in results]
        print(
            f"{name}: first {args.first} p99 / steady p99, median {statistics.median(ratios):.2f}x "
            f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}); first-request max, median "
            f"{statistics.median(r['first_max_ms'] for r in results):.1f} ms; first requests "
            f"failed: {sum(int(r['first_failed']) for r in results)} in all"
        )


if __name__ == "__main__":
    main()
