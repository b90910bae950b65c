"""The supervising process: uvicorn's, with a rolling restart that waits for loads, and a
health port that answers liveness while no worker listens.

A worker listens only once its models are loaded (``service.process.listeners``), so
while every worker is loading (at start, or a lone worker restarting after a crash)
nothing answers on the serving port, liveness included. ``--health-port`` serves
``GET /v2/health/live`` from a thread of its own: in the supervisor (several workers),
alive while its loop turns, which pings every worker and replaces the hung and the
dead; in a lone worker, alive while its event loop runs a callback. A load holds
neither, since it runs in a worker thread of its own.

SIGHUP to the supervisor replaces the workers one at a time, each old one retired
only once its replacement has loaded and listens (uvicorn's ``restart_all``), which
is a rolling restart no client notices. uvicorn waits for the replacement as long as
it waits for a ping (``timeout_worker_healthcheck``, 5 s); here it waits up to
``worker_start_timeout``, since a load can take minutes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import socket
from typing import Any

from uvicorn.config import Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process

log = logging.getLogger(__name__)

LIVE_PATH = "/v2/health/live"
# A lone worker's event loop must run a callback within this to be alive.
LOOP_CHECK_S = 5.0


class Supervisor(Multiprocess):
    """uvicorn's supervisor, with the time of its loop's last turn and a patient restart."""

    def __init__(self, config: Config, sockets: list[socket], start_timeout: float) -> None:
        super().__init__(config, sockets)
        self.start_timeout = start_timeout
        self.turned = time.monotonic()
        self.restarting = False  # a rolling restart holds the loop while a worker loads

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        self.turned = time.monotonic()

    def restart_all(self) -> None:
        """uvicorn's rolling restart, waiting up to ``start_timeout`` for each replacement."""
        log.info("SIGHUP: replacing the %d workers one at a time", len(self.processes))
        self.restarting = True
        try:
            self._replace_each()
        finally:
            self.restarting = False
            self.turned = time.monotonic()

    def _replace_each(self) -> None:
        for index, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = Process(self.config, self.sockets)
            new.start()
            if not new.wait_until_ready(self.start_timeout, self.should_exit):
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    log.error(
                        "worker %s did not load within %.0f s: worker %s keeps serving, and "
                        "the restart stops there",
                        new.pid,
                        self.start_timeout,
                        old.pid,
                    )
                return
            old.terminate()
            old.join()
            self.processes[index] = new

    def liveness(self) -> str | None:
        """None while the loop turns; else why not. One turn pings each worker for up to
        ``timeout_worker_healthcheck`` (more while a restart waits for a load)."""
        limit = self.config.timeout_worker_healthcheck * (len(self.processes) + 1) + 5.0
        if self.restarting:
            limit += self.start_timeout
        quiet = time.monotonic() - self.turned
        return None if quiet <= limit else f"supervisor loop quiet for {quiet:.0f} s"


def event_loop_liveness(loop: asyncio.AbstractEventLoop) -> Callable[[], str | None]:
    """A lone worker's check: its event loop runs a callback within ``LOOP_CHECK_S``."""

    def check() -> str | None:
        ran = threading.Event()
        try:
            loop.call_soon_threadsafe(ran.set)
        except RuntimeError:  # the loop is closed
            return "event loop closed"
        if ran.wait(LOOP_CHECK_S):
            return None
        return f"event loop did not turn within {LOOP_CHECK_S:.0f} s"

    return check


class HealthPort:
    """``GET /v2/health/live`` on ``host:port``, answered by a thread: 200 ``{"live": true}``,
    or 503 with the reason ``check`` gives."""

    def __init__(self, host: str, port: int, check: Callable[[], str | None]) -> None:
        handler = _handler(check)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health-port", daemon=True
        )

    def __enter__(self) -> HealthPort:
        self._thread.start()
        log.info("liveness on http://%s:%d%s", *self._server.server_address[:2], LIVE_PATH)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(check: Callable[[], str | None]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?", 1)[0] != LIVE_PATH:
                self._send(404, {"error": f"only {LIVE_PATH} is served on this port"})
                return
            reason = check()
            if reason is None:
                self._send(200, {"live": True})
            else:
                self._send(503, {"live": False, "error": reason})

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # probes every few seconds: not worth a log line each

    return Handler
