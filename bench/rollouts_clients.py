"""The clients of bench/rollouts.py: one sender process per transport, sending on a Poisson
schedule until told to stop, every request recorded with what became of it.

Three transports: REST with a new connection per request (``Connection: close``), REST
over pooled keep-alive connections, and gRPC (Triton's ``ModelInfer``, bytes in and out).
Unlike bench/open_loop_clients.py's clients, these keep each answer's body (to check it
against the version it names) and tell failures apart by kind: the HTTP status or gRPC
code, a refused connect, or a connection reset or closed without an answer, with the time
the connection was opened (to tell the dying worker's connections from the others).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from typing import Any, cast
from urllib.parse import urlsplit

import grpc
import grpc_load
import numpy as np
from open_loop import run_loop

TRANSPORTS = ("rest-new", "rest-keepalive", "grpc")
OK = "2xx"
REFUSED = "refused"  # connect() refused: nothing listens on the port
RESET = "reset"  # the connection was reset before the answer
CLOSED = "closed"  # the server closed the connection without an answer
TIMEOUT = "timeout"
# Kinds of failure a connection on a socket that dies can meet (gRPC: the transport's
# own words for a reset or closed connection, in its UNAVAILABLE details).
CONNECTION_LOST = frozenset({RESET, CLOSED, "gRPC UNAVAILABLE (reset)"})
REQUEST_TIMEOUT_S = 10.0  # past it a request is a failure: no client waits forever
# Requests out at once, at most (REST: a descriptor each, some kept for anything else). A
# send past it is not made, and is a failure of its own kind: the server fell behind by
# seconds. Tens of thousands of connections out would slow the sender itself, and every
# latency with it.
MAX_IN_FLIGHT = 4096
FD_RESERVE = 256
NOT_SENT = "not sent: client's in-flight bound"
GRPC_CHANNELS = 8  # connections: the kernel spreads them over the workers' sockets
# gRPC's reconnect backoff grows to minutes by default: a client that keeps trying through a
# cold start or a restart would then wait on its own backoff, not on the server.
GRPC_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 50),
]
GRPC_RESET = re.compile(r"reset|closed|broken pipe|eof|goaway|rst_stream|end of tcp", re.I)
GRPC_REFUSED = re.compile(r"refused|failed to connect", re.I)
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)")
MIN_SLEEP_S = 1e-3
PAUSED_POLL_S = 0.005

# One request's fate: scheduled send and answer times (time.monotonic(), the same clock in
# every process), when its connection was opened (NaN: none, or unknown for gRPC), the
# model it went to (index into SenderSpec.models), its outcome kind, and its answer's body
# (index into the sender's distinct bodies; -1: none).
Record = tuple[float, float, float, int, str, int]


@dataclass(frozen=True)
class SenderSpec:
    """What one sender sends: ``bodies[i]`` to ``models[i]`` (a REST JSON body or a
    serialized ModelInferRequest), at ``rate`` requests/s."""

    transport: str
    url: str  # REST root, http://HOST:PORT
    grpc_target: str  # HOST:PORT
    models: tuple[str, ...]
    bodies: tuple[bytes, ...]
    rate: float
    seed: int = 0


@dataclass
class SenderResult:
    records: list[Record] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # distinct answer bodies
    max_in_flight: int = 0
    late: int = 0  # sends over 10 ms behind schedule: the sender, not the server, fell behind


class HttpExchange(asyncio.Protocol):
    """One HTTP/1.1 connection, one request at a time, answers read whole (Content-Length,
    or to the end of a ``Connection: close`` answer without one)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.opened = math.nan
        self.buffer = bytearray()
        self.head = b""  # lowercased status line and headers, once in
        self.length = -1
        self.answer: asyncio.Future[tuple[int, bytes, bool]] | None = None  # status, body, keep

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.opened = time.monotonic()

    def exchange(self, raw: bytes) -> asyncio.Future[tuple[int, bytes, bool]]:
        assert self.transport is not None
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.answer

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.head:
            end = self.buffer.find(b"\r\n\r\n") + 4
            if end < 4:
                return
            self.head = bytes(self.buffer[:end]).lower()
            del self.buffer[:end]
            found = CONTENT_LENGTH.search(self.head)
            self.length = -1 if found is None else int(found[1])
        if 0 <= self.length <= len(self.buffer):
            self._finish(bytes(self.buffer[: self.length]))

    def _finish(self, body: bytes) -> None:
        if self.answer is not None and not self.answer.done():
            keep = b"connection: close" not in self.head
            self.answer.set_result((int(self.head[9:12]), body, keep))
        self.buffer.clear()
        self.head, self.length, self.answer = b"", -1, None

    def eof_received(self) -> bool | None:
        if self.head and self.length < 0:  # an answer delimited by the end of the connection
            self._finish(bytes(self.buffer))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answer is not None and not self.answer.done():
            reset = isinstance(exc, ConnectionResetError | BrokenPipeError)
            self.answer.set_exception(ConnectionResetError() if reset else EOFError())
        if self.transport is not None:
            self.transport.close()


