"""The one way the tests start a real server, and what they read from it.

Two forms of the same server: :func:`live_server`, the app under uvicorn in a thread of
the test process (one worker; the test can reach the app's own objects), and
:func:`server_process`, ``python -m service --workers N`` in processes of its own (what
a user runs; worker processes, signals, the supervisor). Both listen on 127.0.0.1 and
are ready, by polling, before the test sees them. Also: the settings the tests serve
with, V2 bodies, and ``/metrics`` scraping. The conftest fixtures wrap these.

``bench/`` starts its servers with ``bench/throughput_servers.py`` instead: the
benchmarks run as scripts, outside pytest, and start other servers too (the peers);
both read a running server through ``bench/processes.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from bench.processes import free_port, listening_sockets, server_worker_pids, workers_scanned
from service.app import create_app
from service.models.served_version import ServingOptions
from service.observability.metrics import ServiceMetrics
from service.settings import Settings
from tests.polling import poll

API_KEY = "test-key"
MAX_REQUEST_BYTES = 1 << 20  # small, so 413 is cheap to provoke
HOLD_US = 1_500_000  # a partial batch waits this long for company: requests stay queued
# A hold no test outlasts: a partial batch leaves only by a deadline, a timeout or a full batch.
ENDLESS_HOLD_US = 600_000_000


@dataclass
class LiveServer:
    url: str
    port: int
    app: FastAPI
    repository: Path

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10.0, **kwargs)


@contextmanager
def live_server(settings: Settings, wait_ready: bool = True) -> Iterator[LiveServer]:
    """A real uvicorn server on 127.0.0.1 (an ephemeral port) in a background thread."""
    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    poll(lambda: server.started or not thread.is_alive(), limit=20)
    if not server.started:
        raise RuntimeError("uvicorn did not start")
    port = server.servers[0].sockets[0].getsockname()[1]
    live = LiveServer(f"http://127.0.0.1:{port}", port, app, settings.repository)
    try:
        if wait_ready:
            with live.client() as client:
                poll(lambda: client.get("/v2/health/ready").status_code == 200, limit=20)
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def serving_options(**settings: Any) -> ServingOptions:
    """What a repository built in-process (no server) serves with: CPU, one thread."""
    values: dict[str, Any] = {"providers": "cpu", "threads": 1, "io_binding": "off", **settings}
    return ServingOptions.from_settings(
        Settings(_env_file=None, **values),  # type: ignore[call-arg]
        ServiceMetrics(),
    )


def server_settings(repository: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "repository": repository,
        "providers": "cpu",
        "threads": 1,
        "max_request_bytes": MAX_REQUEST_BYTES,
        "api_key": API_KEY,
        "access_log": True,
        "grpc_port": 0,  # gRPC is tested against real processes (tests/service/grpc/)
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


# -- V2 bodies and /metrics ----------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def v2_body(
    x: np.ndarray, name: str = "input", nested: bool = False, **extra: Any
) -> dict[str, Any]:
    """A V2 JSON request of one FP32 tensor ``name`` holding ``x`` (flat data unless
    ``nested``); ``extra`` are more top-level fields (``id``, ``parameters``...)."""
    data = x.tolist() if nested else x.ravel().tolist()
    tensor = {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": data}
    return {"inputs": [tensor], **extra}


def parse_metrics(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(client: httpx.Client) -> Samples:
    """Every sample of ``/metrics``, by (name, sorted labels)."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse_metrics(r.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when absent (a labelled counter appears on first use)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection without an answer"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


# -- python -m service, in processes of its own -----------------------------------


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


@contextmanager
def server_process(
    repository: Path,
    workers: int,
    *args: str,
    grpc: bool = False,
    ready: bool = True,
    **env: str,
) -> Iterator[ServerProcess]:
    """``python -m service --workers N`` on 127.0.0.1 (CPU, one thread each, quiet), ready
    when every worker is; ``args`` are more flags, ``env`` more environment variables;
    ``grpc``: gRPC on a free port too (off otherwise); ``ready=False``: at once, its
    workers starting (the caller waits for what it needs)."""
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
            return len(workers_scanned(runtime)) == workers

        def listening() -> bool:
            # A worker listens only once its first scan has finished (the lifespan): until
            # one does, connections are refused.
            try:
                return client.get("/v2/health/ready").json() == {"ready": True}
            except httpx.ConnectError:
                return False

        if ready:
            poll(started, limit=60)
            poll(listening, limit=30)
            poll(lambda: listening_sockets(port) == workers)  # each worker has its socket
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
