"""A stand-in for ONNX Runtime whose calls the test finishes, and the dynamic batcher around
it, for the batcher's unit tests (test_batcher.py, test_batcher_failures.py,
test_batcher_gathering.py).

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

import numpy as np

from service.models.batcher import DynamicBatcher
from service.models.config import BatchingConfig
from service.observability.metrics import ServiceMetrics

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
    inline_limit_s: float = 0.0,
) -> tuple[DynamicBatcher, ServiceMetrics]:
    """A batcher around ``runner``; by default every call runs in the batcher's thread (a
    :class:`GatedRunner` call run on the event loop would block the test that releases it)."""
    metrics = ServiceMetrics()
    config = BatchingConfig(enabled, max_batch_size, max_queue_delay_us, max_queue_size=100)
    batcher = DynamicBatcher(
        "model 'm' version 1",
        runner,
        batchable,
        config,
        metrics.batcher("m", "1"),
        inline_limit_s=inline_limit_s,
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
