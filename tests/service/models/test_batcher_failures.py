"""The dynamic batcher in process (tests/service/models/gated_runner.py) when things go wrong: a
failing call, a request the model rejects, timeouts, disconnects, cancellation and close."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from service.errors import BadRequest, ClientDisconnected, ModelNotReady, RequestTimeout
from tests.polling import next_turn, until, until_clock
from tests.service.models.gated_runner import (
    Feeds,
    GatedRunner,
    make_batcher,
    occupy,
    rows_of,
    run,
    sample,
)

# -- failures ---------------------------------------------------------------------------


def test_a_failing_call_fails_exactly_the_requests_of_its_batch() -> None:
    async def scenario() -> None:
        runner = GatedRunner(fail={1: RuntimeError("the GPU fell over")})
        batcher, _ = make_batcher(runner, max_batch_size=2)
        first = await occupy(batcher, runner)
        inputs = [rows_of(1, 10 * i) for i in range(4)]  # calls 1 (fails) and 2 (answers)
        tasks = [asyncio.create_task(batcher.run({"x": x}, ["double", "call"])) for x in inputs]
        await until(lambda: batcher.depth == 4)
        runner.release(3)
        results = await asyncio.gather(first, *tasks, return_exceptions=True)
        assert runner.rows() == [1, 2, 2]
        assert isinstance(results[0], dict) and results[0]["call"].tolist() == [0]
        for failed in results[1:3]:
            assert isinstance(failed, RuntimeError) and str(failed) == "the GPU fell over"
        for x, answer in zip(inputs[2:], results[3:], strict=True):
            assert isinstance(answer, dict)
            np.testing.assert_array_equal(answer["double"], x * 2)
            assert answer["call"].tolist() == [2]

    run(scenario)


def test_a_batch_the_model_rejects_is_rerun_alone_so_only_the_bad_request_fails() -> None:
    async def scenario() -> None:
        class Picky(GatedRunner):
            def __call__(self, feeds: Feeds, names: list[str]) -> Feeds:
                answer = super().__call__(feeds, names)
                if (feeds["x"] < 0).any():
                    raise InvalidArgument("negative input\nstack trace the client needs not")
                return answer

        runner = Picky()
        batcher, _ = make_batcher(runner, max_batch_size=4)
        first = await occupy(batcher, runner)  # its rows are negative: it fails alone
        good, bad = rows_of(1, 5), rows_of(1, -5)
        tasks = [asyncio.create_task(batcher.run({"x": x}, ["double"])) for x in (good, bad)]
        await until(lambda: batcher.depth == 2)
        runner.release(4)  # the batch of two, then each alone
        results = await asyncio.gather(first, *tasks, return_exceptions=True)
        assert runner.rows() == [1, 2, 1, 1]
        for failed in (results[0], results[2]):
            assert isinstance(failed, BadRequest)
            assert failed.message == "the model rejected the inputs: negative input"
        assert isinstance(results[1], dict)
        np.testing.assert_array_equal(results[1]["double"], good * 2)

    run(scenario)


# -- timeouts, disconnects, cancellation -------------------------------------------------


def test_a_request_that_times_out_in_the_queue_never_runs() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher, metrics = make_batcher(runner)
        first = await occupy(batcher, runner)
        deadline = time.perf_counter() + 0.05
        with pytest.raises(RequestTimeout) as err:
            await batcher.run({"x": rows_of(1, 0)}, ["double"], deadline=deadline)
        assert time.perf_counter() >= deadline  # answered at its deadline, not before
        assert str(err.value).startswith(
            "Request timeout expired: model 'm' version 1: its deadline passed after "
        )
        assert err.value.status_code == 503  # Triton's UNAVAILABLE
        assert batcher.depth == 0
        runner.release(1)
        await first
        assert runner.rows() == [1]  # only the first request ever ran
        assert sample(metrics, "foldserve_requests_dropped_total", reason="expired") == 1
        assert sample(metrics, "foldserve_queue_depth") == 0

    run(scenario)


def test_a_deadline_already_past_expires_at_once() -> None:
    """Time spent before the batcher (in line, decoding) counts: nothing is left."""

    async def scenario() -> None:
        runner = GatedRunner()
        batcher, metrics = make_batcher(runner)
        first = await occupy(batcher, runner)
        with pytest.raises(RequestTimeout, match="Request timeout expired"):
            await batcher.run({"x": rows_of(1, 0)}, ["double"], deadline=time.perf_counter())
        runner.release(1)
        await first
        assert runner.rows() == [1]
        assert sample(metrics, "foldserve_requests_dropped_total", reason="expired") == 1

    run(scenario)


def test_a_request_whose_deadline_passes_while_it_runs_gets_its_answer() -> None:
    """As in Triton, the deadline bounds the wait: once computed, the answer is sent."""

    async def scenario() -> None:
        runner = GatedRunner()
        batcher, metrics = make_batcher(runner)
        deadline = time.perf_counter() + 0.02
        x = rows_of(1, 7)
        late = asyncio.create_task(batcher.run({"x": x}, ["double"], deadline=deadline))
        await runner.entered()  # dispatched in time, then held in the model past its deadline
        await until_clock(deadline)
        await next_turn(2)  # a timer due at the deadline has had its turn
        runner.release(1)
        np.testing.assert_array_equal((await late)["double"], x * 2)
        assert runner.rows() == [1]
        assert sample(metrics, "foldserve_requests_dropped_total", reason="expired") == 0

    run(scenario)


def test_a_client_that_disconnects_while_queued_is_dropped_and_never_runs() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher, metrics = make_batcher(runner)
        first = await occupy(batcher, runner)
        gone = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        stays = asyncio.create_task(batcher.run({"x": rows_of(1, 3)}, ["double"]))
        leaves = asyncio.create_task(batcher.run({"x": rows_of(1, 0)}, ["double"], receive=receive))
        await until(lambda: batcher.depth == 2)
        gone.set()
        with pytest.raises(ClientDisconnected, match="the client disconnected"):
            await leaves
        assert batcher.depth == 1
        runner.release(2)
        await first
        np.testing.assert_array_equal((await stays)["double"], rows_of(1, 3) * 2)
        assert runner.rows() == [1, 1]  # the one that stayed ran alone
        assert sample(metrics, "foldserve_requests_dropped_total", reason="cancelled") == 1

    run(scenario)


def test_a_request_whose_handler_is_cancelled_leaves_the_queue() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher, metrics = make_batcher(runner)
        first = await occupy(batcher, runner)
        task = asyncio.create_task(batcher.run({"x": rows_of(1, 0)}, ["double"]))
        await until(lambda: batcher.depth == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert batcher.depth == 0
        runner.release(1)
        await first
        assert runner.rows() == [1]
        dropped = {
            r: sample(metrics, "foldserve_requests_dropped_total", reason=r)
            for r in ("queue_full", "rejected", "expired", "cancelled")
        }
        # A gRPC call the client cancels cancels its handler: dropped before compute.
        assert dropped == {"queue_full": 0, "rejected": 0, "expired": 0, "cancelled": 1}

    run(scenario)


# -- close ------------------------------------------------------------------------------


def test_close_refuses_new_requests_and_finishes_the_queued_ones() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher, _ = make_batcher(runner, max_batch_size=2)
        first = await occupy(batcher, runner)
        queued = [rows_of(1, 10), rows_of(1, 20)]
        tasks = [asyncio.create_task(batcher.run({"x": x}, ["double"])) for x in queued]
        await until(lambda: batcher.depth == 2)
        batcher.close()
        assert batcher.closed
        with pytest.raises(ModelNotReady) as err:
            await batcher.run({"x": rows_of(1, 0)}, ["double"])
        assert err.value.message == "model 'm' version 1 was unloaded or replaced; retry"
        assert err.value.headers == {"Retry-After": "0"}
        runner.release(2)
        _, *answers = await asyncio.gather(first, *tasks)
        assert runner.rows() == [1, 2]
        for x, answer in zip(queued, answers, strict=True):
            np.testing.assert_array_equal(answer["double"], x * 2)
        await until(lambda: batcher._dispatcher is None)
        assert batcher._runner._shutdown  # the worker thread ends with the drained batcher

    run(scenario)


def test_close_of_an_idle_batcher_ends_its_worker_thread_at_once() -> None:
    async def scenario() -> None:
        batcher, _ = make_batcher(GatedRunner())
        batcher.close()
        assert batcher._runner._shutdown
        with pytest.raises(ModelNotReady):
            await batcher.run({"x": rows_of(1, 0)}, ["double"])

    run(scenario)
