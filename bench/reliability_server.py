"""``python -m service`` as a subprocess on 127.0.0.1, and client threads that keep it busy.

For ``bench/reliability.py``: the server's worker processes (for their RSS), its
management calls with the API key, and infer requests sent without pause, each on a
new connection so that they spread over the workers, every answer recorded.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from processes import listening_sockets, server_worker_pids, workers_scanned
from throughput_servers import ServerSpec, start, stop

REPO_ROOT = Path(__file__).resolve().parent.parent  # `python -m service` runs this checkout


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    api_key: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        """The server's worker processes."""
        return server_worker_pids(self.proc.pid)

    def manage(self, model: str, action: str) -> httpx.Response:
        """``load`` or ``unload`` ``model`` in every worker (the call waits for all)."""
        return httpx.post(
            f"{self.url}/v2/repository/models/{model}/{action}",
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=300,
        )


@contextmanager
def serve(repository: Path, runtime: Path, workers: int, api_key: str) -> Iterator[Server]:
    """``python -m service`` on 127.0.0.1 (started as every benchmark starts its servers:
    ``throughput_servers.start``), from when every worker has loaded and listens; its
    log goes to ``server.log`` beside ``runtime``."""
    command = [sys.executable, "-m", "service", "--repository", str(repository)]
    command += ["--host", "127.0.0.1", "--workers", str(workers)]
    command += ["--providers", "cpu", "--threads", "1", "--runtime-dir", str(runtime)]
    command += ["--log-level", "warning", "--no-access-log"]
    env = {"FOLDSERVE_API_KEY": api_key}  # a key in argv would show in ps
    running = start(ServerSpec("server", "FoldServe", command, env, REPO_ROOT), runtime.parent)
    server = Server(running.process, running.port, api_key)
    try:
        deadline = time.monotonic() + 120
        # Scanned, then listening: a worker listens only once its first scan is over.
        while len(workers_scanned(runtime)) < workers or listening_sockets(running.port) < workers:
            if running.process.poll() is not None:
                tail = running.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the server exited with {running.process.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError("the server's workers did not start within 120 s")
            time.sleep(0.1)
        yield server
    finally:
        stop(running)


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic() when the connection was opened
    status: int  # 0: no answer
    version: str | None = None
    outputs: np.ndarray | None = None


class LoadClients:
    """Threads that send one V2 infer request after another, each on a new connection."""

    def __init__(self, port: int, model: str, x: np.ndarray, clients: int) -> None:
        self.port = port
        self.path = f"/v2/models/{model}/infer"
        tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
        self.body = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
        self.outcomes: list[Outcome] = []  # appended by the threads (atomic in CPython)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]

    def __enter__(self) -> LoadClients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.outcomes.append(self._one())

    def _one(self) -> Outcome:
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(
                "POST",
                self.path,
                self.body,
                {"Content-Type": "application/json", "Connection": "close"},
            )
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException):
            return Outcome(started, 0)
        finally:
            conn.close()
        if response.status != 200:
            return Outcome(started, response.status)
        body = json.loads(raw)
        out = body["outputs"][0]
        data = np.asarray(out["data"], np.float32).reshape(out["shape"])
        return Outcome(started, 200, body.get("model_version"), data)

    def next_after(self, t: float, n: int, timeout: float = 120.0) -> list[Outcome]:
        """The first ``n`` answered requests that were started after ``t``."""
        deadline = time.monotonic() + timeout
        while True:
            after = [o for o in self.outcomes if o.started > t]
            if len(after) >= n:
                return sorted(after, key=lambda o: o.started)[:n]
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(after)} requests answered in {timeout:g} s")
            time.sleep(0.01)