class RestSender:
    """POSTs over HTTP/1.1: a new connection per request (``keep_alive=False``, and the
    request says ``Connection: close``), or pooled keep-alive connections, one per request
    in flight."""

    def __init__(self, spec: SenderSpec, keep_alive: bool) -> None:
        url = urlsplit(spec.url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.keep_alive = keep_alive
        self.raw = [
            self._raw(url.netloc, m, b) for m, b in zip(spec.models, spec.bodies, strict=True)
        ]
        self.idle: list[HttpExchange] = []

    def _raw(self, netloc: str, model: str, body: bytes) -> bytes:
        head = [f"POST /v2/models/{model}/infer HTTP/1.1", f"Host: {netloc}"]
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        head += [] if self.keep_alive else ["Connection: close"]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body

    async def send(self, model: int) -> tuple[str, bytes, float]:
        """One request: its kind, the answer's body (2xx only), when its connection opened."""
        conn, keep, status, body = self._idle(), False, 0, b""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):  # the connect included
                if conn is None:
                    loop = asyncio.get_running_loop()
                    _, conn = await loop.create_connection(HttpExchange, self.host, self.port)
                status, body, keep = await conn.exchange(self.raw[model])
        except ConnectionRefusedError:
            return REFUSED, b"", math.nan
        except (ConnectionResetError, BrokenPipeError):
            return RESET, b"", math.nan if conn is None else conn.opened
        except EOFError:
            return CLOSED, b"", math.nan if conn is None else conn.opened
        except TimeoutError:
            return TIMEOUT, b"", math.nan if conn is None else conn.opened
        except OSError as err:
            return f"connect: {type(err).__name__}", b"", math.nan
        finally:
            if conn is not None and keep and self.keep_alive:
                self.idle.append(conn)
            elif conn is not None and conn.transport is not None:
                conn.transport.close()
        if 200 <= status < 300:
            return OK, body, conn.opened
        return f"HTTP {status}", b"", conn.opened

    def _idle(self) -> HttpExchange | None:
        while self.idle:
            conn = self.idle.pop()  # the most recent: the least likely to be timed out
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()


