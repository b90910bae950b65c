"""How tests wait: by polling a condition, never by sleeping for a guessed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def poll(condition: Callable[[], bool], limit: float = 30.0) -> None:
    """Return once ``condition()`` holds; fail after ``limit`` seconds (a bug fails, not
    hangs). The one wall-clock wait of the tests: what it waits for is the condition."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the event loop until ``condition`` holds (for state that the loop's own
    tasks change; bounded: a bug fails, not hangs)."""
    for _ in range(10_000):
        if condition():
            return
        await next_turn()
    raise AssertionError("condition never held")


async def next_turn(turns: int = 1) -> None:
    """Let the event loop run ``turns`` times: an order of events (a request that arrives
    that many turns later), not a wait for a time."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def until_clock(moment: float) -> None:
    """Let the event loop run until ``time.perf_counter()`` has passed ``moment``: for a
    deadline test, the clock is the event waited for (bounded to 30 s: a bug fails)."""
    assert moment - time.perf_counter() < 30.0, "a moment over 30 s away"
    while (left := moment - time.perf_counter()) >= 0:
        await asyncio.sleep(min(left, 0.001))
