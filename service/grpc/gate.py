"""The gRPC calls in flight in one worker, and how they end at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc

from service.errors import ShuttingDown

LAST_CALL_S = 0.5  # at shutdown, after the calls in flight: new calls still get UNAVAILABLE


class CallGate:
    """The calls in flight in this worker, and the stop: from it on, new calls get
    UNAVAILABLE from here (grpcio's own refusal, during its shutdown, can read CANCELLED)
    while those in flight finish."""

    def __init__(self) -> None:
        self.stopping = False
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if self.stopping:
            raise ShuttingDown("the server is shutting down; send this call to another one")
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def stop(self, server: grpc.aio.Server, grace_s: float) -> None:
        """Refuse new calls, let those in flight finish (``grace_s`` at most), keep refusing
        for ``LAST_CALL_S`` (a client that just had its answer sends its next call now: it
        gets UNAVAILABLE from here, not grpcio's CANCELLED for a call that reaches a
        server in the middle of stopping), then stop."""
        self.stopping = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        await asyncio.sleep(LAST_CALL_S)
        await server.stop(LAST_CALL_S)
