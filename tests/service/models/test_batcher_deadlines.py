"""The batcher against deadlines (tests/service/models/gated_runner.py): the wait it predicts
for a new request, the refusal at the entry that prediction makes, a request predicted
to end past its deadline answered without running, a batch cut to what its oldest
request's deadline allows, and the rule that holds a partial batch for company.

The model's run times are set, not measured: :func:`set_run_times` gives the batcher its
measurements and keeps them (the gated calls of a test take as long as the test holds
them, which says nothing about the model).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.dataplane.admission import AdmissionGate
from service.dataplane.plane import _check_reachable
from service.errors import DeadlineUnreachable, RequestTimeout
from service.models.batcher import DynamicBatcher
from tests.polling import next_turn, until, until_clock
from tests.service.models.gated_runner import (
    GatedRunner,
    make_batcher,
    occupy,
    rows_of,
    run,
    sample,
)


def set_run_times(batcher: DynamicBatcher, seconds: dict[int, float]) -> None:
    """The model's calls take ``seconds[rows]``, as if measured; later calls change nothing."""
    for rows, taken in seconds.items():
        batcher.run_times.observe(rows, taken)
    batcher.run_times.observe = lambda rows, seconds: None  # type: ignore[method-assign]


def test_the_wait_predicted_for_a_new_request_is_the_batches_ahead_of_it() -> None:
    runner = GatedRunner()
    batcher, _ = make_batcher(runner, max_batch_size=4)
    assert batcher.predicted_wait(10) is None  # nothing measured: nothing refused on a guess
    set_run_times(batcher, {1: 0.004, 4: 0.01})
    assert batcher.predicted_wait(0) == 0.004  # alone: one call of one row
    assert batcher.predicted_wait(7) == pytest.approx(0.02)  # 8 rows: two full batches
    assert batcher.predicted_wait(8) == pytest.approx(0.03)  # the ninth starts a third


def ahead(requests: int) -> AdmissionGate:
    """An entry with ``requests`` admitted, and no pace measured yet."""
    gate = AdmissionGate("model 'm'")
    gate.admitted = requests
    return gate


def test_the_entry_refuses_a_request_the_work_ahead_would_make_late() -> None:
    batcher, _ = make_batcher(GatedRunner(), max_batch_size=4)
    _check_reachable(batcher, ahead(100), 0.001)  # nothing measured: nothing refused
    set_run_times(batcher, {4: 0.01})
    _check_reachable(batcher, ahead(0), 0.001)  # nothing ahead: it goes on, however slow
    _check_reachable(batcher, ahead(7), 0.025)  # two batches, 20 ms: within 25 ms
    with pytest.raises(DeadlineUnreachable) as refused:
        _check_reachable(batcher, ahead(8), 0.025)  # a third batch: 30 ms
    assert refused.value.status_code == 503 and refused.value.headers == {"Retry-After": "1"}
    assert refused.value.message == (
        "model 'm' version 1 cannot answer within 25 ms: 8 requests ahead in this worker "
        "need about 30 ms; retry later"
    )


def test_the_entry_s_measured_pace_counts_where_the_model_s_run_times_do_not() -> None:
    """When the event loop, not the model, is the bottleneck, the batches' run times say
    little: the pace the entry measured (busy time per answer) says what each request
    ahead costs."""

    async def scenario() -> None:
        batcher, _ = make_batcher(GatedRunner(), max_batch_size=32)
        set_run_times(batcher, {32: 0.001})  # the model: 1 ms for a full batch
        gate = AdmissionGate("model 'm'")
        assert gate.pace_s() is None
        for _ in range(10):
            await gate.enter(limit=100, room=100)
        started = time.perf_counter()
        await until_clock(started + 0.02)  # 20 ms busy ...
        for _ in range(10):
            gate.leave()  # ... for 10 answers: at least 2 ms each
        pace = gate.pace_s()
        assert pace is not None and pace >= 0.002 * 0.9  # decayed weights: about 2 ms
        for _ in range(9):
            await gate.enter(limit=100, room=100)
        _check_reachable(batcher, gate, 1.0)  # 9 ahead, ~20 ms: well within a second
        with pytest.raises(DeadlineUnreachable):
            _check_reachable(batcher, gate, 0.015)  # the model alone would take 1 ms

    run(scenario)


def test_a_request_predicted_to_end_past_its_deadline_is_answered_without_running() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher, metrics = make_batcher(runner)
        set_run_times(batcher, {1: 0.05})
        first = await occupy(batcher, runner)
        deadline = time.perf_counter() + 0.08  # alone, it would make it: 50 ms of 80
        late = asyncio.create_task(batcher.run({"x": rows_of(1, 0)}, ["double"], deadline=deadline))
        await until(lambda: batcher.depth == 1)
        await until_clock(deadline - 0.05)  # now it would not
        runner.release(1)
        await first
        with pytest.raises(RequestTimeout) as err:
            await late
        assert err.value.message.startswith(
            "Request timeout expired: model 'm' version 1: it would end 50 ms from now"
        )
        assert time.perf_counter() < deadline or batcher.depth == 0  # answered, not left
        assert runner.rows() == [1]  # it never ran
        assert sample(metrics, "foldserve_requests_dropped_total", reason="expired") == 1

    run(scenario)


