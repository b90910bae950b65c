"""Stopping without losing a request: a drain period between SIGTERM and uvicorn's shutdown.

uvicorn stops listening and closes idle keep-alive connections as soon as it
gets SIGTERM; a client that sent a request on such a connection at that moment
gets a reset and no answer. During the drain period the worker keeps serving
instead, but readiness answers 503 (a load balancer stops sending) and every
response carries ``Connection: close`` (clients stop reusing connections, each
closed cleanly after its answer). Then uvicorn's own graceful shutdown runs:
the listener closes, queued and in-flight requests finish, the process exits 0.
A repeated SIGTERM changes nothing (with several workers, a worker may get one
from the supervisor and one from whoever stopped the whole process group);
SIGINT still stops at once. Served without a SIGTERM handler of the server's own,
the drain ends with SIGTERM's default action; where SIGTERM was ignored, it stays
ignored, with no drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

LAST_CALL_S = 0.3  # between no longer accepting and closing connections with no request


class Drain:
    """Whether this worker is draining; installs its SIGTERM handler in the main thread."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.draining = False  # read per request; set once
        self._stop: Any = None  # uvicorn's own handler, called when the drain is over
        self._timer: threading.Timer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        """Put the drain in front of the SIGTERM handler the server installed (main thread
        only: an app served from another thread, as in the tests, keeps the server's)."""
        if threading.current_thread() is not threading.main_thread():
            return
        stop = signal.getsignal(signal.SIGTERM)
        if stop == signal.SIG_IGN:  # SIGTERM is to be ignored: no stop, so no drain either
            return
        self._loop = asyncio.get_running_loop()
        self._stop = stop
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, sig: int, frame: FrameType | None) -> None:
        if self.draining:  # the supervisor's copy of the same stop (or a repeat): ignore
            return
        self.draining = True
        log.info("SIGTERM: draining for %.1f s (readiness 503, Connection: close)", self.seconds)
        self._timer = threading.Timer(self.seconds, self._finish, (sig, frame))
        self._timer.daemon = True
        self._timer.start()

    def _finish(self, sig: int, frame: FrameType | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        stop = self._stop
        server = getattr(stop, "__self__", None)
        if server is not None and hasattr(server, "should_exit"):
            # uvicorn's Server: stop accepting first, give requests already on their way
            # over accepted connections LAST_CALL_S to arrive (uvicorn's shutdown closes a
            # connection with no request yet at once), then shut down gracefully without
            # its handler, which would re-raise the signal (dying of it, not exiting 0).
            if self._loop is not None:
                self._loop.call_soon_threadsafe(_stop_accepting, server)
            time.sleep(LAST_CALL_S)
            server.should_exit = True
        elif callable(stop):
            stop(sig, frame)
        elif self._loop is not None:
            # No handler before ours (SIGTERM's default action): end as that would have at
            # once. From the main thread, through the loop: only it may set a handler, and
            # an exception raised in this timer thread would end the thread alone, leaving
            # the process up and draining for good.
            self._loop.call_soon_threadsafe(_die_of, sig)


def _die_of(sig: int) -> None:
    """End the process by signal ``sig``'s default action (main thread only)."""
    signal.signal(sig, signal.SIG_DFL)
    signal.raise_signal(sig)


def _stop_accepting(server: Any) -> None:
    """Stop listening, losing no connection already in the listen backlog.

    Each worker has a socket of its own (:mod:`service.process.listeners`). Shut down, a
    listening socket resets the connections in its backlog (completed handshakes the
    event loop has not accepted yet: under load, a few each time), and with a socket per
    worker that happens once per worker. So the backlog is accepted here first, each
    connection served like any other (uvicorn's graceful shutdown gives them the same
    last call), and only then is the socket shut down: it leaves the kernel's spread,
    and new connections go to the workers still listening, or fail at connect once none
    is, which a client can retry safely. Where the workers share one socket (no
    SO_REUSEPORT; the supervisor holds it too), the shutdown applies to the socket
    itself, for every worker at once, rather than to this worker's descriptor.
    """
    loop = asyncio.get_running_loop()
    for listener in getattr(server, "servers", []):
        for sock in listener.sockets:
            # The event loop's own socket objects refuse accept() and shutdown(); a
            # duplicate descriptor of the same socket does both.
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(sock.fileno())) as dup:
                dup.setblocking(False)
                for accepted in _backlog(dup):
                    loop.create_task(_serve_accepted(loop, server, accepted))
                dup.shutdown(socket.SHUT_RDWR)
        listener.close()


def _backlog(sock: socket.socket) -> list[socket.socket]:
    """Every connection waiting in a (non-blocking) listening socket's backlog."""
    accepted: list[socket.socket] = []
    while True:
        try:
            connection, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return accepted
        accepted.append(connection)


async def _serve_accepted(
    loop: asyncio.AbstractEventLoop, server: Any, sock: socket.socket
) -> None:
    """Serve a connection accepted by hand with the server's own protocol, as its listener
    would have (uvicorn's ``create_protocol``)."""
    config = server.config

    def protocol() -> asyncio.Protocol:
        return config.http_protocol_class(  # type: ignore[no-any-return]
            config=config, server_state=server.server_state, app_state=server.lifespan.state
        )

    try:
        await loop.connect_accepted_socket(protocol, sock)
    except OSError:  # the client went away meanwhile
        sock.close()
