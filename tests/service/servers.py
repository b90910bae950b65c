"""Live servers, settings and Prometheus scraping for the service tests, imported as a
module (``from servers import ...``), not from conftest: the two conftest.py files share
that module name, so ``from conftest import`` finds whichever pytest loaded last.
"""

from __future__ import annotations

import socket
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
from polling import poll
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.models.served_version import ServingOptions
from service.observability.metrics import ServiceMetrics
from service.settings import Settings

API_KEY = "test-key"
MAX_REQUEST_BYTES = 1 << 20  # small, so 413 is cheap to provoke
HOLD_US = 1_500_000  # a partial batch waits this long for company: requests stay queued


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
        "grpc_port": 0,  # gRPC is tested against real processes (test_service_grpc.py)
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