def test_a_batch_is_cut_to_what_its_oldest_request_s_deadline_allows() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher, metrics = make_batcher(runner, max_batch_size=8)
        set_run_times(batcher, {1: 0.01, 8: 0.08})  # 10 ms a row
        first = await occupy(batcher, runner)
        deadline = time.perf_counter() + 0.045  # room for at most 4 rows
        urgent = asyncio.create_task(
            batcher.run({"x": rows_of(1, 0)}, ["double"], deadline=deadline)
        )
        others = [
            asyncio.create_task(batcher.run({"x": rows_of(1, 10 * i)}, ["double"]))
            for i in range(1, 8)
        ]
        await until(lambda: batcher.depth == 8)
        runner.release(3)
        await first
        answer = await urgent
        np.testing.assert_array_equal(answer["double"], rows_of(1, 0) * 2)
        for i, task in enumerate(others, start=1):
            np.testing.assert_array_equal((await task)["double"], rows_of(1, 10 * i) * 2)
        cut, rest = runner.rows()[1], runner.rows()[2:]
        assert 1 <= cut <= 4 and sum(rest) == 8 - cut  # cut first, the rest after it
        assert sample(metrics, "foldserve_requests_dropped_total", reason="expired") == 0

    run(scenario)


def test_a_later_request_with_an_earlier_deadline_waits_for_the_next_batch() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher, _ = make_batcher(runner, max_batch_size=4)
        set_run_times(batcher, {1: 0.001, 4: 0.002})
        first = await occupy(batcher, runner)
        far = time.perf_counter() + 30.0
        head = asyncio.create_task(batcher.run({"x": rows_of(1, 0)}, ["double"], deadline=far))
        # Its deadline passed already: the batch it would join ends later still.
        tight = asyncio.create_task(
            batcher.run({"x": rows_of(1, 10)}, ["double"], deadline=time.perf_counter() - 1)
        )
        await until(lambda: tight.done())  # its timer fires: answered at once
        with pytest.raises(RequestTimeout):
            await tight
        runner.release(2)
        await first
        await head
        assert runner.rows() == [1, 1]

    run(scenario)


def test_a_partial_batch_is_not_held_when_the_next_request_is_not_worth_waiting_for() -> None:
    """Requests a second apart, a call's fixed cost 1 ms: holding would cost more than it
    saves, so a lone request runs at once even with a 10 s hold allowed."""

    async def scenario() -> None:
        runner = GatedRunner()
        batcher, _ = make_batcher(runner, max_batch_size=8, max_queue_delay_us=10_000_000)
        set_run_times(batcher, {1: 0.0015, 8: 0.0050})  # b = 1 ms, a = 0.5 ms
        batcher.arrival_gap_s = 1.0
        start = time.perf_counter()
        task = asyncio.create_task(
            batcher.run({"x": rows_of(1, 0)}, ["double"], deadline=start + 20.0)
        )
        await runner.entered()
        assert time.perf_counter() - start < 5.0  # not held for the 10 s allowed
        runner.release(1)
        await task

    run(scenario)


def test_a_held_batch_is_released_in_time_for_its_oldest_deadline() -> None:
    """Requests coming faster than a call's fixed cost: worth holding for, but only until
    the deadline leaves just the time a full batch takes."""

    async def scenario() -> None:
        runner = GatedRunner()
        batcher, metrics = make_batcher(runner, max_batch_size=8, max_queue_delay_us=10_000_000)
        set_run_times(batcher, {1: 0.1, 8: 0.2})  # b = 86 ms: worth a wait
        batcher.arrival_gap_s = 1e-6
        start = time.perf_counter()
        x = rows_of(1, 0)
        task = asyncio.create_task(batcher.run({"x": x}, ["double"], deadline=start + 0.5))
        await runner.entered()
        assert time.perf_counter() - start >= 0.3  # held until 0.5 s less a full batch
        runner.release(1)
        np.testing.assert_array_equal((await task)["double"], x * 2)  # answered, not expired
        assert sample(metrics, "foldserve_requests_dropped_total", reason="expired") == 0

    run(scenario)


def test_after_a_late_request_leaves_the_next_oldest_is_held_as_any_other() -> None:
    """A request held for company that expires takes only itself out: the request now
    oldest is held for its own ``max_queue_delay_us``, not run at once in its stead."""

    async def scenario() -> None:
        runner = GatedRunner()
        batcher, metrics = make_batcher(runner, max_batch_size=8, max_queue_delay_us=10_000_000)
        start = time.perf_counter()
        first = asyncio.create_task(
            batcher.run({"x": rows_of(1, 0)}, ["double"], deadline=start + 0.05)
        )
        held = asyncio.create_task(
            batcher.run({"x": rows_of(1, 10)}, ["double"], deadline=start + 20.0)
        )
        with pytest.raises(RequestTimeout):
            await first
        await next_turn(10)
        assert runner.rows() == [] and batcher.depth == 1  # still held, not run
        company = [
            asyncio.create_task(batcher.run({"x": rows_of(1, 10 * i)}, ["double"]))
            for i in range(2, 9)
        ]
        await runner.entered()  # a full batch of 8 ends the hold
        runner.release(1)
        for i, task in enumerate([held, *company], start=1):
            np.testing.assert_array_equal((await task)["double"], rows_of(1, 10 * i) * 2)
        assert runner.rows() == [8]
        assert sample(metrics, "foldserve_requests_dropped_total", reason="expired") == 1

    run(scenario)
