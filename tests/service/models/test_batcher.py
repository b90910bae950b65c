"""The dynamic batcher in process (tests/service/models/gated_runner.py): which requests share
a call, how each gets its own rows back, and how long a partial batch waits for company."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from tests.polling import until
from tests.service.models.gated_runner import (
    Feeds,
    GatedRunner,
    make_batcher,
    occupy,
    rows_of,
    run,
    sample,
)

# -- coalescing and splitting ---------------------------------------------------------


def test_queued_requests_coalesce_up_to_max_batch_size_and_get_their_own_rows() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher, metrics = make_batcher(runner, max_batch_size=4)
        first = await occupy(batcher, runner)
        sizes = [1, 2, 1, 3, 1]  # 1+2+1 fill a batch of 4; 3 does not fit beside them
        inputs = [rows_of(n, 100 * i) for i, n in enumerate(sizes)]
        tasks = [asyncio.create_task(batcher.run({"x": x}, ["double", "call"])) for x in inputs]
        await until(lambda: batcher.depth == len(sizes))
        runner.release(3)
        answers = await asyncio.gather(first, *tasks)
        assert runner.rows() == [1, 4, 4]  # [first], [1, 2, 1], [3, 1]: queue order kept
        expected_call = [0, 1, 1, 1, 2, 2]
        for x, answer, call in zip(
            [rows_of(1, -100), *inputs], answers, expected_call, strict=True
        ):
            np.testing.assert_array_equal(answer["double"], x * 2)
            np.testing.assert_array_equal(answer["call"], np.full(len(x), call))
        assert sample(metrics, "foldserve_batch_requests_sum") == 6
        assert sample(metrics, "foldserve_batch_requests_count") == 3
        assert sample(metrics, "foldserve_batch_size_sum") == 9
        assert sample(metrics, "foldserve_queue_wait_seconds_count") == 6
        assert sample(metrics, "foldserve_queue_depth") == 0

    run(scenario)


def test_a_request_over_max_batch_size_runs_alone_and_whole() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher, _ = make_batcher(runner, max_batch_size=4)
        first = await occupy(batcher, runner)
        big, small = rows_of(6, 0), rows_of(1, 50)
        tasks = [asyncio.create_task(batcher.run({"x": x}, ["double"])) for x in (big, small)]
        await until(lambda: batcher.depth == 2)
        runner.release(3)
        _, got_big, got_small = await asyncio.gather(first, *tasks)
        assert runner.rows() == [1, 6, 1]
        np.testing.assert_array_equal(got_big["double"], big * 2)
        np.testing.assert_array_equal(got_small["double"], small * 2)

    run(scenario)


@pytest.mark.parametrize(
    ("other_feeds", "other_names"),
    [
        ({"x": np.zeros((1, 5), np.float32)}, ["double", "call"]),  # another sample shape
        ({"x": np.zeros((1, 3), np.float64)}, ["double", "call"]),  # another datatype
        ({"x": np.zeros((1, 3), np.float32)}, ["call"]),  # other outputs asked for
    ],
    ids=["shape", "dtype", "outputs"],
)
def test_requests_of_another_signature_never_share_a_call(
    other_feeds: Feeds, other_names: list[str]
) -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher, _ = make_batcher(runner, max_batch_size=8)
        first = await occupy(batcher, runner)
        same = [rows_of(1, 10), rows_of(1, 20)]
        tasks = [
            asyncio.create_task(batcher.run({"x": same[0]}, ["double", "call"])),
            asyncio.create_task(batcher.run(other_feeds, other_names)),
            asyncio.create_task(batcher.run({"x": same[1]}, ["double", "call"])),
        ]
        await until(lambda: batcher.depth == 3)
        runner.release(3)
        _, a, other, b = await asyncio.gather(first, *tasks)
        assert runner.rows() == [1, 2, 1]  # the two alike share call 1; the other waits
        assert a["call"].tolist() == b["call"].tolist() == [1]
        assert other["call"].tolist() == [2]
        assert sorted(other) == sorted(other_names)

    run(scenario)


def test_requests_with_several_inputs_are_concatenated_input_by_input() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher, _ = make_batcher(runner, max_batch_size=8)
        first = await occupy(batcher, runner)
        pairs = [(rows_of(2, 0), rows_of(2, 1000)), (rows_of(3, 100), rows_of(3, 2000))]
        tasks = [
            asyncio.create_task(batcher.run({"a": a, "b": b}, ["sum", "call"])) for a, b in pairs
        ]
        await until(lambda: batcher.depth == 2)
        runner.release(2)
        _, *answers = await asyncio.gather(first, *tasks)
        assert runner.rows() == [1, 5]
        for (a, b), answer in zip(pairs, answers, strict=True):
            np.testing.assert_array_equal(answer["sum"], a + b)
            assert answer["call"].tolist() == [1] * len(a)

    run(scenario)


@pytest.mark.parametrize(
    ("enabled", "batchable"), [(False, True), (True, False)], ids=["off", "no batch axis"]
)
def test_without_batching_each_request_is_its_own_call(enabled: bool, batchable: bool) -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher, _ = make_batcher(runner, enabled=enabled, batchable=batchable)
        first = await occupy(batcher, runner)
        inputs = [rows_of(1, 10 * i) for i in range(3)]
        tasks = [asyncio.create_task(batcher.run({"x": x}, ["double", "call"])) for x in inputs]
        await until(lambda: batcher.depth == 3)
        runner.release(4)
        _, *answers = await asyncio.gather(first, *tasks)
        assert runner.rows() == [1, 1, 1, 1]
        assert [a["call"].tolist() for a in answers] == [[1], [2], [3]]

    run(scenario)


# -- max_queue_delay --------------------------------------------------------------------


def test_an_idle_model_holds_a_partial_batch_until_it_fills() -> None:
    """With a delay far longer than the test, the call comes when the batch is full."""

    async def scenario() -> None:
        runner = GatedRunner()
        batcher, metrics = make_batcher(runner, max_batch_size=4, max_queue_delay_us=60_000_000)
        runner.release(1)
        inputs = [rows_of(1, 10 * i) for i in range(4)]
        tasks = [asyncio.create_task(batcher.run({"x": inputs[0]}, ["double", "call"]))]
        await until(lambda: batcher._wakeup is not None)  # the dispatcher holds the batch
        assert runner.calls == []
        assert sample(metrics, "foldserve_queue_depth") == 1
        tasks += [
            asyncio.create_task(batcher.run({"x": x}, ["double", "call"])) for x in inputs[1:]
        ]
        answers = await asyncio.gather(*tasks)
        assert runner.rows() == [4]
        for x, answer in zip(inputs, answers, strict=True):
            np.testing.assert_array_equal(answer["double"], x * 2)
        assert sample(metrics, "foldserve_queue_depth") == 0

    run(scenario)


@pytest.mark.parametrize("delay_us", [0, 30_000])
def test_a_partial_batch_runs_once_max_queue_delay_has_passed(delay_us: int) -> None:
    """The call starts no sooner than the delay after the request came (0: at once)."""

    async def scenario() -> None:
        runner = GatedRunner()
        batcher, metrics = make_batcher(runner, max_batch_size=4, max_queue_delay_us=delay_us)
        runner.release(1)
        x = rows_of(2, 0)
        sent = time.perf_counter()
        answer = await batcher.run({"x": x}, ["double"])
        np.testing.assert_array_equal(answer["double"], x * 2)
        assert runner.rows() == [2]
        assert runner.started[0] - sent >= delay_us / 1e6
        assert sample(metrics, "foldserve_queue_wait_seconds_sum") >= delay_us / 1e6

    run(scenario)
