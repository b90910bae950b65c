"""The server bench/rollouts.py rolls: its repository and model versions, its start from a
checkout (``--root``), its management calls, and its listening sockets watched from outside.

Two models, both the repository's breast_cancer MLP (``models/``, as ``make run`` trains
it; where it is not there, a clean clone's case, an MLP of the same shape with fixed random
weights): the one the load goes to, and another, unloaded under load. Version v of the
first is that network with its last bias moved by ``(v - 1) * BIAS_STEP``
(bench/reliability.py's step), written by the import path (``training.import_onnx``, no
torch) into a staging directory and renamed into the repository when its load event
comes, so that every answer can be checked against the outputs ONNX Runtime computes here
from the version it names.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from processes import free_port, server_worker_pids
from reliability import BIAS_STEP, onnx_outputs
from throughput_servers import BENCH, RunningServer, ServerSpec, start, stop
from tritonclient.grpc import service_pb2

from foldserve.model_format import FOLDED_FILE, VersionMetadata
from training.import_onnx import import_onnx

MODEL = "breast_cancer_mlp"
OTHER = "breast_cancer_mlp_other"  # the model unloaded under load
OTHER_SHIFT = -0.5  # its bias offset: its answers differ from every version of MODEL's
SOURCE = BENCH.parent / "models" / MODEL / "1"
API_KEY = "rollouts-key"
WATCH_S = 0.02  # the socket watcher's polling period
READY_POLL_S = 0.005  # a cold start's readiness polls (a GET on a new connection each)
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


@dataclass
class Repository:
    """The served repository, the versions staged for it, and every version's expected
    outputs for the one input ``x`` every request sends."""

    root: Path
    staging: Path
    source: Path  # MODEL's version 1, which every version is made from
    x: np.ndarray  # (1, 30): a real sample, from version 1's reference batch
    expected: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    latest: int = 1  # of MODEL, in the repository

    def stage(self, version: int) -> None:
        """Write ``version`` of MODEL into the staging directory (not yet served)."""
        shift = (version - 1) * BIAS_STEP
        shifted(self.source / FOLDED_FILE, self.staging, MODEL, version, shift)
        path = self.staging / MODEL / str(version)
        self.expected[(MODEL, str(version))] = onnx_outputs(path, self.x)

    def publish_next(self) -> int:
        """The next staged version of MODEL, renamed into the repository (appears whole)."""
        version = self.latest + 1
        if (MODEL, str(version)) not in self.expected:
            self.stage(version)
        os.rename(self.staging / MODEL / str(version), self.root / MODEL / str(version))
        self.latest = version
        return version


def shifted(source: Path, repository: Path, name: str, version: int, offset: float) -> None:
    """``source`` with the bias of the node that computes the graph's output moved by
    ``offset``, imported as ``version`` of ``name``."""
    model = onnx.load(source)
    last = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
    bias = next(i for i in model.graph.initializer if i.name == last.input[2])  # Gemm's C
    bias.CopyFrom(
        numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(offset), bias.name)
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, path)
        import_onnx(path, repository, name, version=version)


def source_version(workdir: Path) -> Path:
    """MODEL's version 1: the repository's own, or where it has not been trained, an MLP of
    its shape (30 -> 16 -> 2, Gemm, Relu, Gemm) with fixed random weights, imported."""
    if SOURCE.is_dir():
        return SOURCE
    rng = np.random.default_rng(0)
    weights: dict[str, np.ndarray] = {
        "w1": rng.normal(size=(30, 16)).astype(np.float32) / 5,
        "b1": rng.normal(size=16).astype(np.float32),
        "w2": rng.normal(size=(16, 2)).astype(np.float32) / 4,
        "b2": rng.normal(size=2).astype(np.float32),
    }
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Gemm", ["input", "w1", "b1"], ["hidden"]),
            onnx.helper.make_node("Relu", ["hidden"], ["relu"]),
            onnx.helper.make_node("Gemm", ["relu", "w2", "b2"], ["logits"]),
        ],
        MODEL,
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 30])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9
    )  # ir_version: what this ONNX Runtime reads (onnx writes a newer one by default)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, path)
        import_onnx(path, workdir / "source", MODEL, version=1)
    return workdir / "source" / MODEL / "1"


def prepare_repository(workdir: Path, versions: int) -> Repository:
    """MODEL's version 1 (the repository's own files), OTHER, and ``versions`` more versions
    of MODEL staged (each load event publishes the next; more are staged on demand)."""
    root, staging = workdir / "models", workdir / "staging"
    source = source_version(workdir)
    shutil.copytree(source, root / MODEL / "1")
    shifted(source / FOLDED_FILE, root, OTHER, 1, OTHER_SHIFT)
    x = VersionMetadata.read(source).reference.inputs["input"].array()[:1]
    repo = Repository(root, staging, source, x.astype(np.float32))
    repo.expected[(MODEL, "1")] = onnx_outputs(root / MODEL / "1", repo.x)
    repo.expected[(OTHER, "1")] = onnx_outputs(root / OTHER / "1", repo.x)
    for version in range(2, 2 + versions):
        repo.stage(version)
    return repo


def rest_body(x: np.ndarray) -> bytes:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    return json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()


def grpc_body(model: str, x: np.ndarray) -> bytes:
    tensor = service_pb2.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=list(x.shape)
    )
    request = service_pb2.ModelInferRequest(
        model_name=model, inputs=[tensor], raw_input_contents=[x.astype("<f4").tobytes()]
    )
    return bytes(request.SerializeToString())


def read_answer(body: bytes, grpc: bool) -> tuple[str, str, np.ndarray]:
    """An answer's model, version and first output (a V2 JSON body, or a serialized
    ModelInferResponse with raw outputs)."""
    if grpc:
        answer = service_pb2.ModelInferResponse.FromString(body)
        out = np.frombuffer(answer.raw_output_contents[0], "<f4")
        return answer.model_name, answer.model_version, out.reshape(answer.outputs[0].shape)
    parsed = json.loads(body)
    first = parsed["outputs"][0]
    data = np.asarray(first["data"], np.float32).reshape(first["shape"])
    return str(parsed["model_name"]), str(parsed["model_version"]), data


# -- the process ------------------------------------------------------------------------


@dataclass
class Server:
    running: RunningServer
    grpc_port: int
    workers: int
    started: float  # time.monotonic() just before the process was started

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def pid(self) -> int:
        return self.running.process.pid

    def worker_pids(self) -> list[int]:
        try:
            return server_worker_pids(self.pid)
        except OSError:  # the supervisor is gone (or a worker went while read)
            return []

    def check_alive(self) -> None:
        if self.running.process.poll() is not None:
            tail = self.running.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the server exited with {self.running.process.returncode}:\n{tail}")


def start_server(
    root: Path, repository: Path, workdir: Path, workers: int, env: dict[str, str]
) -> Server:
    """``python -m service --workers N`` from the checkout ``root`` (gRPC on a port of its
    own), without waiting for it. Settings a checkout may not know yet go through the
    environment, which an older one ignores, rather than flags, which it would refuse."""
    grpc_port = free_port()
    command = [sys.executable, "-m", "service", "--repository", str(repository)]
    command += ["--host", "127.0.0.1", "--workers", str(workers), "--providers", "cpu"]
    command += ["--threads", "1", "--log-level", "warning", "--grpc-port", str(grpc_port)]
    runtime = tempfile.mkdtemp(prefix="runtime-", dir=workdir)
    env = {
        "FOLDSERVE_API_KEY": API_KEY,  # in argv it would show in ps
        "FOLDSERVE_ACCESS_LOG": "false",
        "FOLDSERVE_RUNTIME_DIR": runtime,
        **env,
    }
    spec = ServerSpec("rollouts", "FoldServe", command, env, root.resolve())
    started = time.monotonic()
    return Server(start(spec, workdir), grpc_port, workers, started)


def stop_server(server: Server) -> None:
    """At once: SIGINT to the supervisor (it restarts nothing more), then to each worker
    (SIGINT skips the drain a SIGTERM starts); the benchmark measures no stop."""
    if server.running.process.poll() is not None:
        return  # stopped already
    workers = server.worker_pids()
    os.kill(server.pid, signal.SIGINT)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    stop(server.running)  # waits; terminates, then kills, what is left


def wait_for(condition: Callable[[], bool], limit: float, what: str, server: Server) -> float:
    """Poll ``condition`` until it holds; the time it was first seen to. Fails after
    ``limit`` s, or at once when the server exits."""
    deadline = time.monotonic() + limit
    while not condition():
        server.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {limit:g} s")
        time.sleep(WATCH_S)
    return time.monotonic()


def get(url: str, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET over a new connection: status and body."""
    split = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(split[0], int(split[1]), timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def first_ready(server: Server, limit: float) -> float:
    """When the first 200 of ``GET /v2/health/ready`` came (a new connection each, one at a
    time, every READY_POLL_S; refused or another answer: not yet). Its arrival, not its
    send: what a client polling readiness learns, and when (a GET may wait in the listening
    socket's backlog behind the load for a while)."""
    deadline = time.monotonic() + limit
    while True:
        sent = time.monotonic()
        try:
            if get(server.url, "/v2/health/ready", timeout=limit)[0] == 200:
                return time.monotonic()
        except (OSError, http.client.HTTPException):
            pass
        server.check_alive()
        if sent > deadline:
            raise RuntimeError(f"the server was not ready within {limit:g} s")
        time.sleep(max(0.0, sent + READY_POLL_S - time.monotonic()))


def manage(url: str, model: str, action: str) -> tuple[int, str]:
    """``load`` or ``unload`` ``model`` with the API key: the status and the answer's text."""
    split = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(split[0], int(split[1]), timeout=300)
    try:
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Length": "0"}
        conn.request("POST", f"/v2/repository/models/{model}/{action}", b"", headers)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")[:300]
    finally:
        conn.close()


def ready_versions(url: str) -> set[tuple[str, str]]:
    """The (model, version) pairs the repository index says are READY."""
    status, body = get(url, "/v2/repository/index", timeout=30)
    if status != 200:
        raise RuntimeError(f"GET /v2/repository/index answered {status}")
    return {(e["name"], str(e["version"])) for e in json.loads(body) if e.get("state") == "READY"}


# -- its listening sockets --------------------------------------------------------------


def listening_inodes(port: int) -> frozenset[int]:
    """Inodes of the sockets listening on ``port`` (every worker has its own: SO_REUSEPORT).
    The kernel lists listening sockets first in /proc/net/tcp{,6}, so the read stops at
    the first other one: a new connection per request leaves thousands in TIME_WAIT."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] != LISTEN:
                    break
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    found.add(int(fields[9]))
    return frozenset(found)


@dataclass(frozen=True)
class Snapshot:
    """The server's listeners and workers, first seen at ``t``; the poll before saw
    otherwise at ``before`` (a change happened in between)."""

    t: float
    before: float
    http: frozenset[int]
    grpc: frozenset[int]
    pids: tuple[int, ...]


class SocketWatch:
    """A thread that polls the server's listening sockets and worker pids every
    ``WATCH_S``, keeping each change: when every worker listens, and when a listening
    socket closed (its connections, the backlog's too, then reset)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.history: list[Snapshot] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="socket-watch", daemon=True)

    def __enter__(self) -> SocketWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        before = time.monotonic()
        while not self._stop.wait(WATCH_S):
            now = time.monotonic()
            http_port = self.server.running.port
            current = Snapshot(
                now,
                before,
                listening_inodes(http_port),
                listening_inodes(self.server.grpc_port),
                tuple(sorted(self.server.worker_pids())),
            )
            last = self.history[-1] if self.history else None
            if last is None or (last.http, last.grpc, last.pids) != (
                current.http,
                current.grpc,
                current.pids,
            ):
                self.history.append(current)
            before = now

    @property
    def now(self) -> Snapshot | None:
        return self.history[-1] if self.history else None

    def all_listening(self, without: frozenset[int] = frozenset()) -> bool:
        """Every worker up and listening on both ports, none of ``without`` among them."""
        s = self.now
        n = self.server.workers
        return (
            s is not None
            and len(s.pids) == n
            and not without.intersection(s.pids)
            and len(s.http) == n
            and len(s.grpc) == n
        )

    def closed_sockets(self, since: float, until: float) -> list[tuple[float, float]]:
        """When listening sockets closed in ``[since, until]``: per socket, the bounds of
        its closing (the last poll that saw it, the first that did not)."""
        moments = []
        for a, b in zip(self.history, self.history[1:], strict=False):
            if since <= b.t <= until:
                gone = (a.http - b.http) | (a.grpc - b.grpc)
                moments += [(b.before, b.t)] * len(gone)
        return moments
