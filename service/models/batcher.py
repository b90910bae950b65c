"""The dynamic batcher: concurrent requests to one model version, run as one ONNX Runtime call.

Each served model version has a FIFO queue and at most one inference call in
flight. When the model is free, the dispatcher takes the oldest request and
every queued request with the same input signature (input names, datatypes,
shapes past the batch axis, requested outputs), up to ``max_batch_size``
samples, concatenates them along the batch axis, runs them as one call in a
worker thread (ONNX Runtime releases the GIL, so the event loop keeps reading
requests meanwhile), or on the event loop itself when the calls measured so far say it
takes at most ``INLINE_LIMIT_S`` (:mod:`service.models.run_times`: cheaper than the hop to
the thread and back), and hands each request its own rows of the outputs.
Requests that arrive while a call runs batch up by themselves. Before a call, the
dispatcher also lets the event loop deliver the requests already on their way
(:meth:`DynamicBatcher._gather`): grpc.aio hands the server its calls a loop turn or two
apart, so without it each gRPC call found the model idle and ran alone.
``max_queue_delay_us`` > 0 also holds a partial batch that long for more requests when
the model is idle (Triton's ``max_queue_delay_microseconds``). With batching off each
request is its own call, through the same queue.

ONNX Runtime computes each sample of a batch independently, so a request gets
the same bits batched or alone (tested). A request over ``max_batch_size``
samples runs alone, whole.

Back-pressure is the entry's (:mod:`service.dataplane.admission`): at most ``max_queue_size``
requests of a model are admitted or waiting in a worker, so the queue here never
holds more. A request whose deadline passes while it waits (:class:`RequestTimeout`,
503 "Request timeout expired", as Triton answers) leaves the queue at once and never
runs; so does one predicted to miss it (its batch, at the run time measured, would end
past it), and one whose client cancels or disconnects, the latter once it has waited
``WATCH_AFTER_S`` (its connection is watched from then on: most requests are answered
sooner, and watching each from the start would cost a task per request). A request
already running is answered: its compute is spent, and the answer may still be of use.

With a latency target (:attr:`BatchingConfig.latency_target_s`), the batch is also cut
to what its oldest request's deadline allows, and a partial batch is held for company
only while that pays (:mod:`service.models.batch_policy`); :meth:`predicted_wait`
tells the entry how long a new request would take, so that it can refuse one that
cannot make its deadline before reading its body.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from service.errors import (
    ClientDisconnected,
    ModelNotReady,
    RequestTimeout,
    ServiceError,
)
from service.models.batch_call import Feeds, Outputs, Runner, run_batch
from service.models.batch_policy import hold_until, take_batch
from service.models.config import BatchingConfig
from service.models.run_times import SMOOTHING, RunTimes
from service.observability.metrics import BatcherMetrics, RequestRecord

T = TypeVar("T")

Receive = Callable[[], Awaitable[Mapping[str, Any]]]
WATCH_AFTER_S = 0.05  # a queued request's connection is watched once it has waited this long
# Before a call, the loop turns the dispatcher gives requests on their way to join it: it
# stops after this many turns in a row bring none, at a full batch, or GATHER_MAX_S after it
# began. grpc.aio does not deliver a call every turn: stopping after 2 idle turns, 64 gRPC
# calls in flight still ran about one per ONNX Runtime call; after 4, 12 per call (digits_cnn,
# 2 workers; docs/benchmarks.md, "gRPC batching"). A lone request pays the idle turns.
GATHER_IDLE_TURNS = 4
GATHER_MAX_S = 0.01
# A call predicted to take at most this long runs on the event loop (service/models/run_times.py).
INLINE_LIMIT_S = 0.001


@dataclass(eq=False, slots=True)
class _Pending:
    """A queued request: its checked inputs and the future its handler awaits."""

    feeds: dict[str, np.ndarray]
    names: list[str]  # outputs to compute
    rows: int  # samples (the batch axis), 1 for a model without one
    key: Hashable | None  # requests with equal keys can share a call; None: never
    enqueued: float
    deadline: float | None  # perf_counter time it must be dispatched by (None: none)
    record: RequestRecord | None  # where the request's time went, filled in when it runs
    future: asyncio.Future[Outputs] = field(repr=False)
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


def _signature(feeds: dict[str, np.ndarray], names: list[str]) -> Hashable:
    """Requests with equal signatures can be concatenated along the batch axis."""
    if len(feeds) == 1:
        [(name, array)] = feeds.items()
        return name, array.dtype, array.shape[1:], *names
    inputs = tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in feeds.items()))
    return inputs, tuple(names)


def _retired(feeds: Feeds, names: list[str]) -> Outputs:
    """The runner of a closed, drained batcher (it queues nothing more, so nothing calls it)."""
    raise ModelNotReady("the model version was unloaded or replaced; retry")


class DynamicBatcher:
    """The queue and dispatcher of one model version (lives on the event loop).

    ``config`` may be replaced at any time (a new ``config.json``); :meth:`close`
    (from any thread) refuses new requests and stops the worker thread once the
    queue has drained.
    """

    def __init__(
        self,
        label: str,
        run: Runner,
        batchable: bool,
        config: BatchingConfig,
        metrics: BatcherMetrics,
        inline_limit_s: float = INLINE_LIMIT_S,
    ) -> None:
        self.label = label  # "model 'name' version N", for messages
        self.batchable = batchable  # every input and output has the batch axis first
        self.config = config
        self.metrics = metrics
        self.run_times = RunTimes(inline_limit_s)  # 0: every call in the thread
        self._run = run
        self._arrivals = 0  # requests ever queued: the gathering counts the new ones
        self._last_arrival = 0.0
        self.arrival_gap_s: float | None = None  # smoothed time between queued requests
        self.rows_per_request = 1.0  # smoothed samples per request
        self._closed = False
        self._running = False  # an ONNX Runtime call is in flight
        self._lock = threading.Lock()  # closing vs starting the dispatcher
        self._queue: deque[_Pending] = deque()
        self._rows = 0  # samples queued
        self._dispatcher: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None  # set while holding a partial batch
        # Its own thread: a shared pool would queue the model's calls behind other work
        # (large bodies decoded off the loop) while the model idles. The thread ends with
        # the batcher.
        self._runner = ThreadPoolExecutor(1, thread_name_prefix="foldserve-ort")

    def in_thread(self, work: Callable[[], T]) -> T:
        """Run ``work`` in this batcher's ONNX Runtime thread, and wait (the warm-up, before
        the version serves): the thread starts now, not on the first request (a thread's
        start was most of a first request's 4 ms against 0.7 ms after)."""
        return self._runner.submit(work).result()

    @property
    def closed(self) -> bool:
        """Swapped out or unloaded: new requests go to the version that serves now."""
        return self._closed

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a running call)."""
        return len(self._queue)

    def predicted_wait(self, ahead: int) -> float | None:
        """Seconds until a request that arrives now, with ``ahead`` requests of this model
        already in progress or waiting before it in this worker, would have its answer;
        None before a call has been measured (nothing is refused on a guess).

        The requests go in batches of up to ``max_batch_size`` samples, each taking the
        run time measured for its size. (What the event loop spends on each request
        besides is in the entry's measured pace, :meth:`AdmissionGate.pace_s`.)
        """
        config = self.config
        rows = (ahead + 1) * self.rows_per_request
        size = config.max_batch_size if config.enabled and self.batchable else 1.0
        size = max(size, self.rows_per_request)  # a request larger than a batch runs whole
        per_batch = self.run_times.predicted(math.ceil(min(size, rows)))
        if per_batch is None:
            return None
        return math.ceil(rows / size) * per_batch

    async def run(
        self,
        feeds: Feeds,
        names: list[str],
        *,
        deadline: float | None = None,
        receive: Receive | None = None,
        record: RequestRecord | None = None,
    ) -> Outputs:
        """The outputs ``names`` for checked ``feeds``, batched with others; ``record`` gets
        the request's share of its batch's time.

        Raises :class:`ModelNotReady` once closed, :class:`RequestTimeout` when
        ``deadline`` (a ``time.perf_counter()`` time) passes before the request is
        dispatched or its batch is predicted to end past it, :class:`ClientDisconnected`
        when ``receive`` (the request's ASGI receive, body already read) reports a
        disconnect.
        """
        item = self._enqueue(feeds, names, deadline, record)
        loop = asyncio.get_running_loop()
        timer = (
            None
            if deadline is None
            else loop.call_later(max(0.0, deadline - item.enqueued), self._expire, item)
        )
        # Most requests are answered before the watch starts: a task per request would cost
        # the event loop more than the rest of the batching does.
        watch = (
            None
            if receive is None
            else loop.call_later(WATCH_AFTER_S, self._start_watch, item, receive)
        )
        try:
            return await item.future
        except asyncio.CancelledError:  # the client cancelled (gRPC), or shutdown
            self._abandon(item, None, "cancelled")
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if watch is not None:
                watch.cancel()
            if item.watcher is not None:
                item.watcher.cancel()

    # -- queue ------------------------------------------------------------------

    def close(self) -> None:
        """No new requests; the worker thread ends once the queued ones have run."""
        with self._lock:
            self._closed = True
            if self._dispatcher is None:
                self._retire()

    def _retire(self) -> None:
        """Closed and drained (caller holds ``_lock``): end the worker thread, drop the runner.

        The runner is a bound method of the served version that owns this batcher: kept,
        that reference cycle would hold the closed version and its ONNX Runtime sessions
        until the cyclic garbage collector ran, so memory piled up over hot swaps.
        """
        self._runner.shutdown(wait=False)
        self._run = _retired

    def _enqueue(
        self,
        feeds: Feeds,
        names: list[str],
        deadline: float | None,
        record: RequestRecord | None,
    ) -> _Pending:
        config = self.config
        first = next(iter(feeds.values()))
        rows = int(first.shape[0]) if first.ndim else 1
        key = _signature(feeds, names) if self.batchable and config.enabled else None
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        item = _Pending(feeds, names, rows, key, now, deadline, record, loop.create_future())
        if self._last_arrival:
            gap, known = now - self._last_arrival, self.arrival_gap_s
            self.arrival_gap_s = gap if known is None else known + SMOOTHING * (gap - known)
        self._last_arrival = now
        self.rows_per_request += SMOOTHING * (rows - self.rows_per_request)
        with self._lock:
            if self._closed:  # resolved just before a swap or unload: the retry finds the new one
                raise ModelNotReady(
                    f"{self.label} was unloaded or replaced; retry", headers={"Retry-After": "0"}
                )
            self._queue.append(item)
            self._rows += rows
            self._arrivals += 1
            if not self._running:  # while a call runs, the next batch taken updates it
                self.metrics.queue_depth.set(len(self._queue))
            if self._dispatcher is None:
                self._dispatcher = loop.create_task(self._dispatch())
                return item
        if self._wakeup is not None and self._rows >= config.max_batch_size:
            if not self._wakeup.done():
                self._wakeup.set_result(None)
        return item

    def _remove(self, item: _Pending) -> bool:
        """Take ``item`` out of the queue; False when it was not there (running or done)."""
        try:
            self._queue.remove(item)
        except ValueError:
            return False
        self._rows -= item.rows
        self.metrics.queue_depth.set(len(self._queue))
        return True

    def _abandon(self, item: _Pending, error: ServiceError | None, reason: str) -> None:
        """The request's waiter is gone or gave up: it must not run (if it has not yet)."""
        if self._remove(item) and reason:
            self.metrics.dropped[reason].inc()
        if error is not None and not item.future.done():
            item.future.set_exception(error)

    def _expire(self, item: _Pending) -> None:
        """The request's deadline passed while it waited: answered at once, never run (one
        already dispatched gets its answer)."""
        if item in self._queue:
            waited_ms = (time.perf_counter() - item.enqueued) * 1e3
            error = RequestTimeout(
                f"Request timeout expired: {self.label}: its deadline passed after "
                f"{waited_ms:.3g} ms in the queue"
            )
            self._abandon(item, error, "expired")

    def _start_watch(self, item: _Pending, receive: Receive) -> None:
        if not item.future.done():
            item.watcher = asyncio.get_running_loop().create_task(self._watch(receive, item))

    async def _watch(self, receive: Receive, item: _Pending) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._abandon(item, ClientDisconnected("the client disconnected"), "cancelled")

    # -- dispatch ---------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Run batches while requests wait; ends when the queue is empty (restarted on demand)."""
        try:
            await self._gather()  # the model was idle: let the requests on their way join
            while self._queue:
                await self._hold_partial_batch()
                batch = self._take_batch()  # empty: every request left (timeouts, disconnects)
                if batch:
                    await self._execute(batch)
        finally:
            with self._lock:
                self._dispatcher = None
                if self._closed:
                    self._retire()

    async def _gather(self) -> None:
        """Give the requests on their way a few loop turns to join the next call: until
        ``GATHER_IDLE_TURNS`` turns in a row bring none, the batch is full, or
        ``GATHER_MAX_S`` has passed. Requests read in one loop pass (REST under load)
        are all here after the first turn; grpc.aio delivers its calls turns apart."""
        await asyncio.sleep(0)  # requests read in this same loop pass join first
        config = self.config
        if not (config.enabled and self.batchable):
            return
        deadline = time.perf_counter() + GATHER_MAX_S
        idle = 0
        while idle < GATHER_IDLE_TURNS and self._rows < config.max_batch_size:
            if time.perf_counter() > deadline:
                return
            arrived = self._arrivals
            await asyncio.sleep(0)
            idle = idle + 1 if self._arrivals == arrived else 0

    async def _hold_partial_batch(self) -> None:
        """Wait for a full batch as long as :func:`hold_until` allows (``max_queue_delay_us``
        after the oldest request at most)."""
        config = self.config
        if not (config.enabled and self.batchable and config.max_queue_delay_us > 0):
            return
        loop = asyncio.get_running_loop()
        while self._queue and self._rows < config.max_batch_size:
            until = hold_until(
                self._queue[0],
                config.max_queue_delay_us,
                config.max_batch_size,
                self.run_times,
                self.arrival_gap_s,
            )
            remaining = None if until is None else until - time.perf_counter()
            if remaining is None or remaining <= 0:
                return
            self._wakeup = loop.create_future()
            timer = loop.call_later(remaining, _resolve, self._wakeup)
            try:
                await self._wakeup
            finally:
                timer.cancel()
                self._wakeup = None

    def _take_batch(self) -> list[_Pending]:
        """The next call's requests (:func:`take_batch`); those late for their deadline are
        answered now (503) and never run."""
        queue = self._queue
        batch, late = take_batch(
            queue, self.config.max_batch_size, self.run_times, time.perf_counter()
        )
        for item, predicted_s in late:
            self._late(item, predicted_s)
        self._rows -= sum(item.rows for item in batch) + sum(item.rows for item, _ in late)
        self.metrics.queue_depth.set(len(queue))
        return batch

    def _late(self, item: _Pending, predicted_s: float) -> None:
        """``item``, already out of the queue, cannot make its deadline: answered now."""
        self.metrics.dropped["expired"].inc()
        if not item.future.done():
            why = (
                f"it would end {predicted_s * 1e3:.3g} ms from now, past its deadline"
                if predicted_s
                else "its deadline passed in the queue"
            )
            item.future.set_exception(
                RequestTimeout(f"Request timeout expired: {self.label}: {why}")
            )

    async def _execute(self, batch: list[_Pending]) -> None:
        """Run one batch (in the thread, or inline when it is predicted to be tiny) and
        resolve each request's future (never raises)."""
        now = time.perf_counter()
        for item in batch:
            self.metrics.queue_wait.observe(now - item.enqueued)
        rows = sum(item.rows for item in batch)
        self._running = True
        try:
            if self.run_times.inline(rows):  # cheaper than the hop to the thread and back
                answers, times = run_batch(self._run, batch)
            else:
                answers, times = await asyncio.get_running_loop().run_in_executor(
                    self._runner, run_batch, self._run, batch
                )
        except asyncio.CancelledError:  # shutdown: nobody may wait forever
            for item in batch:
                item.future.cancel()
            raise
        finally:
            self._running = False
        self.run_times.observe(rows, times.input_s + times.infer_s + times.output_s)
        self.metrics.executed(rows, len(batch), times.infer_s)
        for item, answer in zip(batch, answers, strict=True):
            record = item.record
            if record is not None:
                record.infer_s = times.infer_s
                record.input_s += times.input_s
                record.output_s += times.output_s
            if item.future.done():  # timed out or disconnected while running
                continue
            if isinstance(answer, BaseException):
                item.future.set_exception(answer)
            else:
                item.future.set_result(answer)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
