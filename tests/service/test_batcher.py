"""The dynamic batcher in process, with a runner whose calls the test finishes.

No model and no server: :class:`GatedRunner` records each call's feeds and blocks
it until the test releases it, so the test decides when a batch finishes and what
queues meanwhile (the way MLServer's ``tests/batching/test_adaptive.py`` drives its
adaptive batcher). Events are ordered by the batcher's own state (``depth``), by the
runner's calls and by awaiting the requests, never by sleeping.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
from polling import until

from service.batching import DynamicBatcher
from service.errors import BadRequest, ClientDisconnected, ModelNotReady, RequestTimeout
from service.metrics import ServiceMetrics
from service.model_config import BatchingConfig

Feeds = dict[str, np.ndarray]
LABELS = {"model": "m", "version": "1"}
RELEASE_WAIT_S = 10.0  # a call never released fails the test instead of hanging it


class GatedRunner:
    """An ONNX Runtime stand-in: ``double`` = 2x, ``sum`` = a + b, ``call`` = the call's
    number (0, 1, ...) on every row. Each call blocks until :meth:`release`; call
    ``fail[i]`` raises instead of answering."""

    def __init__(self, fail: Mapping[int, Exception] | None = None) -> None:
        self.calls: list[Feeds] = []
        self.started: list[float] = []  # perf_counter at each call's start
        self.fail = dict(fail or {})
        self._entered = threading.Semaphore(0)
        self._released = threading.Semaphore(0)

    def __call__(self, feeds: Feeds, names: list[str]) -> Feeds:
        number = len(self.calls)
        self.calls.append(feeds)
        self.started.append(time.perf_counter())
        self._entered.release()
        assert self._released.acquire(timeout=RELEASE_WAIT_S), "the test never released call"
        if number in self.fail:
            raise self.fail[number]
        first = next(iter(feeds.values()))
        outputs = {
            "double": feeds.get("x", first) * 2,
            "call": np.full(len(first), number, dtype=np.int64),
        }
        if "a" in feeds:
            outputs["sum"] = feeds["a"] + feeds["b"]
        return {n: outputs[n] for n in names}

    def release(self, calls: int = 1) -> None:
        for _ in range(calls):
            self._released.release()

    async def entered(self) -> None:
        """Wait until the next call has started (it then blocks until released)."""
        got = await asyncio.to_thread(self._entered.acquire, True, RELEASE_WAIT_S)
        assert got, "the batcher never called the runner"

    def rows(self) -> list[int]:
        return [len(next(iter(f.values()))) for f in self.calls]


def make_batcher(
    runner: Callable[[Feeds, list[str]], Feeds],
    *,
    max_batch_size: int = 4,
    max_queue_delay_us: int = 0,
    enabled: bool = True,
    batchable: bool = True,
) -> tuple[DynamicBatcher, ServiceMetrics]:
    metrics = ServiceMetrics()
    config = BatchingConfig(enabled, max_batch_size, max_queue_delay_us, max_queue_size=100)
    batcher = DynamicBatcher(
        "model 'm' version 1", runner, batchable, config, metrics.batcher("m", "1")
    )
    return batcher, metrics


def sample(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, {**LABELS, **labels})
    return 0.0 if found is None else found


def rows_of(n: int, start: float) -> np.ndarray:
    """``n`` rows of 3 features, each value distinct across requests (start, start+1, ...)."""
    return np.arange(start, start + 3 * n, dtype=np.float32).reshape(n, 3)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


async def occupy(batcher: DynamicBatcher, runner: GatedRunner) -> asyncio.Task[Feeds]:
    """A first request whose call is running (blocked in the runner): the next ones queue."""
    task = asyncio.create_task(batcher.run({"x": rows_of(1, -100)}, ["double", "call"]))
    await runner.entered()
    return task


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
        with pytest.raises(RequestTimeout) as err:
            await batcher.run({"x": rows_of(1, 0)}, ["double"], timeout_s=0.05)
        assert str(err.value) == (
            "model 'm' version 1: no result within the timeout of 50 ms (timed out in the queue)"
        )
        assert batcher.depth == 0
        runner.release(1)
        await first
        assert runner.rows() == [1]  # only the first request ever ran
        assert sample(metrics, "foldserve_requests_dropped_total", reason="timeout") == 1
        assert sample(metrics, "foldserve_queue_depth") == 0

    run(scenario)


def test_time_already_waited_counts_against_the_timeout() -> None:
    """``waited_s`` >= ``timeout_s``: nothing is left, the request expires at once."""

    async def scenario() -> None:
        runner = GatedRunner()
        batcher, metrics = make_batcher(runner)
        first = await occupy(batcher, runner)
        with pytest.raises(RequestTimeout, match="timeout of 30000 ms"):
            await batcher.run({"x": rows_of(1, 0)}, ["double"], timeout_s=30.0, waited_s=30.0)
        runner.release(1)
        await first
        assert runner.rows() == [1]
        assert sample(metrics, "foldserve_requests_dropped_total", reason="timeout") == 1

    run(scenario)


def test_a_request_that_times_out_while_running_gets_504_and_its_rows_are_dropped() -> None:
    async def scenario() -> None:
        runner = GatedRunner()
        batcher, metrics = make_batcher(runner)
        late = asyncio.create_task(
            batcher.run({"x": rows_of(1, 0)}, ["double"], timeout_s=30.0, waited_s=29.95)
        )
        await runner.entered()  # it runs, blocked, until its 50 ms are up
        with pytest.raises(RequestTimeout, match=r"\(timed out while running\)"):
            await late
        runner.release(1)
        x = rows_of(1, 7)
        runner.release(1)
        answer = await batcher.run({"x": x}, ["double"])  # the model is free again
        np.testing.assert_array_equal(answer["double"], x * 2)
        assert runner.rows() == [1, 1]
        # It was no longer queued: not counted as dropped (it ran).
        assert sample(metrics, "foldserve_requests_dropped_total", reason="timeout") == 0

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
        assert sample(metrics, "foldserve_requests_dropped_total", reason="disconnect") == 1

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
        dropped = [
            sample(metrics, "foldserve_requests_dropped_total", reason=r)
            for r in ("queue_full", "timeout", "disconnect")
        ]
        assert dropped == [0, 0, 0]  # a cancelled handler is not a drop of the batcher's

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
