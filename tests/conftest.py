"""Fixtures for every test: a real ``python -m service`` process with several workers."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from polling import poll

from bench.processes import server_worker_pids
from foldserve.files import file_lock

# One thread of math per process: pytest-xdist runs a test process per CPU already, and
# the servers and torchrun processes the tests start are more; torch's (OpenMP), OpenBLAS's
# and MKL's thread pools on top of them oversubscribe the CPUs and spin-wait. Set before any
# of them loads here, and inherited by every process the tests start (docs/benchmarks.md,
# "Test suite time"). A value in the environment wins.
for _threads in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")
# Servers the tests start serve no gRPC unless a test asks (a port of its own): the default,
# 8001, may be taken on a shared machine, and two servers must never share it.
os.environ["FOLDSERVE_GRPC_PORT"] = "0"
# Nor do they drain for the default 5 s after SIGTERM (each stop would wait it out): the
# drain tests ask for their own --drain-seconds.
os.environ["FOLDSERVE_DRAIN_SECONDS"] = "0"


# The files that run longest here, longest first (docs/benchmarks.md, "Test suite time").
# pytest-xdist hands each worker whole files (`--dist loadfile`) in collection order
# (`--no-loadscope-reorder`, in pyproject.toml; by default it sends the files with the most
# tests first, which left these one- and few-test files for last, and one worker running the
# longest of them alone at the end).
LONGEST_FIRST = (
    "test_service_workers.py",
    "test_reliability.py",
    "test_distributed.py",
    "test_experiments.py",
    "test_service_overload.py",
    "test_export.py",
    "test_service_connections.py",
    "test_retrain.py",
    "test_service_errors.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files in LONGEST_FIRST first, in that order; the rest keep theirs."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@dataclass
class ServerProcess:
    """A running ``python -m service``: its address, runtime directory and process."""

    url: str
    runtime: Path
    process: subprocess.Popen[str]
    client: httpx.Client  # a new connection per request: any worker may take it
    grpc_port: int = 0  # 0: gRPC off (``server_process(..., grpc=True)`` turns it on)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def worker_pids(self) -> list[int]:
        return server_worker_pids(self.process.pid)


@pytest.fixture(autouse=True)
def root_logging_restored() -> Iterator[None]:
    """The root logger as it was before the test: a CLI run through typer's CliRunner sets
    a handler on the stream the runner then closes, and every later log line in this
    process would print a "Logging error" traceback instead."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread: tiny models train faster, bit for bit repeatably, and are
    robust to a busy machine (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``;
    torch is imported here, so the service tests never need it)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def routes(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every path the service's app serves (its OpenAPI schema), for the deploy checks."""
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(_env_file=None, repository=tmp_path_factory.mktemp("repo")))  # type: ignore[call-arg]
    return set(app.openapi()["paths"])


@pytest.fixture(scope="session")
def build_once(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str, Callable[[Path], None]], Path]:
    """``build_once(name, build)``: the directory ``build(directory)`` filled, built once per
    test run. pytest-xdist runs a session per worker process: the first worker to ask builds
    it, the others wait on a file lock and reuse it (so a trained store is trained once)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base

    def once(name: str, build: Callable[[Path], None]) -> Path:
        target, done = shared / name, shared / f"{name}.done"
        with file_lock(shared / f"{name}.lock"):
            if not done.exists():
                shutil.rmtree(target, ignore_errors=True)  # a build that failed half-way
                target.mkdir()
                build(target)
                done.touch()
        return target

    return once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    return free_port()


def workers_started(runtime: Path, workers: int) -> bool:
    """Every worker has finished its first scan: each acknowledges a generation >= 0 in the
    runtime directory (docs/service.md, "Workers")."""
    generations = []
    for path in (runtime / "workers").glob("*.json"):
        try:
            generations.append(json.loads(path.read_text())["generation"])
        except (OSError, ValueError):
            return False
    return len(generations) == workers and min(generations) >= 0


@contextmanager
def server_process(
    repository: Path, workers: int, *args: str, grpc: bool = False, **env: str
) -> Iterator[ServerProcess]:
    """``python -m service --workers N`` on 127.0.0.1 (CPU, one thread each, quiet), ready
    when every worker is; ``args`` are more flags, ``env`` more environment variables;
    ``grpc``: gRPC on a free port too (off otherwise)."""
    port = free_port()
    grpc_port = free_port() if grpc else 0
    runtime = repository.parent / f"runtime-{port}"
    command = [sys.executable, "-m", "service", "--repository", str(repository)]
    command += ["--port", str(port), "--workers", str(workers), "--providers", "cpu"]
    command += ["--threads", "1", "--log-level", "warning", "--runtime-dir", str(runtime)]
    command += ["--grpc-port", str(grpc_port), *args]
    log = repository.parent / f"server-{port}.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            command,
            env={**os.environ, "FOLDSERVE_ACCESS_LOG": "false", **env},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(
        base_url=url, timeout=30.0, limits=httpx.Limits(max_keepalive_connections=0)
    )
    try:

        def started() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            return workers_started(runtime, workers)

        def listening() -> bool:
            # One worker runs without a supervisor: uvicorn binds only after the lifespan
            # (the first scan) has finished, so the socket may still be missing here.
            try:
                return client.get("/v2/health/ready").json() == {"ready": True}
            except httpx.ConnectError:
                return False

        poll(started, limit=60)
        poll(listening, limit=30)
        yield ServerProcess(url, runtime, process, client, grpc_port)
    finally:
        client.close()
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def serve_process() -> Callable[..., object]:
    """``with serve_process(repository, workers, *flags, **env) as server``."""
    return server_process
