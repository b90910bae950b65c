"""gRPC throughput: FoldServe's gRPC beside its REST, MLServer's and KServe's gRPC, a gRPC floor.

    python bench/grpc_throughput.py --repository models
    python bench/grpc_throughput.py --quick            # the cells the targets name, 3 s each
    python bench/grpc_throughput.py --servers floor,mlserver,kserve --seconds 5
    python bench/grpc_throughput.py --record docs/benchmarks.md

Servers, one at a time, each with ``--workers`` processes where it takes a count:
the gRPC floor (bench/peers/grpc_floor.py: a bare ``grpc.aio`` server answering a
constant), FoldServe (``--grpc-port``; also its REST JSON and binary tensors on the
same server, driven by wrk), MLServer (``parallel_workers``; one process serves its
gRPC and REST) and KServe (its gRPC server runs in the main process whatever its
REST worker count, so it runs with one). Cells: model x batch x calls in flight,
each call carrying ``batch`` samples. gRPC through h2load on prepared ModelInfer
frames (bench/grpc_load.py), with ``CONNECTIONS`` connections and streams per
connection for each number of calls in flight; REST through wrk with that many
keep-alive connections, one request in flight each.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import grpc_load
import onnxruntime as ort
import throughput_load as load
import throughput_servers as servers
from grpc_cells import CONNECTIONS, GrpcLoad, RestLoad, Run, Server
from grpc_report import cell_line, ratios, tables
from markdown_section import publish
from processes import free_port

START, END = "<!-- grpc-throughput:start -->", "<!-- grpc-throughput:end -->"
MODELS = ("digits_cnn", "resnet_bench")
STREAM_MESSAGES = 16  # requests per ModelStreamInfer stream in the stream rows
BATCHES = (1, 32)
# The cells the targets compare: digits_cnn batch 1 and resnet_bench batch 32.
QUICK = (("digits_cnn", 1), ("resnet_bench", 32))


def server_list(args: argparse.Namespace, log: Path) -> list[Server]:
    repo = str(args.repository.resolve())
    workers = ["--workers", str(args.workers)]
    wanted = args.servers.split(",")
    found: list[Server] = []
    with log.open("a") as out:
        if "floor" in wanted:
            command = [sys.executable, str(servers.PEERS / "grpc_floor.py"), *workers]
            found.append(Server(servers.ServerSpec("grpc-floor", "gRPC floor", command), None))
        if "fold" in wanted:
            port = free_port()
            command = [sys.executable, "-m", "service", "--repository", repo]
            command += ["--providers", "cpu", *workers, "--grpc-port", str(port)]
            found.append(Server(servers.ServerSpec("fold", "FoldServe", command), port, True))
        if "mlserver" in wanted:
            port = free_port()
            python = servers.peer_python(servers.MLSERVER_VENV, servers.MLSERVER_PACKAGES, out)
            command = [str(python), str(servers.PEERS / "mlserver_onnx.py"), "--repository", repo]
            command += ["--grpc-port", str(port), *workers]
            found.append(Server(servers.ServerSpec("mlserver", "MLServer", command), port))
        if "kserve" in wanted:
            port = free_port()
            python = servers.peer_python(servers.KSERVE_VENV, servers.KSERVE_PACKAGES, out)
            command = [str(python), str(servers.PEERS / "kserve_onnx.py"), "--repository", repo]
            command += ["--enable_grpc", "true", "--grpc_port", str(port), "--workers", "1"]
            command += ["--configure_logging", "false", "--enable_latency_logging", "false"]
            found.append(Server(servers.ServerSpec("kserve", "KServe", command), port))
    return found


def fold_has_grpc() -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "service", "--help"],
        capture_output=True,
        text=True,
        cwd=servers.ROOT,
        check=False,
    )
    return "--grpc-port" in done.stdout


def cells_of(args: argparse.Namespace) -> Iterator[tuple[str, int]]:
    for model in args.models.split(","):
        for batch in BATCHES:
            if not args.quick or (model, batch) in QUICK:
                yield model, batch


def measure_server(run: Run, server: Server, running: servers.RunningServer) -> None:
    """Every model and batch; for each, every call count through each transport in turn, so
    that the cells a ratio compares are measured next to each other."""
    loads: list[GrpcLoad | RestLoad] = [GrpcLoad(run, server, running)]
    if server.rest:  # FoldServe: a stream of many requests, and REST, beside its unary gRPC
        loads += [GrpcLoad(run, server, running, STREAM_MESSAGES)]
        loads += [RestLoad(run, running, "json"), RestLoad(run, running, "binary")]
    for model, batch in cells_of(run.args):
        for each in loads:
            each.prepare(model, batch)
        for in_flight in run.args.in_flight:
            for each in loads:
                cell = each.measure(in_flight)
                run.cells.append(cell)
                print(cell_line(cell), flush=True)


def conditions(args: argparse.Namespace, before: tuple[float, float]) -> list[str]:
    one, five, _ = os.getloadavg()
    h2load = subprocess.run(
        [grpc_load.require_h2load(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    versions = [f"python {platform.python_version()}", f"grpcio {grpc.__version__}"]
    versions.append(f"onnxruntime {ort.__version__}")
    if "mlserver" in args.servers:
        versions.append(
            f"mlserver {servers.pip_version(servers.MLSERVER_VENV / 'bin' / 'python', 'mlserver')}"
        )
    if "kserve" in args.servers:
        versions.append(
            f"kserve {servers.pip_version(servers.KSERVE_VENV / 'bin' / 'python', 'kserve')}"
        )
    streams = ", ".join(
        f"{n}: {c} x {m}" for n, (c, m) in CONNECTIONS.items() if n in args.in_flight
    )
    return [
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {load.cpu_model()}, "
        f"{len(os.sched_getaffinity(0))} usable CPUs; load average before: "
        f"{before[0]:.2f} {before[1]:.2f}, after: {one:.2f} {five:.2f}",
        f"- {', '.join(versions)}; {h2load} (gRPC), wrk (REST), 1 thread each",
        f"- each cell: {args.seconds:g} s, closed loop, after a {args.warmup:g} s warm-up per "
        "server, model, batch and transport; a server's transports take turns at each number "
        f"of calls in flight; one server running at a time; {args.workers} "
        "worker processes for FoldServe and the floor (uvloop, as FoldServe's), MLServer's "
        "parallel_workers the same (one frontend process), KServe's gRPC in its one main "
        "process; every server with its defaults otherwise (FoldServe: access log on for "
        "REST, none for gRPC, batching on; MLServer logs each gRPC call)",
        f"- calls in flight: connections x streams per connection (gRPC) = {streams}; REST: "
        "that many keep-alive connections, one request each",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--servers", default="floor,fold,mlserver,kserve")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--in-flight", default="1,8,64", help=f"any of {list(CONNECTIONS)}")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="digits b1, resnet b32, 64, 3 s")
    parser.add_argument("--record", type=Path, help="write the table into this markdown file")
    args = parser.parse_args()
    args.in_flight = [int(n) for n in args.in_flight.split(",")]
    if args.quick:
        args.in_flight, args.seconds, args.warmup = [64], 3.0, 1.0
    if "fold" in args.servers.split(",") and not fold_has_grpc():
        raise SystemExit(
            "this checkout's `python -m service` has no --grpc-port: --servers without fold"
        )
    # SIGTERM unwinds like an error, so the server running at that moment is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))
    before = os.getloadavg()[:2]
    with tempfile.TemporaryDirectory(prefix="grpc-throughput-") as tmp:
        run = Run(args, Path(tmp))
        for server in server_list(args, run.workdir / "venv.log"):
            running = servers.start(server.spec, run.workdir)
            try:
                measure_server(run, server, running)
            except Exception:
                print(running.log_path.read_text()[-3000:], file=sys.stderr)
                raise
            finally:
                servers.stop(running)
        groups = list(cells_of(args))
        lines = [*conditions(args, before), "", *tables(run.cells, groups, args.in_flight)]
        lines += [*ratios(run.cells, args.in_flight), "", *run.notes]
    record = args.record or Path(os.devnull)
    publish(lines, record, START, END, write=args.record is not None)


if __name__ == "__main__":
    main()
