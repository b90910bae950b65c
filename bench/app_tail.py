"""The latency tail of the FoldServe app itself, no HTTP: this checkout against another.

    python bench/app_tail.py --baseline ../before          # e.g. a git worktree

Runs the ASGI app in-process as ``python -m service`` would set it up (logging
configured, access log on unless ``--no-access-log``, written to a file), with
``--clients`` requests always in flight (a closed loop, as wrk drives a server),
and records the CPU time per request (all threads: the log writer's too), each
request's latency, the event loop's stalls (a 1 ms ticker's lateness) and every
garbage collection (``gc.callbacks``). Each side runs in its own process,
alternating A B ``--rounds`` times. Blind to HTTP and to how connections are
spread over workers; what it shows is what the app does to its own tail.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from asgi_request import post, request_body  # a sibling module

ROOT = Path(__file__).resolve().parent.parent


def measure(args: argparse.Namespace) -> dict[str, float]:
    """One round in this process: latency percentiles, stalls, full collections."""
    from service.app import create_app
    from service.observability.logs import configure_logging
    from service.process.worker_sync import WorkerSync
    from service.settings import Settings

    try:
        from service.process.runtime_dir import open_runtime_dir

        runtime: Any = open_runtime_dir(None)
    except ImportError:  # a checkout from before service/process/runtime_dir.py
        runtime = Path(tempfile.mkdtemp())

    # Log lines go to a file, as a server's stderr would (a checkout whose configure_logging
    # takes no stream writes to sys.stderr).
    sys.stderr = tempfile.TemporaryFile("w")  # noqa: SIM115
    configure_logging("text", "info")
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        repository=args.repository,
        providers="cpu",
        threads=1,
        access_log=args.access_log,
    )
    app = create_app(settings)
    body, headers = request_body(args.repository, args.model, False)
    path = f"/v2/models/{args.model}/infer"
    pauses: list[float] = []
    started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif info["generation"] == 2:
            pauses.append((time.perf_counter() - started[0]) * 1e3)

    async def one() -> float:
        start = time.perf_counter()
        await post(app, path, body, headers)
        return (time.perf_counter() - start) * 1e3

    async def client(latencies: list[float], until: float) -> None:
        while time.perf_counter() < until:
            latencies.append(await one())

    async def ticker(stalls: list[float], until: float) -> None:
        while time.perf_counter() < until:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            stalls.append((time.perf_counter() - before) * 1e3 - 1.0)

    async def main() -> dict[str, float]:
        # As in a worker: the repository loads after start-up (and this checkout may then
        # freeze what start-up left), then the load runs.
        repository = app.state.repository
        sync = WorkerSync(runtime, repository)
        try:  # checkouts before 2026-12-08 named it load_and_poll (and took an interval)
            from service.app import first_scan
        except ImportError:
            from service.app import load_and_poll  # type: ignore[attr-defined]

            await load_and_poll(repository, sync, 0.0)
        else:
            await first_scan(repository, sync)
        warm: list[float] = []
        await asyncio.gather(
            *(client(warm, time.perf_counter() + 1.0) for _ in range(args.clients))
        )
        latencies: list[float] = []
        stalls: list[float] = []
        gc.callbacks.append(on_gc)
        full = gc.get_stats()[2]["collections"]
        until, cpu = time.perf_counter() + args.seconds, time.process_time()
        await asyncio.gather(
            ticker(stalls, until), *(client(latencies, until) for _ in range(args.clients))
        )
        cpu = time.process_time() - cpu
        full = gc.get_stats()[2]["collections"] - full
        gc.callbacks.remove(on_gc)
        p50, p99 = np.percentile(latencies, [50, 99])
        return {
            "requests/s": len(latencies) / args.seconds,
            "CPU us/request": cpu / len(latencies) * 1e6,
            "p50 ms": float(p50),
            "p99 ms": float(p99),
            "p99/p50": float(p99 / p50),
            "max stall ms": max(stalls),
            "full GCs": full,
            "longest full GC ms": max(pauses, default=0.0),
        }

    return asyncio.run(main())


def side(checkout: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", "--repository", str(args.repository)]
    command += ["--model", args.model, "--clients", str(args.clients)]
    command += ["--seconds", str(args.seconds)]
    command += ["--access-log" if args.access_log else "--no-access-log"]
    env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{Path(__file__).parent}"}
    done = subprocess.run(
        command, cwd=checkout, env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument("--clients", type=int, default=64, help="requests always in flight")
    parser.add_argument("--seconds", type=float, default=10.0, help="per round")
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds")
    parser.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=True, help="on by default"
    )
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repository = args.repository.resolve()
    if args.child:
        print(json.dumps(measure(args)))
        return
    sides = {"this checkout": ROOT} | (
        {"baseline": args.baseline.resolve()} if args.baseline else {}
    )
    results: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, checkout in sides.items():
            results[name].append(side(checkout, args))
    print(
        f"{args.model}, batch-1 JSON requests, {args.clients} in flight, {args.seconds:g} s "
        f"per round, {args.rounds} rounds, in-process ASGI (no HTTP), "
        f"access log {'on' if args.access_log else 'off'}; "
        "medians of the rounds"
    )
    keys = list(next(iter(results.values()))[0])
    print("| app | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, rounds in results.items():
        values = [statistics.median(r[k] for r in rounds) for k in keys]
        print(f"| {name} | " + " | ".join(f"{v:,.1f}" for v in values) + " |")


if __name__ == "__main__":
    main()
