"""Batching whatever the transport: requests a few loop turns apart share a call (as grpc.aio
delivers its calls), a lone request is not held, and only calls measured to be tiny run on
the event loop, so the loop keeps answering (a health probe) while a slow model runs.

The models are stand-ins (tests/service/models/gated_runner.py, or a recording runner below
whose "work" is a fixed sleep inside the call, the model's compute, not a wait of the test).
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.models.batcher import GATHER_IDLE_TURNS
from service.models.run_times import RunTimes
from tests.polling import next_turn
from tests.service.models.gated_runner import Feeds, GatedRunner, make_batcher, rows_of, run

# The slow model's calls take this long: a probe of the loop that ever waited as long would
# have waited for one of them. The probe's bound is that call, not a few ms of wall time:
# on a loaded machine the OS alone can hold a test process for several ms.
SLOW_CALL_S = 0.1


class RecordingRunner:
    """A model that doubles its input, records the thread of each call, and takes
    ``seconds(rows)`` per call."""

    def __init__(self, seconds: dict[int, float] | None = None) -> None:
        self.seconds = seconds or {}
        self.threads: list[int] = []
        self.rows: list[int] = []

    def __call__(self, feeds: Feeds, names: list[str]) -> Feeds:
        x = feeds["x"]
        self.threads.append(threading.get_ident())
        self.rows.append(len(x))
        busy = max((s for r, s in self.seconds.items() if len(x) >= r), default=0.0)
        if busy:
            time.sleep(busy)  # the model's compute
        return {"double": x * 2}


def test_requests_a_few_loop_turns_apart_share_one_call() -> None:
    """grpc.aio hands the server its calls a turn or two apart: each used to find the model
    idle and run alone. Now they wait for each other while turns keep bringing more."""

    async def scenario() -> None:
        runner = GatedRunner()
        batcher, _ = make_batcher(runner, max_batch_size=8)

        async def arrive(i: int) -> Feeds:
            await next_turn(2 * i)  # request i arrives 2i loop turns after the first
            return await batcher.run({"x": rows_of(1, 10 * i)}, ["double"])

        tasks = [asyncio.create_task(arrive(i)) for i in range(4)]
        await runner.entered()
        runner.release()
        answers = await asyncio.gather(*tasks)
        assert runner.rows() == [4]  # one call for all four
        for i, answer in enumerate(answers):
            np.testing.assert_array_equal(answer["double"], rows_of(1, 10 * i) * 2)

    run(scenario)


def test_a_lone_request_waits_only_the_idle_turns() -> None:
    """Nothing else arrives: the call starts after GATHER_IDLE_TURNS turns with no arrival
    (and a turn or two of scheduling), not after any time bound."""

    async def scenario() -> None:
        runner = RecordingRunner()
        batcher, _ = make_batcher(runner)
        turns = 0
        started = asyncio.Event()

        async def count() -> None:
            nonlocal turns
            while not runner.rows:
                turns += 1
                await next_turn()
            started.set()

        counter = asyncio.create_task(count())
        answer = await batcher.run({"x": rows_of(1, 0)}, ["double"])
        await started.wait()
        await counter
        np.testing.assert_array_equal(answer["double"], rows_of(1, 0) * 2)
        assert runner.rows == [1]
        assert turns <= GATHER_IDLE_TURNS + 4, turns

    run(scenario)


def test_a_full_batch_stops_the_gathering_at_once() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher, _ = make_batcher(runner, max_batch_size=2)

        async def late() -> Feeds:
            await next_turn(2)
            return await batcher.run({"x": rows_of(1, 5)}, ["double"])

        first = asyncio.create_task(batcher.run({"x": rows_of(2, 0)}, ["double"]))
        second = asyncio.create_task(late())
        await runner.entered()  # the full first request did not wait for the second
        assert runner.rows() == [2]
        runner.release(2)
        await asyncio.gather(first, second)
        assert runner.rows() == [2, 1]

    run(scenario)


def test_a_fast_model_runs_on_the_loop_once_measured() -> None:
    async def scenario() -> None:
        runner = RecordingRunner()
        batcher, _ = make_batcher(runner, inline_limit_s=0.001)
        loop_thread = threading.get_ident()
        for i in range(3):
            answer = await batcher.run({"x": rows_of(1, i)}, ["double"])
            np.testing.assert_array_equal(answer["double"], rows_of(1, i) * 2)
        # The first call of a batch size never measured goes to the thread; then inline.
        assert runner.threads[0] != loop_thread
        assert runner.threads[1:] == [loop_thread, loop_thread]

    run(scenario)


def test_a_slow_model_never_runs_on_the_loop_and_a_probe_is_answered_meanwhile() -> None:
    """Batches of 1 are tiny (inline); batches of 2 or more take SLOW_CALL_S. A batch size
    never measured, or measured slow, runs in the thread, and one predicted from a larger
    measured batch too: the loop is never held past the probe's bound."""

    async def scenario() -> None:
        runner = RecordingRunner({2: SLOW_CALL_S})
        batcher, _ = make_batcher(runner, max_batch_size=8, inline_limit_s=0.001)
        loop_thread = threading.get_ident()
        lags: list[float] = []
        done = asyncio.Event()

        async def probe() -> None:  # what a health check needs: the loop, promptly
            while not done.is_set():
                asked = time.perf_counter()
                await next_turn()
                lags.append(time.perf_counter() - asked)

        prober = asyncio.create_task(probe())
        for i in range(3):  # measured tiny: runs inline from the second call on
            await batcher.run({"x": rows_of(1, i)}, ["double"])
        for size in (8, 8, 4):  # 8 never measured, then measured slow; 4 predicted from 8
            burst = [
                batcher.run({"x": rows_of(1, 100 * size + j)}, ["double"]) for j in range(size)
            ]
            await asyncio.gather(*burst)
        done.set()
        await prober
        slow = [t for t, rows in zip(runner.threads, runner.rows, strict=True) if rows >= 2]
        assert runner.rows[:3] == [1, 1, 1] and sorted(runner.rows[3:]) == [4, 8, 8]
        assert runner.threads[1:3] == [loop_thread, loop_thread]
        assert slow and loop_thread not in slow
        assert max(lags) < SLOW_CALL_S, max(lags)

    run(scenario)


