"""Admission at the entry: how many of one model's requests a worker works on at once.

A worker admits up to ``limit`` inference requests of a model at a time (reading
their body, decoding, queued for or in an ONNX Runtime call, encoding). The
others wait in a first-come line *before their body is read*, which costs the
event loop nothing while they wait. A request that finds ``room`` requests of
the model already admitted or waiting is refused at once with 503 and
Retry-After, also before its body is read, so under overload a refusal costs a
small fraction of an answer (Google SRE's "Handling Overload"; Triton's
``max_queue_size``; Envoy's and Netflix's concurrency limits at the point of
entry).

Why a line and not a refusal past the limit: closed-loop clients that are
refused send again at once, and the event loop then spends its time refusing
while the admitted requests wait for it (measured in docs/throughput.md). A
waiting request holds only its connection and its parsed headers.
"""

from __future__ import annotations

import asyncio
from collections import deque

from prometheus_client import Gauge

from service.errors import QueueFull, RequestTimeout


class AdmissionGate:
    """The entry of one model in one worker (event loop only; no locks)."""

    __slots__ = ("label", "admitted", "waiting", "_line", "_gauge")

    def __init__(self, label: str, gauge: Gauge | None = None) -> None:
        self.label = label  # "model 'name'", for messages
        self.admitted = 0  # requests past the gate and not yet answered
        self.waiting = 0  # requests in the line
        self._gauge = gauge  # of ``waiting``: set only when the line changes (not per request)
        # A waiter's future; done ones (timed out, cancelled) are skipped when a slot frees.
        self._line: deque[asyncio.Future[None]] = deque()

    async def enter(self, limit: int, room: int, timeout_s: float | None = None) -> None:
        """Return once the request may go on (call :meth:`leave` when it is answered).

        Raises :class:`QueueFull` (503, Retry-After) when ``room`` requests are already
        admitted or waiting, :class:`RequestTimeout` (504) when ``timeout_s`` passes in
        the line; in both cases the request holds no slot.
        """
        if self.admitted < limit and not self.waiting:
            self.admitted += 1
            return
        if self.admitted + self.waiting >= room:
            raise QueueFull(
                f"{self.label} is overloaded: {self.admitted} requests are in progress and "
                f"{self.waiting} waiting in this worker (max_queue_size {room}); retry later",
                headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._line.append(turn)
        self.waiting += 1
        if self._gauge is not None:
            self._gauge.inc()
        timer = None if timeout_s is None else loop.call_later(timeout_s, _expire, turn, self)
        try:
            await turn
        except BaseException:
            # Granted just before it was cancelled: the slot was handed over, give it back.
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self.leave()
            raise
        finally:
            self.waiting -= 1
            if self._gauge is not None:
                self._gauge.dec()
            if timer is not None:
                timer.cancel()

    def leave(self) -> None:
        """An admitted request is answered: its slot goes to the first one still waiting."""
        line = self._line
        while line:
            turn = line.popleft()
            if not turn.done():  # the slot passes straight on: ``admitted`` stays
                turn.set_result(None)
                return
        self.admitted -= 1


def _expire(turn: asyncio.Future[None], gate: AdmissionGate) -> None:
    if not turn.done():
        turn.set_exception(
            RequestTimeout(f"{gate.label}: no turn within the request timeout (waited in line)")
        )


class AdmissionGates:
    """The entries of one worker's models, one per model name (created on first use), so
    that requests in line go on to whichever version serves when their turn comes."""

    def __init__(self, waiting: Gauge) -> None:
        self._waiting = waiting  # labelled by model
        self._gates: dict[str, AdmissionGate] = {}

    def __call__(self, name: str) -> AdmissionGate:
        found = self._gates.get(name)
        if found is None:
            gauge = self._waiting.labels(name)
            found = self._gates[name] = AdmissionGate(f"model '{name}'", gauge)
        return found
