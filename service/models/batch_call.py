"""One ONNX Runtime call for a batch of queued requests, and each request's rows of it.

The requests' inputs are concatenated along the batch axis, run as one call, and the
outputs split back by each request's rows. A batch the model rejects (a shape the graph
cannot take) runs again request by request, so only the request at fault gets the error.
Nothing here touches the event loop: the batcher calls it in its thread, or on the loop
for a call measured to be tiny (:mod:`service.models.run_times`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from service.errors import BadRequest

Outputs = dict[str, np.ndarray]
Feeds = dict[str, np.ndarray]
Runner = Callable[[Feeds, list[str]], Outputs]  # one ONNX Runtime call: feeds, output names


class Queued(Protocol):
    """A queued request as a call sees it."""

    @property
    def feeds(self) -> Feeds: ...
    @property
    def names(self) -> list[str]: ...  # outputs to compute
    @property
    def rows(self) -> int: ...  # samples on the batch axis


@dataclass(frozen=True, slots=True)
class BatchTimes:
    """Where a batch's time went: joining its requests' inputs, the ONNX Runtime call,
    and splitting the outputs back (each request is charged the whole of each)."""

    input_s: float
    infer_s: float
    output_s: float


def _run_one(run: Runner, feeds: Feeds, names: list[str]) -> Outputs:
    try:
        return run(feeds, names)
    except InvalidArgument as err:  # e.g. a shape the graph cannot take: the client's error
        raise BadRequest(f"the model rejected the inputs: {str(err).splitlines()[0]}") from err


def run_batch(
    run: Runner, batch: Sequence[Queued]
) -> tuple[list[Outputs | BaseException], BatchTimes]:
    """One call for the whole batch (in the batcher's thread, or inline); each request's rows,
    and where the time went.

    When a batch of several is rejected, each request runs alone so that only
    the request at fault gets the error.
    """
    head = batch[0]
    start = time.perf_counter()
    if len(batch) == 1:
        try:
            answer: Outputs | BaseException = _run_one(run, head.feeds, head.names)
        except Exception as err:
            answer = err
        return [answer], BatchTimes(0.0, time.perf_counter() - start, 0.0)
    feeds = {n: np.concatenate([p.feeds[n] for p in batch]) for n in head.feeds}  # (B, ...)
    joined = time.perf_counter()
    try:
        outputs = _run_one(run, feeds, head.names)
    except BadRequest:
        answers = [run_batch(run, [p])[0][0] for p in batch]
        return answers, BatchTimes(joined - start, time.perf_counter() - joined, 0.0)
    except Exception as err:
        return [err] * len(batch), BatchTimes(joined - start, time.perf_counter() - joined, 0.0)
    ran = time.perf_counter()
    answers = []
    offset = 0
    for p in batch:
        answers.append({n: array[offset : offset + p.rows] for n, array in outputs.items()})
        offset += p.rows
    return answers, BatchTimes(joined - start, ran - joined, time.perf_counter() - ran)
