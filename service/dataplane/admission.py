"""Admission at the entry: how many of one model's requests a worker works on at once.

A request that finds ``room`` requests of its model already admitted or in line
in this worker is refused at once with 503 and Retry-After, *before its body is
read*, so under overload a refusal costs a small fraction of an answer (Google
SRE's "Handling Overload"; Triton's ``max_queue_size``). The others read their
body at their own pace (the connection's body time limit bounds it,
:mod:`service.rest.connections`), then wait for a turn in a first-come line: a
worker works on up to ``limit`` requests of a model at a time (decoding, queued
for or in an ONNX Runtime call, encoding), as Envoy's and Netflix's concurrency
limits do at the point of entry.

Why a line and not a refusal past the limit: closed-loop clients that are
refused send again at once, and the event loop then spends its time refusing
while the admitted requests wait for it (measured in docs/throughput.md). A
request in line holds its connection and its body, not yet decoded, and costs
the event loop nothing. Why the body is read before the line: a turn held
while a slow client trickles its body would hold up everyone behind it.

A refusal storm is paced. Closed-loop clients (wrk, a retry loop without back-off)
send again the moment they are refused: with a latency target, 2,000 such clients on
resnet_bench got 96,972 refusals and 5 answers a second, as the event loop did nothing
but refuse. When refusals outnumber answers ``STORM_RATIO`` to one over a second (and
there were at least ``STORM_MIN`` of them), each refusal is held for the
``Retry-After`` it carries before it is sent, until a second brings fewer than
``STORM_MIN`` refusals: a timer, no CPU, and the client that ignores Retry-After waits
it out anyway. Open-loop overload (requests that do not come
back when refused) stays below the ratio, and its refusals go out at once.

The gate also measures its model's pace in this worker: the time it was busy (some
request of the model admitted) per request answered, over the last hundred or so
(:meth:`AdmissionGate.pace_s`). Under load that is what one more request ahead costs
a new one, whatever the bottleneck: ONNX Runtime, or the event loop's parsing,
decoding and encoding, which the batcher's run times do not see.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from prometheus_client import Gauge

from service.errors import QueueFull, RequestTimeout

# Weight kept by the pace's past at each answer: about the last hundred answers count.
PACE_DECAY = 0.99
# How often the pending-requests gauge is sampled while requests are pending.
PENDING_SAMPLE_S = 0.05
# Refusals per answer over a second, and refusals in it, past which refusals are held for
# their Retry-After (HOLD_S) before they are sent: a storm of clients that retry at once.
STORM_RATIO = 10
STORM_MIN = 100
HOLD_S = 1.0


class AdmissionGate:
    """The entry of one model in one worker (event loop only; no locks)."""

    __slots__ = (
        "label",
        "admitted",
        "waiting",
        "_line",
        "_gauge",
        "_busy_from",
        "_work",
        "_done",
        "_second",
        "_refusals",
        "_answers",
        "_storm",
    )

    def __init__(self, label: str, gauge: Gauge | None = None) -> None:
        self.label = label  # "model 'name'", for messages
        self.admitted = 0  # requests past the gate and not yet answered
        self.waiting = 0  # requests in the line
        self._gauge = gauge  # of ``waiting``: touched only by requests that wait
        # A waiter's future; done ones (timed out, cancelled) are skipped when a slot frees.
        self._line: deque[asyncio.Future[None]] = deque()
        self._busy_from = 0.0  # since when a request has been admitted (0: idle)
        self._work = 0.0  # decayed busy seconds ...
        self._done = 0.0  # ... and answers in them
        self._second = 0.0  # when the current second of counting began
        self._refusals = 0  # refusals and answers in it
        self._answers = 0
        self._storm = False  # the last second was a refusal storm

    def pace_s(self) -> float | None:
        """Busy seconds per answer, lately (None before the first answer): 1 / throughput
        while the model has work, which is what each request ahead adds to a new one's wait."""
        return self._work / self._done if self._done else None

    def refusal_hold_s(self) -> float:
        """Count a refusal; the seconds to hold it before it is sent: ``HOLD_S`` while the
        last second was a refusal storm, else 0."""
        now = time.perf_counter()
        if now - self._second >= 1.0:
            refusals, answers = self._refusals, self._answers
            # A storm starts past the ratio and lasts while refusals keep coming: held, they
            # come at most one per client a second, under the ratio, and the storm is not over.
            storm = self._storm or refusals > STORM_RATIO * answers
            self._storm = storm and refusals >= STORM_MIN
            self._second, self._refusals, self._answers = now, 0, 0
        self._refusals += 1
        return HOLD_S if self._storm else 0.0

    def check_room(self, room: int) -> None:
        """Raise :class:`QueueFull` (503, Retry-After) when ``room`` requests of the model
        are already admitted or waiting: the cheap refusal, before the body is read."""
        if self.admitted + self.waiting >= room:
            raise QueueFull(
                f"{self.label} is overloaded: {self.admitted} requests are in progress and "
                f"{self.waiting} waiting in this worker (max_queue_size {room}); retry later",
                headers={"Retry-After": "1"},
            )

    async def enter(self, limit: int, room: int, timeout_s: float | None = None) -> None:
        """Return once the request may go on (call :meth:`leave` when it is answered).

        Raises :class:`QueueFull` (503, Retry-After) when ``room`` requests are already
        admitted or waiting, :class:`RequestTimeout` (503, "Request timeout expired") when
        ``timeout_s`` passes in the line; in both cases the request holds no slot.
        """
        if self.admitted < limit and not self.waiting:
            if not self.admitted:
                self._busy_from = time.perf_counter()
            self.admitted += 1
            return
        self.check_room(room)
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
        now = time.perf_counter()
        self._work = self._work * PACE_DECAY + (now - self._busy_from)
        self._done = self._done * PACE_DECAY + 1.0
        self._busy_from = now  # busy from here on if it stays so; reset on the next enter
        self._answers += 1
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
            RequestTimeout(
                f"Request timeout expired: {gate.label}: its deadline passed while it waited "
                "in line at the entry"
            )
        )


