"""The clients bench/open_loop.py's senders send with: the one prepared request, over a bare
HTTP/1.1 client or gRPC channels, and what became of each send."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from enum import Enum
from typing import cast
from urllib.parse import urlsplit

import grpc
import grpc_load

GRPC_CHANNELS = 8  # connections per gRPC sender
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)")


class Outcome(Enum):
    OK = "2xx"
    # 503 / UNAVAILABLE: turned away, or its deadline passed uncomputed (FoldServe answers
    # that so, as Triton does: the server's dropped counter by reason tells them apart)
    REFUSED = "refused"
    EXPIRED = "expired"  # 504 / DEADLINE_EXCEEDED (the client's deadline), or unanswered
    ERROR = "error"


@dataclass(frozen=True)
class Request:
    """The one prepared request (batch 1) every sender sends, and where to."""

    protocol: str  # "rest" or "grpc"
    address: str  # REST: the infer URL; gRPC: host:port
    body: bytes  # REST body, or a serialized ModelInferRequest
    headers: dict[str, str]
    target_s: float | None  # gRPC: each call's deadline (REST's is in its body)


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time: the prepared bytes out,
    an answer with a Content-Length in (FoldServe's all have one; chunked is not read)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head = b""  # the answer's status line and headers, lowercased
        self.length = -1  # its body's bytes, once the head is in
        self.answer: asyncio.Future[tuple[int, bool]] | None = None  # status, keep-alive

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def exchange(self, raw: bytes) -> asyncio.Future[tuple[int, bool]]:
        assert self.transport is not None
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.answer

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.length < 0:
            end = self.buffer.find(b"\r\n\r\n") + 4
            if end < 4:
                return
            self.head = bytes(self.buffer[:end]).lower()
            del self.buffer[:end]
            found = CONTENT_LENGTH.search(self.head)
            if found is None:
                self.close(ConnectionError("an answer without Content-Length"))
                return
            self.length = int(found[1])
        if len(self.buffer) >= self.length:
            if self.answer is not None and not self.answer.done():  # not cancelled meanwhile
                keep = b"connection: close" not in self.head
                self.answer.set_result((int(self.head[9:12]), keep))
            self.buffer.clear()
            self.length, self.answer = -1, None

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(ConnectionError(f"connection lost: {exc or 'closed by the server'}"))

    def close(self, err: Exception) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(err)
        if self.transport is not None:
            self.transport.close()


class RestClient:
    """POSTs the prepared request over pooled keep-alive connections, one per request in
    flight. A bare protocol, not aiohttp: 27 us of client CPU per request against 110
    (digits_cnn binary, closed loop of 8, uvloop), which the server gets back."""

    def __init__(self, request: Request) -> None:
        url = urlsplit(request.address)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        head = [f"POST {url.path} HTTP/1.1", f"Host: {url.netloc}"]
        head += [f"Content-Length: {len(request.body)}"]
        head += [f"{k}: {v}" for k, v in request.headers.items()]
        self.raw = ("\r\n".join(head) + "\r\n\r\n").encode() + request.body
        self.idle: list[HttpConnection] = []

    async def send(self, budget_s: float | None) -> tuple[Outcome, str]:
        """One request; ``budget_s`` is not sent (the V2 REST protocol carries none)."""
        conn, kept = self._idle(), False
        try:
            if conn is None:
                loop = asyncio.get_running_loop()
                _, conn = await loop.create_connection(HttpConnection, self.host, self.port)
            status, kept = await conn.exchange(self.raw)
        except OSError as err:  # ConnectionError included
            return Outcome.ERROR, f"{type(err).__name__}: {err}"
        finally:
            if conn is not None and kept:
                self.idle.append(conn)
            elif conn is not None:  # failed, cancelled, or closed by the server
                conn.close(ConnectionError("closed"))
        if status in (503, 504):
            return (Outcome.REFUSED if status == 503 else Outcome.EXPIRED), ""
        return (Outcome.OK, "") if 200 <= status < 300 else (Outcome.ERROR, f"HTTP {status}")

    def _idle(self) -> HttpConnection | None:
        while self.idle:
            conn = self.idle.pop()  # the most recent: the least likely timed out
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def close(self) -> None:
        for conn in self.idle:
            conn.close(ConnectionError("closed"))


class GrpcClient:
    """Unary ModelInfer calls of the prepared message, round-robin over ``GRPC_CHANNELS``
    channels: each its own connection (a local subchannel pool), so that the kernel spreads
    them over the server's workers as it spreads many clients'. On one connection every
    call goes to one worker, whose grpc.aio layer saturates long before the model does."""

    def __init__(self, request: Request) -> None:
        self.request = request
        options = [
            ("grpc.max_receive_message_length", grpc_load.MAX_MESSAGE_BYTES),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self.channels = [
            grpc.aio.insecure_channel(request.address, options=options)
            for _ in range(GRPC_CHANNELS)
        ]
        self.calls = [c.unary_unary(grpc_load.METHOD) for c in self.channels]  # bytes to bytes
        self.sent = 0

    async def send(self, budget_s: float | None) -> tuple[Outcome, str]:
        """One call, with ``budget_s`` as its deadline (the server sees it: grpc-timeout)."""
        self.sent += 1
        try:
            await self.calls[self.sent % GRPC_CHANNELS](self.request.body, timeout=budget_s)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                return Outcome.REFUSED, ""
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return Outcome.EXPIRED, ""
            return Outcome.ERROR, f"{err.code().name}: {err.details()}"
        return Outcome.OK, ""

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def make_client(request: Request) -> RestClient | GrpcClient:
    """Made inside the running loop: both clients bind to it."""
    return GrpcClient(request) if request.protocol == "grpc" else RestClient(request)
