"""gRPC load for bench/grpc_throughput.py: prepared ModelInfer frames, h2load runs, checks.

h2load (``apt-get install -y nghttp2-client``), written in C, sends one prepared
request over and over: a ``ModelInferRequest`` (tensors in
``raw_input_contents``) framed as gRPC (a 0 compression flag, the 4-byte
big-endian length, the message) and POSTed to
``/inference.GRPCInferenceService/ModelInfer`` with ``content-type:
application/grpc`` and ``te: trailers``. C connections, each with M streams in
flight (a closed loop).

h2load cannot see gRPC failures: a failed call is an HTTP 200 whose
``grpc-status`` trailer is not 0, and h2load counts it as 2xx. A gRPC
server's failed unary call carries no message, only that trailer, so the DATA
bytes h2load received, divided by the size of one framed answer (every answer of
a cell has the same size: same model, same batch, same output), count the calls
that got an answer: that is the goodput here. After each cell a few calls through
``tritonclient.grpc`` check the answers themselves against ONNX Runtime.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2

METHOD = "/inference.GRPCInferenceService/ModelInfer"
# A stream carrying many requests: one h2load request is a ModelStreamInfer call whose body
# is that many framed ModelInferRequests, answered by as many ModelStreamInferResponses.
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
HEADERS = ["content-type: application/grpc", "te: trailers"]
# Large tensors (resnet_bench at batch 32 is 384 KiB per request) pass grpcio's 4 MiB default;
# the answers are small.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class GrpcPayload:
    """One ModelInfer request: the message, its gRPC frame (what h2load sends), the inputs."""

    model: str
    input_name: str
    batch: int
    message: bytes
    inputs: np.ndarray  # (B, *sample) float32

    @property
    def frame(self) -> bytes:
        return b"\x00" + struct.pack(">I", len(self.message)) + self.message

    def write(self, directory: Path, messages: int = 1) -> Path:
        """The frame file h2load sends: one frame (a unary call), or ``messages`` frames
        (the body of one ModelStreamInfer call)."""
        path = directory / f"{self.model}-grpc-b{self.batch}-x{messages}.frame"
        path.write_bytes(self.frame * messages)
        return path


def make_payload(
    model: str, name: str, sample: list[int], batch: int, seed: int = 0
) -> GrpcPayload:
    """``batch`` random samples as one FP32 tensor in ``raw_input_contents``."""
    x = np.random.default_rng(seed).normal(size=(batch, *sample)).astype(np.float32)
    tensor = service_pb2.ModelInferRequest.InferInputTensor(
        name=name, datatype="FP32", shape=list(x.shape)
    )
    request = service_pb2.ModelInferRequest(
        model_name=model, inputs=[tensor], raw_input_contents=[x.astype("<f4").tobytes()]
    )
    return GrpcPayload(model, name, batch, request.SerializeToString(), x)


@dataclass(frozen=True)
class H2Result:
    """One h2load run: its counters (2xx is not goodput, see the module docstring)."""

    seconds: float
    done: int  # responses h2load completed
    http_2xx: int
    failed: int  # h2load's failed + errored + timeout
    data_bytes: int  # DATA frame payload received: the framed answers
    latencies_us: list[int]

    def answered(self, answer_frame_bytes: int) -> int:
        """Calls that got an answer (a message), from the DATA bytes."""
        return self.data_bytes // answer_frame_bytes

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_us:
            return float("nan")
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e3


REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
STATUS = re.compile(r"status codes: (\d+) 2xx")
TRAFFIC = re.compile(r"traffic: .*?\((\d+)\) data")
FINISHED = re.compile(r"finished in ([0-9.]+)(ms|s),")


def require_h2load() -> str:
    h2load = shutil.which("h2load")
    if h2load is None:
        raise SystemExit("bench/grpc_throughput.py needs h2load: apt-get install -y nghttp2-client")
    return h2load


def run_h2load(
    url: str,
    frame_file: Path,
    connections: int,
    streams: int,
    seconds: float,
    log_file: Path,
    method: str = METHOD,
) -> H2Result:
    """One closed-loop h2load run of ``seconds`` against ``url`` (``http://host:port``): one
    thread, ``connections`` connections with ``streams`` calls in flight on each."""
    command = [
        require_h2load(),
        "-t1",
        f"-c{connections}",
        f"-m{streams}",
        f"-D{max(1, round(seconds))}",
        *(f"-H{h}" for h in HEADERS),
        "-d",
        str(frame_file),
        "--log-file",
        str(log_file),
        url + method,
    ]
    log_file.unlink(missing_ok=True)  # h2load appends to it
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    out = done.stdout
    counts, status, traffic, finished = (
        p.search(out) for p in (REQUESTS, STATUS, TRAFFIC, FINISHED)
    )
    if not (counts and status and traffic and finished):
        raise RuntimeError(f"h2load printed no result:\n{out}\n{done.stderr}")
    elapsed = float(finished[1]) / (1e3 if finished[2] == "ms" else 1.0)
    latencies = [int(line.split("\t")[2]) for line in log_file.read_text().splitlines() if line]
    return H2Result(
        seconds=elapsed,
        done=int(counts[3]),
        http_2xx=int(status[1]),
        failed=int(counts[5]) + int(counts[6]) + int(counts[7]),
        data_bytes=int(traffic[1]),
        latencies_us=latencies,
    )


def channel(target: str) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    options += [("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    return grpc.insecure_channel(target, options=options)


def call_raw(target: str, payload: GrpcPayload, timeout: float = 30.0) -> bytes:
    """The serialized answer to ``payload`` (``target``: ``host:port``); raises
    :class:`grpc.RpcError` when the call fails."""
    with channel(target) as ch:
        infer = ch.unary_unary(METHOD)  # no (de)serializers: bytes in, bytes out
        answer: bytes = infer(payload.message, timeout=timeout)
        return answer


def stream_raw(target: str, payload: GrpcPayload, timeout: float = 30.0) -> bytes:
    """The serialized ModelStreamInferResponse to ``payload`` sent alone on a stream."""
    with channel(target) as ch:
        stream = ch.stream_stream(STREAM_METHOD)  # bytes in, bytes out
        (answer,) = list(stream(iter([payload.message]), timeout=timeout))
        return bytes(answer)


def answer_frame_bytes(
    target: str, payload: GrpcPayload, calls: int = 3, stream: bool = False
) -> int:
    """The framed size of the answer to ``payload`` (a unary call's, or one stream
    message's); the same for ``calls`` calls, or an error (the DATA-bytes goodput count
    needs one size)."""
    call = stream_raw if stream else call_raw
    sizes = {len(call(target, payload)) for _ in range(calls)}
    if len(sizes) != 1:
        raise RuntimeError(f"{payload.model}: answers of different sizes {sorted(sizes)}")
    return 5 + sizes.pop()


def check_answers(
    target: str, payload: GrpcPayload, expected: dict[str, np.ndarray] | None, calls: int = 3
) -> float:
    """``calls`` calls through ``tritonclient.grpc``; the largest absolute difference of any
    output from ``expected`` (``None``: only that every call succeeds; 0.0 is returned)."""
    client = triton.InferenceServerClient(target)
    try:
        worst = 0.0
        for _ in range(calls):
            tensor = triton.InferInput(payload.input_name, list(payload.inputs.shape), "FP32")
            tensor.set_data_from_numpy(payload.inputs)
            result = client.infer(payload.model, [tensor])
            for name, want in (expected or {}).items():
                got = result.as_numpy(name)
                if got is None or got.shape != want.shape:
                    raise RuntimeError(f"{payload.model}: output {name} missing or misshapen")
                worst = max(worst, float(np.abs(got - want).max()))
        return worst
    finally:
        client.close()
