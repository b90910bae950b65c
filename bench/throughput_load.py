"""Load for bench/throughput.py: request bodies, the wrk runs, and raw ONNX Runtime's own rate.

wrk (``apt-get install -y wrk``) drives each server: one wrk thread, C
keep-alive connections with one request in flight each (a closed loop), the
same body every time, read by ``bench/wrk/post.lua``. It is written in C and
costs the servers little of the machine's CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

LUA = Path(__file__).resolve().parent / "wrk" / "post.lua"


@dataclass(frozen=True)
class Payload:
    """One request, as the file wrk sends and the headers that go with it."""

    kind: str  # "json" or "binary"
    batch: int
    body: bytes
    headers: dict[str, str]
    inputs: np.ndarray  # what the body carries, for checking answers

    def write(self, directory: Path, stem: str) -> Path:
        path = directory / f"{stem}-{self.kind}-b{self.batch}.body"
        path.write_bytes(self.body)
        return path


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx answers, socket errors and timeouts
    server_cpu_us: float  # server CPU time per answered request
    other_cores: float  # CPUs busy with anything but this server and wrk, on average

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def model_input(repository: Path, model: str) -> tuple[str, list[int]]:
    """The (single) input's name and its shape without the batch axis, from metadata.json."""
    version = max((p for p in (repository / model).iterdir() if p.name.isdigit()), key=_number)
    meta = json.loads((version / "metadata.json").read_text())
    spec = meta["inputs"][0]
    return str(spec["name"]), [int(d) for d in spec["shape"][1:]]


def _number(path: Path) -> int:
    return int(path.name)


def model_file(repository: Path, model: str) -> Path:
    version = max((p for p in (repository / model).iterdir() if p.name.isdigit()), key=_number)
    return version / "model.onnx"


def make_payload(name: str, sample: list[int], batch: int, kind: str, seed: int = 0) -> Payload:
    """A V2 request of ``batch`` random samples: JSON numbers, or binary tensors in and out."""
    x = np.random.default_rng(seed).normal(size=(batch, *sample)).astype(np.float32)
    tensor: dict[str, Any] = {"name": name, "shape": list(x.shape), "datatype": "FP32"}
    if kind == "json":
        tensor["data"] = x.ravel().tolist()
        body = json.dumps({"inputs": [tensor]}).encode()
        return Payload(kind, batch, body, {"Content-Type": "application/json"}, x)
    raw = x.astype("<f4").tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }
    return Payload(kind, batch, head + raw, headers, x)


def require_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("bench/throughput.py needs wrk: apt-get install -y wrk")
    return wrk


def run_wrk(
    url: str, body_file: Path, headers: dict[str, str], connections: int, seconds: float
) -> dict[str, Any]:
    """One closed-loop wrk run; its counters and latency percentiles (microseconds)."""
    command = [
        require_wrk(),
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "60s",
        "-s",
        str(LUA),
        url,
        "--",
        str(body_file),
        *(f"{k}={v}" for k, v in headers.items()),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), for a benchmark's conditions."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: not idle, not iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children (the wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summarize(raw: dict[str, Any], cpu_seconds: float, other_seconds: float) -> LoadResult:
    errors = sum(
        int(raw[k])
        for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    requests = int(raw["requests"])
    return LoadResult(
        requests=requests,
        seconds=raw["duration_us"] / 1e6,
        p50_ms=raw["p50_us"] / 1e3,
        p99_ms=raw["p99_us"] / 1e3,
        errors=errors,
        server_cpu_us=cpu_seconds / max(requests, 1) * 1e6,
        other_cores=max(0.0, other_seconds) / max(raw["duration_us"] / 1e6, 1e-9),
    )


@dataclass(frozen=True)
class RawRate:
    """Raw ONNX Runtime at one batch size: samples/s, and CPU microseconds per sample."""

    rate: float
    cpu_us: float


def raw_ort_rate(
    model: Path, sample: list[int], batch: int, threads: int, seconds: float
) -> RawRate:
    """Back-to-back ``session.run`` calls with FoldServe's session options: samples/s, and
    this process's CPU per sample (ONNX Runtime's threads are all it runs meanwhile)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).normal(size=(batch, *sample))}
    feed = {k: v.astype(np.float32) for k, v in feed.items()}
    for _ in range(3):
        session.run(None, feed)
    calls, start, cpu = 0, time.perf_counter(), time.process_time()
    while (elapsed := time.perf_counter() - start) < seconds:
        session.run(None, feed)
        calls += 1
    cpu = time.process_time() - cpu
    return RawRate(calls * batch / elapsed, cpu / (calls * batch) * 1e6)


def decode_cpu_us(payload: Payload, root: Path, iterations: int = 300) -> float:
    """CPU microseconds FoldServe (the checkout at ``root``) spends decoding ``payload``
    (``service.rest.codec.decode_infer_request``, best of 5 rounds)."""
    import sys

    sys.path.insert(0, str(root))
    try:
        from service.rest.codec import decode_infer_request
    finally:
        sys.path.remove(str(root))
    length = payload.headers.get("Inference-Header-Content-Length")
    decode_infer_request(payload.body, length)
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(iterations):
            decode_infer_request(payload.body, length)
        best = min(best, (time.process_time() - start) / iterations * 1e6)
    return best
