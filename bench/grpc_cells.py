"""One cell of bench/grpc_throughput.py: a model and batch at a number of calls in flight,
through gRPC (h2load on prepared frames) or FoldServe's REST (wrk), with the server's CPU,
the other CPUs' load and FoldServe's own counters around it.

``GrpcLoad`` and ``RestLoad`` each ``prepare`` a model and batch (wait until every worker
answers, warm up) and then ``measure`` one cell per number of calls in flight.
"""

from __future__ import annotations

import argparse
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc_load
import numpy as np
import onnxruntime as ort
import throughput_load as load
import throughput_servers as servers
from grpc_report import Cell

# calls in flight -> (connections, streams in flight per connection); 16 connections at 64
# spread over the workers' shared port more evenly than 8 would.
CONNECTIONS = {1: (1, 1), 8: (8, 1), 64: (16, 4), 256: (32, 8)}


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


class GrpcLoad:
    """One model and batch through gRPC on one server: warm-up, then a cell per call count.

    ``messages`` > 1: each call is a ModelStreamInfer stream carrying that many requests
    (the cell counts requests, answered ones from the DATA bytes; its p50/p99 are per
    stream)."""

    def __init__(
        self, run: Run, server: Server, running: servers.RunningServer, messages: int = 1
    ) -> None:
        self.run, self.server, self.running = run, server, running
        self.target = server.grpc_target(running)
        self.floor = server.grpc_port is None
        self.messages = messages
        self.method = grpc_load.STREAM_METHOD if messages > 1 else grpc_load.METHOD

    def prepare(self, model: str, batch: int) -> None:
        args = self.run.args
        name, sample = load.model_input(args.repository, model)
        self.payload = grpc_load.make_payload(model, name, sample, batch)
        self.frame = self.payload.write(self.run.workdir, self.messages)
        self.log = self.run.workdir / "h2load.log"
        wait_grpc(self.running, self.target, self.payload)
        stream = self.messages > 1
        self.answer = grpc_load.answer_frame_bytes(self.target, self.payload, stream=stream)
        self.expected = None if self.floor else reference(args.repository, self.payload)
        self.h2load(CONNECTIONS[max(args.in_flight)], args.warmup)

    def h2load(self, many: tuple[int, int], seconds: float) -> grpc_load.H2Result:
        url = f"http://{self.target}"
        return grpc_load.run_h2load(url, self.frame, *many, seconds, self.log, self.method)

    def measure(self, in_flight: int) -> Cell:
        payload, running = self.payload, self.running
        counted = self.server.rest  # FoldServe: its own counters beside
        before_counts = ServedCounts.read(running.url, payload.model) if counted else None
        before = CpuSnapshot.take(running)
        h2 = self.h2load(CONNECTIONS[in_flight], self.run.args.seconds)
        cpu, other = CpuSnapshot.take(running).since(before, h2.seconds)
        ok, per_call = None, None
        if before_counts is not None:
            ok, per_call = ServedCounts.read(running.url, payload.model).since(before_counts)
        diff = grpc_load.check_answers(self.target, payload, self.expected)
        answered = h2.answered(self.answer)
        # A stream still open when h2load stops has its answers so far in the DATA bytes:
        # those requests count as sent too.
        sent = max(h2.done * self.messages, answered)
        kind = f"gRPC stream x{self.messages}" if self.messages > 1 else "gRPC"
        cell = Cell(
            f"{running.spec.label} {kind}",
            payload.model,
            payload.batch,
            in_flight,
            sent,
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
        if h2.failed or answered != sent:
            self.run.notes.append(
                f"- {cell.row}, {cell.model} batch {cell.batch} @{in_flight}: "
                f"{sent - answered} of {sent} requests got no answer, {h2.failed} calls "
                "failed in h2load"
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
