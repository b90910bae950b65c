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
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
import grpc_load
import numpy as np
import onnxruntime as ort
import throughput_load as load
import throughput_servers as servers
from grpc_report import Cell, cell_line, ratios, tables
from markdown_section import publish

START, END = "<!-- grpc-throughput:start -->", "<!-- grpc-throughput:end -->"
# calls in flight -> (connections, streams in flight per connection); 16 connections at 64
# spread over the workers' shared port more evenly than 8 would.
CONNECTIONS = {1: (1, 1), 8: (8, 1), 64: (16, 4)}
MODELS = ("digits_cnn", "resnet_bench")
BATCHES = (1, 32)
# The cells the targets compare: digits_cnn batch 1 and resnet_bench batch 32.
QUICK = (("digits_cnn", 1), ("resnet_bench", 32))


@dataclass(frozen=True)
class Server:
    """A server of the run: how it starts, its gRPC port, whether its REST is measured too."""

    spec: servers.ServerSpec
    grpc_port: int | None  # None: its --port is its gRPC port (the floor)
    rest: bool = False

    def grpc_target(self, running: servers.RunningServer) -> str:
        return f"127.0.0.1:{self.grpc_port or running.port}"


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds so far: the server's, the whole machine's, and this benchmark's own
    (this process and its finished children, the load generators)."""

    server: float
    machine: float
    ours: float

    @classmethod
    def take(cls, running: servers.RunningServer) -> CpuSnapshot:
        ours = time.process_time() + load.children_cpu_seconds()
        return cls(running.cpu_seconds(), load.machine_busy_seconds(), ours)

    def since(self, before: CpuSnapshot, seconds: float) -> tuple[float, float]:
        """The server's CPU seconds since ``before``, and the CPUs anything else kept busy
        meanwhile (the other users of a shared machine), on average."""
        server = self.server - before.server
        other = self.machine - before.machine - server - (self.ours - before.ours)
        return server, max(0.0, other) / max(seconds, 1e-9)


@dataclass
class Run:
    args: argparse.Namespace
    workdir: Path
    cells: list[Cell] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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
            port = servers.free_port()
            command = [sys.executable, "-m", "service", "--repository", repo]
            command += ["--providers", "cpu", *workers, "--grpc-port", str(port)]
            found.append(Server(servers.ServerSpec("fold", "FoldServe", command), port, True))
        if "mlserver" in wanted:
            port = servers.free_port()
            python = servers.peer_python(servers.MLSERVER_VENV, servers.MLSERVER_PACKAGES, out)
            command = [str(python), str(servers.PEERS / "mlserver_onnx.py"), "--repository", repo]
            command += ["--grpc-port", str(port), *workers]
            found.append(Server(servers.ServerSpec("mlserver", "MLServer", command), port))
        if "kserve" in wanted:
            port = servers.free_port()
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


def wait_grpc(running: servers.RunningServer, target: str, payload: grpc_load.GrpcPayload) -> None:
    """Until ``servers.READY_IN_A_ROW`` ModelInfer calls in a row on ``target`` succeed, each
    on a new connection (every worker listens and has loaded the model), as
    :func:`throughput_servers.wait_ready` does for HTTP."""
    deadline = time.monotonic() + 180.0
    answered = 0
    while answered < servers.READY_IN_A_ROW:
        if running.process.poll() is not None:
            raise RuntimeError(f"{running.spec.label} exited; log: {running.log_path}")
        try:
            grpc_load.call_raw(target, payload, timeout=10.0)  # a new channel each time
            answered += 1
        except grpc.RpcError:
            answered = 0
            if time.monotonic() > deadline:
                raise RuntimeError(f"{running.spec.label}: no gRPC answer") from None
            time.sleep(0.3)


@dataclass(frozen=True)
class ServedCounts:
    """FoldServe's own counters for one model (all workers, any transport), from /metrics."""

    ok: float  # foldserve_inference_requests_total, status 200
    calls: float  # ONNX Runtime calls of the dynamic batcher
    batched: float  # requests those calls carried

    @classmethod
    def read(cls, url: str, model: str) -> ServedCounts:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
            text = response.read().decode()
        totals = {"ok": 0.0, "calls": 0.0, "batched": 0.0}
        families = {
            "foldserve_inference_requests_total{": "ok",
            "foldserve_batch_requests_count{": "calls",
            "foldserve_batch_requests_sum{": "batched",
        }
        for line in text.splitlines():
            family = next((f for f in families if line.startswith(f)), None)
            if family is None or f'model="{model}"' not in line:
                continue
            # a gRPC call's status label is the HTTP status of the same outcome
            if families[family] == "ok" and 'status="200"' not in line:
                continue
            totals[families[family]] += float(line.rsplit(" ", 1)[1])
        return cls(**totals)

    def since(self, before: ServedCounts) -> tuple[int, float]:
        """Requests served since ``before``, and requests per ONNX Runtime call."""
        calls = self.calls - before.calls
        return int(self.ok - before.ok), (self.batched - before.batched) / max(calls, 1.0)


