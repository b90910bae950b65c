"""Where FoldServe's time goes under one gRPC cell of bench/grpc_throughput.py.

    python bench/grpc_profile.py --repository models --model digits_cnn --batch 1 --in-flight 64
    python bench/grpc_profile.py --server floor      # the bare grpc.aio floor, same cell
    python bench/grpc_profile.py --server floor-hop  # ... each call awaiting a thread first

It starts the server as bench/grpc_throughput.py does (``--workers`` processes), drives
it with h2load on the cell's prepared ModelInfer frame, and meanwhile records every
worker with py-spy (``pip install py-spy``; sampling, ``--nonblocking``, so the
server runs at full speed). It prints the CPU each thread of each worker used (from
/proc: the event loop, grpcio's own threads, ONNX Runtime's) and the event loops'
samples by what they were doing. grpcio's Cython code is invisible to py-spy: its
time shows as the event loop's own callbacks (``Handle._run``) and as its threads.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_load
import throughput_load as load
import throughput_servers as servers
from grpc_cells import CONNECTIONS, wait_grpc
from processes import free_port
from throughput_profile import categorize as profile_categories
from throughput_profile import thread_cpu

# A sample is charged to the innermost frame that matches; within a frame, the first category.
CATEGORIES = [
    ("ONNX Runtime call", ("Session.run", "run_batch", "LoadedModel.run")),
    ("gRPC decode", ("decode_grpc_request",)),
    ("gRPC encode", ("encode_grpc_response",)),
    ("request checks", ("prepare_feeds", "select_outputs", "decode_infer_request")),
    ("batching", ("DynamicBatcher", "_take_batch", "_dispatch")),
    ("metrics", ("RequestTracker", "count_request", "prometheus_client")),
    ("protobuf", ("google/protobuf", "message.py")),
    ("data plane", ("dataplane/plane.py",)),
    # gate.py: the call gate of checkouts before 2026-12-08 (a --baseline may be one)
    ("gRPC servicer", ("service/grpc/servicer.py", "service/grpc/gate.py")),
    ("hand-off to a thread (executor submit)", ("ThreadPoolExecutor.submit",)),
    ("grpc.aio Python layer", ("grpc/aio", "grpc/_")),
    ("garbage collection", ("<GC>", "gc_collect")),
    ("HTTP + framework", ("uvicorn", "starlette", "fastapi")),
]


def categorize(raw_profile: Path) -> tuple[collections.Counter[str], int]:
    """The event loops' samples (all workers together) by this module's categories."""
    return profile_categories(
        raw_profile, CATEGORIES, "event loop callbacks (grpcio's Cython, the loop)"
    )


def server_spec(args: argparse.Namespace, grpc_port: int) -> servers.ServerSpec:
    workers = ["--workers", str(args.workers)]
    if args.server in ("floor", "floor-hop"):
        command = [sys.executable, str(servers.PEERS / "grpc_floor.py"), *workers]
        if args.server == "floor-hop":
            return servers.ServerSpec("grpc-floor", "gRPC floor, --hop", [*command, "--hop"])
        return servers.ServerSpec("grpc-floor", "gRPC floor", command)
    command = [sys.executable, "-m", "service", "--repository", str(args.repository.resolve())]
    command += ["--providers", "cpu", *workers, "--grpc-port", str(grpc_port)]
    return servers.ServerSpec("fold", "FoldServe", command)


def worker_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(p) for p in children] or [pid]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--server", choices=["fold", "floor", "floor-hop"], default="fold")
    parser.add_argument("--model", default="digits_cnn")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--in-flight", type=int, default=64, choices=list(CONNECTIONS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--raw", type=Path, help="keep the raw py-spy profile here")
    args = parser.parse_args()
    # on PATH, or beside this interpreter (a virtual environment not activated)
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=Path(sys.executable).parent)
    if py_spy is None:
        raise SystemExit("bench/grpc_profile.py needs py-spy: pip install py-spy")
    name, sample = load.model_input(args.repository, args.model)
    payload = grpc_load.make_payload(args.model, name, sample, args.batch)
    grpc_port = free_port()
    spec = server_spec(args, grpc_port)
    with tempfile.TemporaryDirectory(prefix="grpc-profile-") as tmp:
        server = servers.start(spec, Path(tmp))
        try:
            target = f"127.0.0.1:{grpc_port if args.server == 'fold' else server.port}"
            wait_grpc(server, target, payload)
            frame, log = payload.write(Path(tmp)), Path(tmp) / "h2load.log"
            connections = CONNECTIONS[args.in_flight]
            grpc_load.run_h2load(f"http://{target}", frame, *connections, 3, log)  # warm-up
            pids = worker_pids(server.process.pid)
            before = {pid: thread_cpu(pid) for pid in pids}
            profile = Path(tmp) / "profile.txt"
            record = [py_spy, "record", "--nonblocking", "--subprocesses", "--format", "raw"]
            record += ["--pid", str(server.process.pid), "--rate", "200"]
            record += ["--duration", str(round(args.seconds)), "--output", str(profile)]
            recorder = subprocess.Popen(
                record, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            h2 = grpc_load.run_h2load(f"http://{target}", frame, *connections, args.seconds, log)
            after = {pid: thread_cpu(pid) for pid in pids}
            recorder.wait(timeout=60)
        finally:
            servers.stop(server)
        counts, samples = categorize(profile)
        if args.raw:
            shutil.copyfile(profile, args.raw)
    rate = h2.done / h2.seconds
    print(
        f"{spec.label}, {args.model} batch {args.batch}, {args.in_flight} calls in flight "
        f"({connections[0]} connections x {connections[1]} streams): {rate:,.0f} calls/s, "
        f"p50 {h2.percentile_ms(0.5):.1f} ms, p99 {h2.percentile_ms(0.99):.1f} ms"
    )
    print(f"\nCPU per thread over {h2.seconds:.1f} s (1.00 = one CPU busy throughout):")
    total = 0.0
    for pid in pids:
        used = {k: (v - before[pid].get(k, 0.0)) / h2.seconds for k, v in after[pid].items()}
        total += sum(used.values())
        for key in sorted(used, key=lambda k: used[k], reverse=True):
            if used[key] >= 0.01:
                per_call = used[key] / rate * 1e6
                print(f"  worker {pid} {key:28s} {used[key]:5.2f}  ({per_call:,.0f} us per call)")
    print(f"  all workers: {total:.2f} CPUs, {total / rate * 1e6:,.0f} us per call")
    print(f"\nevent loop threads, {samples} py-spy samples:")
    for name, n in counts.most_common():
        print(f"  {name:48s} {n / max(samples, 1):6.1%}")


if __name__ == "__main__":
    main()
