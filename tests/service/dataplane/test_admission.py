"""The entry's admission gate, in process: limit, first-come line, refusal, timeout, hand-over.

Events are ordered by the gate's own state (``admitted``, ``waiting``) and by
awaiting the tasks, never by sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry, Gauge

from service.dataplane.admission import HOLD_S, STORM_MIN, AdmissionGate, AdmissionGates
from service.errors import QueueFull, RequestTimeout
from tests.polling import until


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=10))


def test_up_to_the_limit_enter_at_once_and_the_rest_wait_in_arrival_order() -> None:
    async def scenario() -> None:
        gate = AdmissionGate("model 'm'")
        for _ in range(2):
            await gate.enter(limit=2, room=10)
        order: list[int] = []

        async def wait(i: int) -> None:
            await gate.enter(limit=2, room=10)
            order.append(i)

        waiters = [asyncio.create_task(wait(i)) for i in range(4)]
        await until(lambda: gate.waiting == 4)
        assert (gate.admitted, order) == (2, [])
        gate.leave()
        await until(lambda: order == [0])
        gate.leave()
        gate.leave()
        await until(lambda: order == [0, 1, 2])
        assert (gate.admitted, gate.waiting) == (2, 1)  # slots passed on, never over the limit
        for _ in range(3):  # six entered, six left
            gate.leave()
        await asyncio.gather(*waiters)
        assert order == [0, 1, 2, 3] and (gate.admitted, gate.waiting) == (0, 0)

    run(scenario)


def test_a_request_past_the_room_is_refused_at_once_with_retry_after() -> None:
    async def scenario() -> None:
        gate = AdmissionGate("model 'm'")
        await gate.enter(limit=1, room=3)
        waiters = [asyncio.create_task(gate.enter(limit=1, room=3)) for _ in range(2)]
        await until(lambda: gate.waiting == 2)
        with pytest.raises(QueueFull) as refused:
            await gate.enter(limit=1, room=3)
        assert refused.value.headers == {"Retry-After": "1"}
        assert "1 requests are in progress and 2 waiting" in refused.value.message
        assert "max_queue_size 3" in refused.value.message
        assert (gate.admitted, gate.waiting) == (1, 2)  # the refusal took nothing
        for _ in range(3):
            gate.leave()
        await asyncio.gather(*waiters)
        assert (gate.admitted, gate.waiting) == (0, 0)

    run(scenario)


def test_a_request_that_times_out_in_line_leaves_it_and_never_takes_a_slot() -> None:
    async def scenario() -> None:
        gate = AdmissionGate("model 'm'")
        await gate.enter(limit=1, room=5)
        late = asyncio.create_task(gate.enter(limit=1, room=5, timeout_s=0.01))
        after = asyncio.create_task(gate.enter(limit=1, room=5))
        with pytest.raises(RequestTimeout, match="while it waited in line"):
            await late
        assert (gate.admitted, gate.waiting) == (1, 1)
        gate.leave()  # the slot skips the expired request and goes to the next one
        await after
        assert (gate.admitted, gate.waiting) == (1, 0)

    run(scenario)


def test_a_cancelled_waiter_gives_back_a_slot_it_was_just_handed() -> None:
    async def scenario() -> None:
        gate = AdmissionGate("model 'm'")
        await gate.enter(limit=1, room=5)
        first = asyncio.create_task(gate.enter(limit=1, room=5))
        second = asyncio.create_task(gate.enter(limit=1, room=5))
        await until(lambda: gate.waiting == 2)
        gate.leave()  # hands the slot to ``first`` ...
        first.cancel()  # ... which is cancelled before it runs: the slot goes on to ``second``
        with pytest.raises(asyncio.CancelledError):
            await first
        await second
        assert (gate.admitted, gate.waiting) == (1, 0)
        third = asyncio.create_task(gate.enter(limit=1, room=5))
        await until(lambda: gate.waiting == 1)
        third.cancel()  # cancelled while waiting: it leaves the line
        with pytest.raises(asyncio.CancelledError):
            await third
        assert (gate.admitted, gate.waiting) == (1, 0)
        gate.leave()
        assert gate.admitted == 0

    run(scenario)


def test_one_gate_per_model_whose_gauge_counts_the_line() -> None:
    registry = CollectorRegistry()
    gates = AdmissionGates(Gauge("waiting", "line", ["model"], registry=registry))
    assert gates("a") is gates("a") and gates("a") is not gates("b")

    def waiting(model: str) -> float | None:
        return registry.get_sample_value("waiting", {"model": model})

    async def scenario() -> None:
        gate = gates("a")
        await gate.enter(limit=1, room=5)
        waiters = [asyncio.create_task(gate.enter(limit=1, room=5)) for _ in range(3)]
        await until(lambda: gate.waiting == 3)
        assert (waiting("a"), waiting("b")) == (3.0, 0.0)
        for _ in range(3):
            gate.leave()
        await asyncio.gather(*waiters)
        assert waiting("a") == 0.0

    run(scenario)


def test_a_refusal_storm_is_paced_until_it_is_over() -> None:
    """Refusals that outnumber answers STORM_RATIO to one over a second (clients that send
    again at once) are held for their Retry-After while the storm lasts; refusals of an
    ordinary overload, beside answers, go out at once. The seconds are the gate's own
    counting windows, moved on by hand (the clock is what is tested)."""
    gate = AdmissionGate("model 'm'")

    def next_second() -> None:
        gate._second -= 1.0  # the current window is a second old: the next call rolls it

    # An overload: 150 refusals beside 20 answers (7.5 to one) is no storm.
    assert gate.refusal_hold_s() == 0.0  # the first window begins
    for _ in range(20):
        gate.leave()
        gate.admitted += 1  # (each leave gives a slot back: keep the books straight)
    assert [gate.refusal_hold_s() for _ in range(149)] == [0.0] * 149
    next_second()
    assert gate.refusal_hold_s() == 0.0
    # A storm: 150 refusals, no answer; the next second's refusals are held.
    for _ in range(149):
        gate.refusal_hold_s()
    next_second()
    assert gate.refusal_hold_s() == HOLD_S
    # Held, they come slower, under the ratio, yet the storm lasts while they keep coming.
    for _ in range(STORM_MIN):
        gate.refusal_hold_s()
    for _ in range(50):
        gate.leave()
        gate.admitted += 1
    next_second()
    assert gate.refusal_hold_s() == HOLD_S
    # A second with fewer than STORM_MIN refusals ends it.
    for _ in range(STORM_MIN - 10):
        gate.refusal_hold_s()
    next_second()
    assert gate.refusal_hold_s() == 0.0
