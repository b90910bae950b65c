"""service/models/batch_policy.py as pure functions: the queue, the clock and the run times
are given, so each rule is checked at the moment it decides."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

from service.models.batch_policy import take_batch
from service.models.run_times import RunTimes


@dataclass(frozen=True)
class Item:
    name: str
    deadline: float | None
    rows: int = 1
    key: Hashable | None = "same"
    enqueued: float = 0.0


def test_late_requests_leave_and_the_next_oldest_is_not_taken_in_the_same_turn() -> None:
    """The next oldest gets its own hold first (the dispatcher comes back for it): taking
    it at once ran requests that were held for company (seen in a real server)."""
    queue = deque([Item("late", 1.0), Item("next", 9.0), Item("later", None)])
    batch, late = take_batch(queue, 8, RunTimes(0.0), now=2.0)
    assert batch == [] and late == [(Item("late", 1.0), 0.0)]
    assert [i.name for i in queue] == ["next", "later"]
    batch, late = take_batch(queue, 8, RunTimes(0.0), now=2.0)  # the next turn
    assert [i.name for i in batch] == ["next", "later"] and late == [] and not queue


def test_a_batch_stops_at_what_the_oldest_deadline_allows() -> None:
    times = RunTimes(0.0)
    times.observe(1, 0.01)
    times.observe(8, 0.08)  # 10 ms a row
    queue = deque([Item(f"r{i}", 1.045 if i == 0 else None) for i in range(8)])
    batch, late = take_batch(queue, 8, times, now=1.0)  # 45 ms left: 4 rows
    assert [i.name for i in batch] == ["r0", "r1", "r2", "r3"] and late == []
    assert len(queue) == 4


def test_a_later_request_the_batch_would_make_late_waits_for_the_next() -> None:
    times = RunTimes(0.0)
    times.observe(2, 0.02)
    queue = deque([Item("a", 5.0), Item("tight", 1.01), Item("b", None)])
    batch, late = take_batch(queue, 8, times, now=1.0)  # the call of 2-3 rows ends past 1.01
    assert [i.name for i in batch] == ["a", "b"] and late == []
    assert [i.name for i in queue] == ["tight"]