class GrpcSender:
    """Unary ModelInfer calls, bytes to bytes, round-robin over ``GRPC_CHANNELS``
    channels (bench/open_loop_clients.py's GrpcClient, with a short reconnect backoff)."""

    def __init__(self, spec: SenderSpec) -> None:
        options = [("grpc.max_receive_message_length", grpc_load.MAX_MESSAGE_BYTES)]
        self.channels = [
            grpc.aio.insecure_channel(spec.grpc_target, options=options + GRPC_OPTIONS)
            for _ in range(GRPC_CHANNELS)
        ]
        self.calls = [c.unary_unary(grpc_load.METHOD) for c in self.channels]
        self.bodies = spec.bodies
        self.sent = 0

    async def send(self, model: int) -> tuple[str, bytes, float]:
        self.sent += 1
        call = self.calls[self.sent % GRPC_CHANNELS]
        try:
            answer = await call(self.bodies[model], timeout=REQUEST_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            return grpc_kind(err.code(), err.details() or ""), b"", math.nan
        return OK, cast(bytes, answer), math.nan

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def grpc_kind(code: grpc.StatusCode, details: str) -> str:
    """A gRPC failure's kind: its code, and for UNAVAILABLE whether the transport said it
    could not connect or lost the connection (the server's own UNAVAILABLE says neither)."""
    kind = f"gRPC {code.name}"
    if code is grpc.StatusCode.UNAVAILABLE and GRPC_REFUSED.search(details):
        return kind + " (refused)"
    if code is grpc.StatusCode.UNAVAILABLE and GRPC_RESET.search(details):
        return kind + " (reset)"
    return kind


def make_sender(spec: SenderSpec) -> RestSender | GrpcSender:
    """Made inside the running loop: both bind to it."""
    if spec.transport == "grpc":
        return GrpcSender(spec)
    return RestSender(spec, keep_alive=spec.transport == "rest-keepalive")


async def send_until(spec: SenderSpec, control: Control) -> SenderResult:
    """Fires requests on a Poisson schedule of ``spec.rate`` (all those due at each wake-up,
    never waiting for answers) until ``control.stop`` is set, none while ``control.paused``
    (the schedule starts afresh after); then waits for the answers still out. Each goes to
    ``spec.models[1]`` with probability ``control.other_share`` (read per request: the
    caller turns it on around an unload), else to ``spec.models[0]``."""
    rng = np.random.default_rng(spec.seed)
    sender, result = make_sender(spec), SenderResult()
    bound = min(MAX_IN_FLIGHT, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_RESERVE)
    result.max_in_flight = bound
    interned: dict[bytes, int] = {}
    in_flight: set[asyncio.Task[None]] = set()

    async def one(at: float, model: int) -> None:
        kind, body, opened = await sender.send(model)
        index = interned.setdefault(body, len(interned)) if kind == OK else -1
        result.records.append((at, time.monotonic(), opened, model, kind, index))

    def fire(at: float, now: float) -> None:
        result.late += now - at > 0.010
        if len(in_flight) >= bound:
            result.records.append((at, at, math.nan, 0, NOT_SENT, -1))
            return
        model = int(len(spec.models) > 1 and rng.random() < control.other_share.value)
        task = asyncio.get_running_loop().create_task(one(at, model))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    gaps: list[float] = []  # exponential gaps of mean 1/rate, drawn in blocks
    at = time.monotonic()
    while not control.stop.is_set():
        control.in_flight.value = len(in_flight)
        if control.paused.value:
            await asyncio.sleep(PAUSED_POLL_S)
            at = time.monotonic()
            continue
        now = time.monotonic()
        while at <= now:
            fire(at, now)
            if not gaps:
                gaps = rng.exponential(1.0 / spec.rate, 4096).tolist()[::-1]
            at += gaps.pop()
        # Timers tick in ms: a send is ~0.5 ms late on average, counted as latency.
        await asyncio.sleep(max(MIN_SLEEP_S, at - time.monotonic()))
    if in_flight:
        await asyncio.wait(in_flight, timeout=REQUEST_TIMEOUT_S + 1)
    await sender.close()
    result.bodies = sorted(interned, key=interned.__getitem__)
    return result


@dataclass(frozen=True)
class Control:
    """How the main process drives a sender process: ``imported`` once it can send, then
    the SenderSpec put on ``specs`` (the server's address may be known only then),
    ``started`` once it sends, ``stop`` to stop. Shared values, read and written at each
    wake-up: ``paused`` (no sends while true), ``in_flight`` (requests out, written by the
    sender), ``other_share`` (of the requests, to the second model). The SenderResult
    comes back on ``results``."""

    specs: Any
    imported: Event
    started: Event
    stop: Event
    paused: Any
    in_flight: Any
    other_share: Any
    results: Any


def sender_main(control: Control) -> None:
    """A sender process (spawned: no gRPC state inherited)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(PermissionError):
        os.nice(-5)  # ahead of the server for the CPU where allowed: sends on time
    control.imported.set()
    spec = control.specs.get()

    async def main() -> SenderResult:
        control.started.set()
        return await send_until(spec, control)

    control.results.put(run_loop(main))


async def closed_loop_rate(spec: SenderSpec, in_flight: int, seconds: float) -> float:
    """2xx answers/s of ``spec.models[0]`` with ``in_flight`` requests always out, over
    ``seconds`` after a warm-up of a third of it: the capacity a closed loop sees."""
    sender, kinds = make_sender(spec), Counter[str]()

    async def loop(until: float) -> None:
        while time.monotonic() < until:
            kinds[(await sender.send(0))[0]] += 1

    await asyncio.gather(*(loop(time.monotonic() + seconds / 3) for _ in range(in_flight)))
    kinds.clear()
    start = time.monotonic()
    await asyncio.gather(*(loop(start + seconds) for _ in range(in_flight)))
    rate = kinds[OK] / (time.monotonic() - start)
    await sender.close()
    if kinds.total() > kinds[OK]:
        raise RuntimeError(f"capacity of {spec.transport}: not every answer was a 2xx: {kinds}")
    return rate
