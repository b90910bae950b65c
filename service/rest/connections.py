"""What one client can hold: time limits on a request's headers and body, and a bound on
the connections each worker keeps open.

uvicorn closes a keep-alive connection that stays idle, but puts no limit on a
request that is being read: a client that sends one header line every few
seconds, or a body one byte at a time, holds a descriptor, a parser and a
buffer for as long as it likes, and a few thousand of them exhaust a worker's
descriptors. :class:`GuardedHttpProtocol` (uvicorn's httptools protocol, plus
the limits) closes such a connection with 408 once its headers take longer
than ``header_timeout`` (counted from the connection, or from the request's
first byte), or its body longer than ``body_timeout`` after the headers (nginx's
``client_header_timeout`` and ``client_body_timeout``, Envoy's
``request_headers_timeout``). Time the server itself holds a body back (uvicorn
stops reading past 64 KiB until the app asks for more) is not the client's: the
body clock waits then.

Past ``max_connections`` open connections in a worker, a new connection first
takes the place of the keep-alive connection that has been idle the longest;
when none is idle it is refused at once with 503 (nothing parsed, nothing
queued) rather than accepted and starved. Each close is counted by reason in
``foldserve_connections_closed_total``.

The app hands its :class:`ConnectionGuard` to the protocol through the ASGI
lifespan state (``GUARD_STATE_KEY``), which uvicorn gives every connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

GUARD_STATE_KEY = "foldserve_connection_guard"
RESERVED_DESCRIPTORS = 64  # model files, logs, the runtime directory, the loop's own
REASONS = ("header_timeout", "body_timeout", "idle_for_new", "refused_at_cap")


def default_max_connections() -> int:
    """Connections a worker can hold: its soft descriptor limit, less a tenth and
    ``RESERVED_DESCRIPTORS`` for everything else it opens."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, int(soft * 0.9) - RESERVED_DESCRIPTORS)


def _answer(status: bytes, message: str, extra: bytes = b"") -> bytes:
    body = json.dumps({"error": message}).encode()
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
        + extra
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )


@dataclass
class ConnectionGuard:
    """One worker's limits, its idle keep-alive connections (oldest first) and counters."""

    header_timeout: float
    body_timeout: float
    max_connections: int
    closed: dict[str, Counter]  # by reason
    open_connections: Gauge
    idle: OrderedDict[GuardedHttpProtocol, None] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.header_late = _answer(
            b"408 Request Timeout",
            f"request headers not received within {self.header_timeout:g} s",
        )
        self.body_late = _answer(
            b"408 Request Timeout", f"request body not received within {self.body_timeout:g} s"
        )
        self.refusal = _answer(
            b"503 Service Unavailable",
            f"this worker holds its limit of {self.max_connections} connections; retry",
            b"retry-after: 1\r\n",
        )

    def close(self, reason: str) -> None:
        self.closed[reason].inc()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the :class:`ConnectionGuard`'s limits (without a
    guard in the lifespan state, e.g. an app built elsewhere, it is uvicorn's own)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard: ConnectionGuard | None = self.app_state.get(GUARD_STATE_KEY)
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False

    # -- connections -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        guard = self.guard
        if guard is None:
            super().connection_made(transport)
            return
        if len(self.connections) >= guard.max_connections and not self._make_room(guard):
            self.transport = transport
            self._refused = True
            transport.write(guard.refusal)
            transport.close()
            guard.close("refused_at_cap")
            return
        super().connection_made(transport)
        guard.open_connections.inc()
        self._arm(guard.header_timeout, self._headers_late)

    def _make_room(self, guard: ConnectionGuard) -> bool:
        """Close the keep-alive connection idle the longest; False when none is idle."""
        while guard.idle:
            oldest, _ = guard.idle.popitem(last=False)
            if not oldest.transport.is_closing():
                oldest.transport.close()
                oldest.connections.discard(oldest)  # its slot is free now, not at its loss
                guard.close("idle_for_new")
                return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._disarm()
        if self.guard is not None:
            self.guard.idle.pop(self, None)
            self.guard.open_connections.dec()
        super().connection_lost(exc)

    # -- the clocks --------------------------------------------------------------------

    def _arm(self, seconds: float, late: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        if self.guard is not None:
            self.guard.idle.pop(self, None)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.guard is not None:
            self._arm(self.guard.header_timeout, self._headers_late)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.guard is not None:
            self._arm(self.guard.body_timeout, self._body_late)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.guard is not None and self.timeout_keep_alive_task is not None:
            self.guard.idle[self] = None  # keep-alive: idle until its next request

    def _headers_late(self) -> None:
        self._timer = None
        if self.guard is not None and not self.transport.is_closing():
            self.transport.write(self.guard.header_late)
            self.transport.close()
            self.guard.close("header_timeout")

    def _body_late(self) -> None:
        self._timer = None
        guard = self.guard
        if guard is None or self.transport.is_closing():
            return
        if self.flow.read_paused:  # the server holds the body back, not the client
            self._arm(guard.body_timeout, self._body_late)
            return
        if self.cycle is not None and not self.cycle.response_started:
            self.transport.write(guard.body_late)
        self.transport.close()
        guard.close("body_timeout")


def describe(guard: ConnectionGuard) -> str:
    """The start-up log line."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (
        f"connections per worker: at most {guard.max_connections} (descriptor limit {soft}); "
        f"request headers within {guard.header_timeout:g} s, bodies within "
        f"{guard.body_timeout:g} s (408 past them)"
    )
