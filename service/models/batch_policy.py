"""The batcher's policy against deadlines: which queued requests the next call takes, which
are answered late without running, and how long a partial batch may be held.

:mod:`service.models.batcher` keeps the mechanics (the queue, the dispatcher, the calls);
what it decides with the run times measured (:mod:`service.models.run_times`) is here, as
functions of the queue, the clock and those measurements.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Protocol, TypeVar

from service.models.run_times import RunTimes


class Waiting(Protocol):
    """A queued request as the policy sees it."""

    @property
    def rows(self) -> int: ...  # samples on the batch axis
    @property
    def key(self) -> Hashable | None: ...  # equal keys can share a call; None: never
    @property
    def enqueued(self) -> float: ...  # time.perf_counter() times
    @property
    def deadline(self) -> float | None: ...


W = TypeVar("W", bound=Waiting)


def take_batch(
    queue: deque[W], max_batch_size: int, times: RunTimes, now: float
) -> tuple[list[W], list[tuple[W, float]]]:
    """The next call's requests, taken from ``queue``, and the requests taken out as late,
    each with the seconds its call was predicted to take (0: its deadline already passed).

    The call takes the oldest request that can still make its deadline and, in queue
    order, the compatible ones that fit beside it: at most ``max_batch_size`` samples
    (a larger request runs alone, whole), and no more than the oldest one's deadline
    leaves time to run, at the run time measured for the size. A request that cannot
    make its deadline even alone is late; so is none whose model cannot serve it in
    time even unqueued (a target below the run time): that one runs, late. A later
    request whose deadline the call would end past stays queued for the next. When late
    requests were taken out, no call is taken this time: the request now oldest gets
    its own hold (``max_queue_delay_us``) before it runs, as it would have had they
    left by their timers.
    """
    late: list[tuple[W, float]] = []
    while queue:
        head = queue[0]
        limit = max(max_batch_size, head.rows)
        ends = None  # when the call is predicted to end (None: no deadline or no measure)
        if head.deadline is not None:
            if head.deadline <= now:  # its timer is due this very turn
                late.append((queue.popleft(), 0.0))
                continue
            fits = times.largest_within(head.deadline - now, limit)
            if fits is not None and fits < head.rows:
                alone = times.predicted(head.rows) or 0.0
                if alone <= head.deadline - head.enqueued:  # late because it waited
                    late.append((queue.popleft(), alone))
                    continue
                fits = head.rows
            limit = limit if fits is None else fits
            expected = times.predicted(limit)
            ends = None if expected is None else now + expected
        if late:  # a new oldest request: it may be held for company first, as any other
            return [], late
        queue.popleft()
        batch, rows = [head], head.rows
        if head.key is not None and rows < limit:
            kept: deque[W] = deque()
            while queue and rows < limit:
                item = queue.popleft()
                fits_here = item.key == head.key and rows + item.rows <= limit
                if fits_here and (ends is None or item.deadline is None or ends <= item.deadline):
                    batch.append(item)
                    rows += item.rows
                else:
                    kept.append(item)
            kept.extend(queue)
            queue.clear()
            queue.extend(kept)
        return batch, late
    return [], late


def hold_until(
    head: Waiting,
    max_queue_delay_us: int,
    max_batch_size: int,
    times: RunTimes,
    arrival_gap_s: float | None,
) -> float | None:
    """Until when (a ``time.perf_counter()`` time) a partial batch headed by ``head`` may
    wait for more requests while the model is idle; None: run it now.

    ``max_queue_delay_us`` after the oldest request at most; with a deadline, only while
    holding pays (:func:`worth_holding`) and no later than leaves a full batch the time
    it takes before that deadline.
    """
    until = head.enqueued + max_queue_delay_us / 1e6
    if head.deadline is None:
        return until
    if not worth_holding(arrival_gap_s, times):
        return None
    full = times.predicted(max_batch_size) or 0.0
    return min(until, head.deadline - full)


def worth_holding(arrival_gap_s: float | None, times: RunTimes) -> bool:
    """Holding a partial batch pays while the next request is expected sooner than the
    fixed cost of a call it would otherwise need (the fitted ``b``): the requests held
    wait less than the call saved costs. Before that is measured, hold as configured."""
    fixed = times.fixed_cost()
    return arrival_gap_s is None or fixed is None or arrival_gap_s < fixed