def reference(repository: Path, payload: grpc_load.GrpcPayload) -> dict[str, np.ndarray]:
    """ONNX Runtime's own outputs for the payload's inputs, by name."""
    session = ort.InferenceSession(
        str(load.model_file(repository, payload.model)), providers=["CPUExecutionProvider"]
    )
    results = session.run(None, {payload.input_name: payload.inputs})
    return {o.name: np.asarray(y) for o, y in zip(session.get_outputs(), results, strict=True)}


def cells_of(args: argparse.Namespace) -> Iterator[tuple[str, int]]:
    for model in args.models.split(","):
        for batch in BATCHES:
            if not args.quick or (model, batch) in QUICK:
                yield model, batch


class GrpcLoad:
    """One model and batch through gRPC on one server: warm-up, then a cell per call count."""

    def __init__(self, run: Run, server: Server, running: servers.RunningServer) -> None:
        self.run, self.server, self.running = run, server, running
        self.target = server.grpc_target(running)
        self.floor = server.grpc_port is None

    def prepare(self, model: str, batch: int) -> None:
        args = self.run.args
        name, sample = load.model_input(args.repository, model)
        self.payload = grpc_load.make_payload(model, name, sample, batch)
        self.frame = self.payload.write(self.run.workdir)
        self.log = self.run.workdir / "h2load.log"
        wait_grpc(self.running, self.target, self.payload)
        self.answer = grpc_load.answer_frame_bytes(self.target, self.payload)
        self.expected = None if self.floor else reference(args.repository, self.payload)
        many = CONNECTIONS[max(args.in_flight)]
        grpc_load.run_h2load(f"http://{self.target}", self.frame, *many, args.warmup, self.log)

    def measure(self, in_flight: int) -> Cell:
        payload, running = self.payload, self.running
        counted = self.server.rest  # FoldServe: its own counters beside
        before_counts = ServedCounts.read(running.url, payload.model) if counted else None
        before = CpuSnapshot.take(running)
        h2 = grpc_load.run_h2load(
            f"http://{self.target}",
            self.frame,
            *CONNECTIONS[in_flight],
            self.run.args.seconds,
            self.log,
        )
        cpu, other = CpuSnapshot.take(running).since(before, h2.seconds)
        ok, per_call = None, None
        if before_counts is not None:
            ok, per_call = ServedCounts.read(running.url, payload.model).since(before_counts)
        diff = grpc_load.check_answers(self.target, payload, self.expected)
        answered = h2.answered(self.answer)
        cell = Cell(
            f"{running.spec.label} gRPC",
            payload.model,
            payload.batch,
            in_flight,
            h2.done,
            answered,
            h2.seconds,
            h2.percentile_ms(0.5),
            h2.percentile_ms(0.99),
            cpu / max(answered, 1) * 1e6,
            other,
            ok,
            per_call,
            None if self.floor else diff,
        )
        if h2.failed or answered != h2.done:
            self.run.notes.append(
                f"- {cell.row}, {cell.model} batch {cell.batch} @{in_flight}: "
                f"{h2.done - answered} of {h2.done} calls got no answer, {h2.failed} failed "
                "in h2load"
            )
        return cell


class RestLoad:
    """One model and batch through FoldServe's REST route (JSON or binary tensors, the gRPC
    cells' inputs), with wrk."""

    def __init__(self, run: Run, running: servers.RunningServer, kind: str) -> None:
        self.run, self.running, self.kind = run, running, kind

    def prepare(self, model: str, batch: int) -> None:
        args = self.run.args
        name, sample = load.model_input(args.repository, model)
        self.model, self.batch = model, batch
        self.payload = load.make_payload(name, sample, batch, self.kind)
        self.body = self.payload.write(self.run.workdir, model)
        path = f"/v2/models/{model}/infer"
        self.url = self.running.url + path
        servers.wait_ready(self.running, path, self.payload.body, self.payload.headers)
        many = max(args.in_flight)
        load.run_wrk(self.url, self.body, self.payload.headers, many, args.warmup)

    def measure(self, in_flight: int) -> Cell:
        running = self.running
        before_counts = ServedCounts.read(running.url, self.model)
        before = CpuSnapshot.take(running)
        raw = load.run_wrk(
            self.url, self.body, self.payload.headers, in_flight, self.run.args.seconds
        )
        cpu, other = CpuSnapshot.take(running).since(before, raw["duration_us"] / 1e6)
        failed = sum(
            int(raw[k]) for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
        )
        answered = int(raw["requests"]) - int(raw["status_errors"])
        ok, per_call = ServedCounts.read(running.url, self.model).since(before_counts)
        return Cell(
            f"{running.spec.label} REST {'JSON' if self.kind == 'json' else 'binary'}",
            self.model,
            self.batch,
            in_flight,
            int(raw["requests"]) + failed,
            answered,
            raw["duration_us"] / 1e6,
            raw["p50_us"] / 1e3,
            raw["p99_us"] / 1e3,
            cpu / max(answered, 1) * 1e6,
            other,
            ok,
            per_call,
        )


def measure_server(run: Run, server: Server, running: servers.RunningServer) -> None:
    """Every model and batch; for each, every call count through each transport in turn, so
    that the cells a ratio compares are measured next to each other."""
    loads: list[GrpcLoad | RestLoad] = [GrpcLoad(run, server, running)]
    if server.rest:
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
