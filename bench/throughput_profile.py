"""Where a FoldServe server's time goes under one load cell of bench/throughput.py.

    python bench/throughput_profile.py --model resnet_bench --kind json --clients 64
    python bench/throughput_profile.py --model digits_cnn --kind json --clients 64 --no-batching

It starts FoldServe as bench/throughput.py does, drives it with wrk, and meanwhile
records it with py-spy (``pip install py-spy``; sampling, so the server runs at
full speed). It prints the CPU each thread used (from /proc: the event loop,
ONNX Runtime's threads), and the event loop's samples by what they were doing:
HTTP and framework, JSON or binary decoding, checking, batching, encoding.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import throughput_load as load
import throughput_servers as servers

# A sample is charged to the innermost frame that matches; within a frame, the first category.
CATEGORIES = [
    ("ONNX Runtime call", ("Session.run", "run_batch", "LoadedModel.run")),
    ("JSON decode", ("parse_json_object", "json_array", "decode_json_data")),
    ("binary decode", ("decode_binary_data",)),
    ("request checks", ("decode_infer_request", "prepare_feeds", "select_outputs", "_parse_v")),
    ("encode", ("_encode_v", "encode_infer_response", "dump_json")),
    ("batching", ("DynamicBatcher", "_take_batch", "_dispatch")),
    ("read body", ("read_body", "Request.stream")),
    ("metrics", ("RequestTracker", "count_request", "prometheus_client")),
    (
        "request id, access log",
        ("RequestContextMiddleware.__call__ (", "log_access", "RequestIds", "LogWriter", "uuid4"),
    ),
    ("garbage collection", ("<GC>", "gc_collect")),
    ("HTTP + framework", ("uvicorn", "starlette", "fastapi", "InferenceLane", "answer_v")),
]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid``, keyed ``tid name``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[f"{task.name} {name}"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


LOOP_THREAD = "Runner.run"  # asyncio.run's frame: the event loop's thread
LOOP_ITSELF = "event loop itself (callbacks)"


def _category(frames: list[str], categories: list[tuple[str, tuple[str, ...]]], rest: str) -> str:
    """The category of the innermost frame that has one; ``rest`` when none has."""
    for frame in reversed(frames):
        for name, needles in categories:
            if any(needle in frame for needle in needles):
                return name
    return rest


def categorize(
    raw_profile: Path,
    categories: list[tuple[str, tuple[str, ...]]] = CATEGORIES,
    rest: str = LOOP_ITSELF,
) -> tuple[collections.Counter[str], int]:
    """The event loops' samples (every process in the profile) by category (py-spy
    ``--format raw``). Only the frames the loop runs count: the ones above it (the
    server's start-up, e.g. uvicorn's) would match any sample."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_profile.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if LOOP_THREAD not in stack:  # not an event loop's thread
            continue
        total += int(n)
        frames = stack.split(";")
        inner = frames[max(i for i, f in enumerate(frames) if LOOP_THREAD in f) + 1 :]
        counts[_category(inner, categories, rest)] += int(n)
    return counts, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument("--kind", choices=["json", "binary"], default="json")
    parser.add_argument("--batch", type=int, default=1, help="samples per request")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--no-batching", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="FoldServe --threads")
    parser.add_argument("--raw", type=Path, help="keep the raw py-spy profile here")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("bench/throughput_profile.py needs py-spy: pip install py-spy")
    repository = args.repository.resolve()
    command = [sys.executable, "-m", "service", "--repository", str(repository)]
    command += ["--providers", "cpu", "--workers", "1", "--threads", str(args.threads)]
    if args.no_batching:
        command.append("--no-batching")
    spec = servers.ServerSpec("fold", "FoldServe", command)  # its defaults: access log on
    name, sample = load.model_input(repository, args.model)
    payload = load.make_payload(name, sample, args.batch, args.kind)
    path = f"/v2/models/{args.model}/infer"
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        server = servers.start(spec, Path(tmp))
        try:
            probe = load.make_payload(name, sample, 1, "json")
            servers.wait_ready(server, path, probe.body, probe.headers)
            body = payload.write(Path(tmp), args.model)
            url = server.url + path
            load.run_wrk(url, body, payload.headers, args.clients, 3)  # warm-up
            before = thread_cpu(server.process.pid)
            profile = Path(tmp) / "profile.txt"
            recorder = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--nonblocking",
                    "--pid",
                    str(server.process.pid),
                    "--format",
                    "raw",
                ]
                + [
                    "--rate",
                    "200",
                    "--duration",
                    str(round(args.seconds)),
                    "--output",
                    str(profile),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            raw = load.run_wrk(url, body, payload.headers, args.clients, args.seconds)
            after = thread_cpu(server.process.pid)
            recorder.wait(timeout=60)
        finally:
            servers.stop(server)
        counts, total = categorize(profile)
        if args.raw:
            shutil.copyfile(profile, args.raw)
    result = load.summarize(raw, 0.0, 0.0)
    print(
        f"{args.model}, {args.kind} batch-{args.batch} requests, {args.clients} clients, "
        f"batching {'off' if args.no_batching else 'on'}: {result.rps:.0f} req/s "
        f"({result.rps * args.batch:.0f} samples/s), p50 {result.p50_ms:.1f} ms, "
        f"p99 {result.p99_ms:.1f} ms"
    )
    print(f"\nCPU per thread over {result.seconds:.1f} s (1.00 = one CPU busy throughout):")
    for key in sorted(after, key=lambda k: after[k] - before.get(k, 0.0), reverse=True):
        used = (after[key] - before.get(key, 0.0)) / result.seconds
        if used >= 0.01:
            print(f"  {key:30s} {used:5.2f}  ({used / result.rps * 1e6:,.0f} us per request)")
    print(f"\nevent loop thread, {total} py-spy samples:")
    for category, n in counts.most_common():
        print(f"  {category:38s} {n / max(total, 1):6.1%}")


if __name__ == "__main__":
    main()