def test_only_calls_measured_to_be_tiny_run_inline() -> None:
    times = RunTimes(inline_limit_s=0.001)
    assert times.predicted(1) is None and not times.inline(1)  # nothing measured: thread
    times.observe(8, 0.0004)
    assert times.inline(4)  # no larger than a batch of 8
    assert not times.inline(9)  # never measured that large: the thread
    times.observe(8, 0.01)  # a slow call pulls the estimate past the limit at once
    assert not times.inline(8) and not times.inline(2)
    times.observe(2, 0.0001)
    assert times.inline(2) and not times.inline(3)


def test_run_times_predict_any_batch_size_from_the_sizes_measured() -> None:
    times = RunTimes(inline_limit_s=0.0)
    times.observe(8, 0.004)
    assert times.predicted(1) == 0.004  # no faster than the smallest measured
    assert times.predicted(16) == 0.008  # one size: in proportion (no fixed cost known)
    assert times.fixed_cost() is None
    times.observe(2, 0.001)  # 0.5 ms per row, no fixed cost: 2 -> 1 ms, 8 -> 4 ms
    times.observe(4, 0.0025)  # a fixed cost appears: the line through the three
    a, b = times.line()
    assert a == pytest.approx(0.009 / (56 / 3)) and b == pytest.approx(0.00025)
    assert times.fixed_cost() == pytest.approx(b)
    assert times.predicted(3) == pytest.approx(0.00175)  # between 2 and 4
    assert times.predicted(6) == pytest.approx(0.00325)  # between 4 and 8
    assert times.predicted(12) == pytest.approx(0.004 + 4 * a)  # past 8: along the slope
    assert times.largest_within(0.0033, 32) == 6
    assert times.largest_within(0.0009, 32) == 0  # not even one row
    assert times.largest_within(1.0, 32) == 32
    assert RunTimes(0.0).largest_within(1.0, 32) is None  # nothing measured: no prediction
