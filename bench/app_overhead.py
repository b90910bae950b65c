"""Per-request cost of the FoldServe app itself, no HTTP: this checkout against another.

    python bench/app_overhead.py --baseline ../before          # e.g. a git worktree
    python bench/app_overhead.py --model resnet_bench --binary

Calls the ASGI app in-process (no socket, no HTTP parser, no load generator)
with batch-1 V2 requests, ``--concurrency`` at a time, so the event loop's own
work per request is what is timed: routing, middleware, decoding, checking,
batching, encoding, plus ONNX Runtime. Each side runs in its own process
(``PYTHONPATH`` set to its checkout), alternating A B A B ``--rounds`` times so
that machine noise hits both alike; the table gives the median microseconds per
request of each side and their ratio. Far steadier on a shared machine than
req/s under wrk (bench/throughput.py), and blind to what HTTP costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from asgi_request import post, request_body  # a sibling module

ROOT = Path(__file__).resolve().parent.parent


def measure(args: argparse.Namespace) -> float:
    """Microseconds per request of the app importable from ``sys.path`` (one round)."""
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, repository=args.repository, providers="cpu", access_log=False
    )
    app = create_app(settings)
    app.state.repository.load_all()
    body, headers = request_body(args.repository, args.model, args.binary)
    path = f"/v2/models/{args.model}/infer"

    async def one() -> None:
        sent = await post(app, path, body, headers)
        if sent[0]["status"] != 200:
            raise RuntimeError(f"status {sent[0]['status']}: {sent[1:]}")

    async def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n // args.concurrency):
            await asyncio.gather(*(one() for _ in range(args.concurrency)))
        return (time.perf_counter() - start) / n * 1e6

    async def main() -> float:
        await run(args.requests // 10)  # warm-up
        return await run(args.requests)

    return asyncio.run(main())


def side(checkout: Path, args: argparse.Namespace) -> float:
    """One round in a fresh process importing ``checkout``'s service."""
    command = [
        sys.executable,
        __file__,
        "--child",
        "--repository",
        str(args.repository),
        "--model",
        args.model,
        "--requests",
        str(args.requests),
        "--concurrency",
        str(args.concurrency),
        *(["--binary"] if args.binary else []),
    ]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(
        command, cwd=checkout, env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument("--binary", action="store_true", help="binary tensors, not JSON")
    parser.add_argument("--requests", type=int, default=4000, help="timed requests per round")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--rounds", type=int, default=5, help="A B rounds")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repository = args.repository.resolve()
    if args.child:
        print(f"{measure(args):.2f}")
        return
    sides = {"this checkout": ROOT} | (
        {"baseline": args.baseline.resolve()} if args.baseline else {}
    )
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, checkout in sides.items():
            times[name].append(side(checkout, args))
    kind = "binary" if args.binary else "JSON"
    print(
        f"{args.model}, batch-1 {kind} requests, {args.concurrency} in flight, "
        f"{args.requests} per round, {args.rounds} rounds, in-process ASGI (no HTTP)"
    )
    print("| app | us/request, median | rounds |")
    print("|---|---|---|")
    for name, values in times.items():
        print(
            f"| {name} | {statistics.median(values):.1f} | "
            f"{', '.join(f'{v:.1f}' for v in values)} |"
        )
    if args.baseline:
        ratio = statistics.median(times["this checkout"]) / statistics.median(times["baseline"])
        print(f"\nthis checkout / baseline: {ratio:.3f}x the time per request")


if __name__ == "__main__":
    main()