class AdmissionGates:
    """The entries of one worker's models, one per model name (created on first use), so
    that requests in line go on to whichever version serves when their turn comes.

    They also keep ``foldserve_pending_requests{model}`` (requests in progress or in line:
    Triton's ``nv_inference_pending_request_count``, the signal to scale on), sampled
    ``PENDING_SAMPLE_S`` after a request arrives and then as long as any are pending,
    rather than written at each arrival and answer: a gauge update is a locked write to
    the multiprocess values, which cost a small model's throughput per request
    (docs/benchmarks.md, "Serving to a latency target"). Each worker sets its own value;
    a scrape sums them over the workers.
    """

    def __init__(self, waiting: Gauge, pending: Gauge | None = None) -> None:
        self._waiting = waiting  # labelled by model
        self._pending = pending  # labelled by model
        self._gates: dict[str, AdmissionGate] = {}
        self._sampling = False

    def arrived(self) -> None:
        """A request came in: the pending gauge is sampled shortly (a timer, once)."""
        if self._sampling or self._pending is None:
            return
        self._sampling = True
        asyncio.get_running_loop().call_later(PENDING_SAMPLE_S, self._sample)

    def _sample(self) -> None:
        assert self._pending is not None
        busy = False
        for name, gate in self._gates.items():
            count = gate.admitted + gate.waiting
            self._pending.labels(name).set(count)
            busy = busy or count > 0
        self._sampling = busy  # sampled again until every model's count is back to 0
        if busy:
            asyncio.get_running_loop().call_later(PENDING_SAMPLE_S, self._sample)

    def __call__(self, name: str) -> AdmissionGate:
        found = self._gates.get(name)
        if found is None:
            gauge = self._waiting.labels(name)
            found = self._gates[name] = AdmissionGate(f"model '{name}'", gauge)
        return found
