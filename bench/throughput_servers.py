"""The servers bench/throughput.py compares: how each is started, probed and stopped.

Every server runs as its own process on 127.0.0.1, serves the same model
files from the same repository at ``/v2/models/{name}/infer`` and runs ONNX
Runtime on the CPU. FoldServe runs with its defaults (its access log on, into
the server's log file); the peers with theirs. KServe and MLServer each run
from a virtual environment of their own (they pin their own FastAPI, uvicorn
and pydantic), which :func:`peer_python` creates on first use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import venv
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from processes import free_port, listening_sockets, process_tree_cpu_seconds, server_worker_pids

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / "peers"
KSERVE_VENV = BENCH / ".venv-kserve"
KSERVE_PACKAGES = ["kserve", "onnxruntime-gpu", "numpy"]
MLSERVER_VENV = BENCH / ".venv-mlserver"
# MLServer 1.7 does not start with uvloop 0.22.
MLSERVER_PACKAGES = ["mlserver", "onnxruntime", "numpy", "uvloop<0.22"]


@dataclass(frozen=True)
class ServerSpec:
    """One row kind of the table: a name, and the command that serves the repository."""

    key: str
    label: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    root: Path = ROOT  # the checkout it runs from (cwd and PYTHONPATH)


@dataclass
class RunningServer:
    spec: ServerSpec
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """User+system CPU of the server process and its children (workers) so far."""
        return process_tree_cpu_seconds(self.process.pid)


def peer_python(directory: Path, packages: list[str], log: IO[str]) -> Path:
    """The interpreter of the virtual environment ``directory``, created with
    ``pip install <packages>`` if absent."""
    python = directory / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {directory} (pip install {' '.join(packages)}) ...", file=log)
    venv.create(directory, with_pip=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *packages],
        check=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return python


def server_specs(
    repository: Path,
    workers: int,
    peer_workers: int,
    with_kserve: bool,
    log: IO[str],
    baseline: Path | None = None,
    with_mlserver: bool = True,
) -> list[ServerSpec]:
    """The servers of the table, in row order: FoldServe and the floor with ``workers``
    processes, the naive server and KServe with ``peer_workers``, MLServer with its default
    (one inference worker); with ``baseline`` (another checkout, e.g. a ``git worktree`` of
    the previous commit) also FoldServe as it was there."""
    repo = str(repository)
    # FoldServe's defaults, access log included; gRPC off (bench/grpc_throughput.py measures it)
    fold_env: dict[str, str] = {"FOLDSERVE_GRPC_PORT": "0"}
    fold = [sys.executable, "-m", "service", "--repository", repo, "--providers", "cpu"]
    fold += ["--workers", str(workers)]
    processes = ["--workers", str(workers)]
    specs = [
        ServerSpec(
            "floor",
            "HTTP floor (FastAPI constant)",
            [sys.executable, str(PEERS / "floor.py"), *processes],
        ),
        ServerSpec(
            "naive",
            "naive FastAPI+pydantic+ORT",
            [sys.executable, str(PEERS / "naive.py"), "--repository", repo]
            + ["--workers", str(peer_workers)],
        ),
    ]
    if with_mlserver:
        mlserver = [str(peer_python(MLSERVER_VENV, MLSERVER_PACKAGES, log))]
        mlserver += [str(PEERS / "mlserver_onnx.py"), "--repository", repo]
        specs.append(ServerSpec("mlserver", "MLServer", mlserver))
    if with_kserve:
        kserve = [str(peer_python(KSERVE_VENV, KSERVE_PACKAGES, log))]
        kserve += [str(PEERS / "kserve_onnx.py"), "--repository", repo]
        kserve += ["--enable_grpc", "false", "--configure_logging", "false"]
        kserve += ["--enable_latency_logging", "false", "--workers", str(peer_workers)]
        specs.append(ServerSpec("kserve", "KServe ModelServer", kserve))
    specs += [
        ServerSpec("fold-off", "FoldServe JSON, batching off", [*fold, "--no-batching"], fold_env),
        ServerSpec("fold", "FoldServe JSON, batching on", fold, fold_env),
    ]
    if baseline is not None:
        label = "FoldServe JSON, batching on, baseline"
        specs.append(ServerSpec("fold-base", label, fold, fold_env, baseline.resolve()))
    return specs


def port_flags(spec: ServerSpec, port: int) -> list[str]:
    if spec.key == "kserve":
        return ["--http_port", str(port)]
    return ["--port", str(port)]


def start(spec: ServerSpec, log_dir: Path) -> RunningServer:
    port = free_port()
    log_path = log_dir / f"{spec.key}.log"
    env = {**os.environ, **spec.env, "PYTHONPATH": str(spec.root)}
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [*spec.command, *port_flags(spec, port)],
            cwd=spec.root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return RunningServer(spec, port, process, log_path)


def post(url: str, body: bytes | None, headers: dict[str, str], timeout: float = 30.0) -> bytes:
    """POST ``body`` to ``url`` and return the answer's body; ``body=None``: a GET."""
    method = "GET" if body is None else "POST"
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: bytes = response.read()
        return data


# New connections spread over the workers by a hash: 16 answers in a row all from one ready
# worker while another still loads happens once in 2**15 starts with two workers.
READY_IN_A_ROW = 16


def wait_ready(
    server: RunningServer,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    limit: float = 120.0,
    pause: float = 0.3,
) -> None:
    """Until ``path`` answers 200 to ``READY_IN_A_ROW`` real requests in a row, each on a
    new connection, and, for FoldServe, until each of its workers listens (a worker listens
    only once its models are loaded, so the first to load answers alone meanwhile; before
    2026-12-08 one still loading listened and answered 503); ``body=None``: GET requests;
    ``pause``: the wait after a refusal."""
    deadline = time.monotonic() + limit
    answered = 0
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.spec.label} exited with {server.process.returncode}; "
                f"log: {server.log_path}\n{server.log_path.read_text()[-2000:]}"
            )
        try:
            post(server.url + path, body, headers, timeout=10.0)
            answered += 1
            if answered == READY_IN_A_ROW:
                every_worker_listening(server, deadline)
                return
            continue
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            answered = 0
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{server.spec.label} not ready; log: {server.log_path}"
                ) from None
            time.sleep(pause)


def every_worker_listening(server: RunningServer, deadline: float) -> None:
    """FoldServe's workers (the supervisor's children; none with one worker) each listen."""
    if not server.spec.key.startswith("fold"):
        return
    workers = len(server_worker_pids(server.process.pid))
    while listening_sockets(server.port) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.spec.label}: not every worker listens; {server.log_path}")
        time.sleep(0.02)  # a poll of the server's state


def json_outputs(answer: bytes) -> dict[str, Any]:
    """The first output of a V2 JSON answer, by name."""
    body = json.loads(answer)
    return {o["name"]: o for o in body["outputs"]}


def stop(server: RunningServer) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def pip_version(python: Path, package: str) -> str:
    """The version of ``package`` installed for the interpreter ``python``."""
    done = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"
