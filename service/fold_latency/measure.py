"""Folded-vs-unfolded latency on the live runtime: a loaded model in, a report out.

Both variants run on the same provider and thread settings (the sessions come
from the model's own :class:`SessionFactory`), on the same random inputs drawn
from the model's input spec, interleaved after warm-up: run ``i`` of the folded
and of the unfolded session are back to back, their order alternating each
round, so that machine noise hits both variants alike and the pair can be
resampled together (see :mod:`foldserve.latency_stats`).

:class:`service.fold_latency.lab.FoldLatencyLab` adds what the HTTP route needs
around one measurement: one at a time in the whole server, off the event loop,
the last report per model kept where every worker reads it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from foldserve.files import write_atomic
from foldserve.latency_stats import paired_speedup, summarize
from foldserve.model_format import TensorSpec
from foldserve.model_graph import batchnorm_nodes
from service.errors import NotMeasurable
from service.fold_latency.bn_graph import batchnorm_after_ort, batchnorm_inputs, batchnorm_share
from service.fold_latency.report import (
    FoldBound,
    FoldLatencyReport,
    Int8Speedup,
    SpeedupInterval,
    VariantLatency,
)
from service.fold_latency.words import RUNTIME_ONLY, describe_case, int8_verdict, verdict
from service.models.served_version import ServedVersion
from service.process.machine import machine_facts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyParams:
    """What to measure; ``max_seconds`` stops the timed loop early (``time_limited``)."""

    batch_size: int = 1
    iterations: int = 200
    warmup: int = 20
    isolate: bool = False
    seed: int = 0
    max_seconds: float = math.inf
    int8: bool = False  # also time model.int8.onnx, interleaved with the other two


class Progress:
    """The fraction of a measurement done, written by the measuring thread only; with a
    ``path``, also written there (at most every 0.2 s) for the other workers to read."""

    WRITE_EVERY_S = 0.2

    def __init__(self, path: Path | None = None, started: float | None = None) -> None:
        self.started = time.monotonic() if started is None else started  # system-wide clock
        self.fraction = 0.0
        self._path = path
        self._written = 0.0
        self._save()

    def advance(self, fraction: float) -> None:
        self.fraction = fraction
        if self._path is not None and time.monotonic() - self._written > self.WRITE_EVERY_S:
            self._save()

    def _save(self) -> None:
        if self._path is not None:
            self._written = time.monotonic()
            body = {"started": self.started, "fraction": self.fraction}
            write_atomic(self._path, json.dumps(body).encode())

    @classmethod
    def read(cls, path: Path) -> Progress | None:
        """The progress another worker last wrote; None when it cannot be read."""
        try:
            body = json.loads(path.read_bytes())
            progress = cls(started=float(body["started"]))
            progress.fraction = float(body["fraction"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return progress

    def seconds_left(self, limit: float) -> float:
        """A guess of the time left: from the pace so far, at most until ``limit`` seconds
        after the start (where timing stops)."""
        elapsed = time.monotonic() - self.started
        by_limit = max(0.0, limit - elapsed)
        if self.fraction <= 0.0:
            return by_limit
        return min(by_limit, elapsed * (1.0 - self.fraction) / self.fraction)


@dataclass(frozen=True)
class Timings:
    """Per-call wall times in seconds, pair ``i`` = run ``i`` of each variant."""

    folded_s: np.ndarray
    unfolded_s: np.ndarray
    max_abs_diff: float | None  # None: an output was NaN/inf in one variant
    seconds: float  # wall time of warm-up plus timed runs
    time_limited: bool
    int8_s: np.ndarray | None = None  # run i of the INT8 model, when timed
    int8_max_abs_diff: float | None = None  # INT8 against folded FP32 outputs


# -- inputs, graphs, machine ----------------------------------------------------


def random_feeds(
    specs: list[TensorSpec],
    batch_size: int,
    seed: int,
    reference_shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs for ``specs``: axis 0 is ``batch_size``; other dynamic axes (-1)
    take the size of the reference batch's input. Values: :meth:`TensorSpec.random`.

    Raises ``ValueError`` when a dynamic axis has no reference size, or axis 0 is fixed
    at another size than ``batch_size`` (a user's file exported for one batch size).
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        ref = (reference_shapes or {}).get(spec.name, ())
        dims = []
        for axis, size in enumerate(spec.shape):
            if axis == 0 and size not in (-1, batch_size):
                raise ValueError(f"input '{spec.name}' has a fixed batch axis of {size}")
            if axis == 0:
                dims.append(batch_size)
            elif size >= 0:
                dims.append(size)
            elif axis < len(ref):
                dims.append(ref[axis])
            else:
                raise ValueError(f"input '{spec.name}' axis {axis} is dynamic; no size to use")
        feeds[spec.name] = spec.random(rng, dims)
    return feeds


# -- timing ---------------------------------------------------------------------


def _max_abs_diff(a: list[Any], b: list[Any]) -> float | None:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        diff = np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))
        if diff.size and not np.isfinite(diff).all():
            return None
        worst = max(worst, float(diff.max(initial=0.0)))
    return worst


def time_interleaved(
    folded: ort.InferenceSession,
    unfolded: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    params: LatencyParams,
    progress: Progress | None = None,
    int8: ort.InferenceSession | None = None,
) -> Timings:
    """Warm up, then time ``params.iterations`` interleaved rounds of ``session.run`` calls,
    one per session (two, or three with ``int8``), the order rotating from round to round.

    Stops after the round that crosses ``params.max_seconds`` (from the start,
    warm-up included), keeping at least two rounds.
    """
    start = time.perf_counter()
    reference = folded.run(None, feeds)
    diff = _max_abs_diff(reference, unfolded.run(None, feeds))
    diff_int8 = None if int8 is None else _max_abs_diff(reference, int8.run(None, feeds))
    sessions = [folded, unfolded] + ([] if int8 is None else [int8])
    for _ in range(params.warmup):
        for session in sessions:
            session.run(None, feeds)
    times = np.empty((len(sessions), params.iterations))  # (variant, round)
    clock = time.perf_counter
    deadline = start + params.max_seconds
    done = 0
    for i in range(params.iterations):
        k = i % len(sessions)
        for j in [*range(k, len(sessions)), *range(k)]:
            t0 = clock()
            sessions[j].run(None, feeds)
            times[j, i] = clock() - t0
        done = i + 1
        if progress is not None:
            progress.advance(done / params.iterations)
        if done >= 2 and clock() > deadline:
            break
    return Timings(
        times[0, :done],
        times[1, :done],
        diff,
        clock() - start,
        time_limited=done < params.iterations,
        int8_s=None if int8 is None else times[2, :done],
        int8_max_abs_diff=diff_int8,
    )


def measure_model(
    model: ServedVersion, params: LatencyParams, progress: Progress | None = None
) -> FoldLatencyReport:
    """Measure ``model``'s folded against its unfolded file (blocking; call it off the loop).

    Raises :class:`foldserve.model_format.ModelVersionError` when a file is missing or
    no longer matches its sha256, :class:`NotMeasurable` for inputs it cannot draw.
    """
    meta = model.metadata
    optimized = not params.isolate
    folded = model.session("folded", optimized=optimized)
    unfolded = model.session("unfolded", optimized=optimized)
    int8 = model.session("int8", optimized=optimized) if params.int8 else None
    reference = {name: tuple(t.shape) for name, t in meta.reference.inputs.items()}
    try:
        feeds = random_feeds(model.inputs, params.batch_size, params.seed, reference)
    except ValueError as err:
        raise NotMeasurable(f"model '{model.name}' cannot be measured: {err}") from err
    timings = time_interleaved(folded, unfolded, feeds, params, progress, int8)

    folded_bytes = model.file_bytes("folded")
    unfolded_bytes = model.file_bytes("unfolded")
    unfolded_graph = onnx.load_model_from_string(unfolded_bytes)
    bn = {
        "folded": batchnorm_nodes(onnx.load_model_from_string(folded_bytes)),
        "unfolded": batchnorm_nodes(unfolded_graph),
    }
    bn_inputs = batchnorm_inputs(unfolded_graph)
    provider = folded.get_providers()[0]
    after_ort = None if params.isolate else batchnorm_after_ort(unfolded_bytes, provider)
    tf, tu, batch = timings.folded_s, timings.unfolded_s, params.batch_size
    speedup = paired_speedup(tu, tf, seed=params.seed)
    saving = float(np.median(tu) - np.median(tf)) * 1e6  # p50 to p50, microseconds
    share = batchnorm_share(unfolded_bytes, provider, model.threads, optimized, feeds)
    tq = timings.int8_s
    int8_speedup = None if tq is None else paired_speedup(tf, tq, seed=params.seed)
    int8_report = None
    if tq is not None:
        int8_bytes = model.file_bytes("int8")
        int8_bn = batchnorm_nodes(onnx.load_model_from_string(int8_bytes))
        int8_report = VariantLatency.of(meta.files.int8, int8_bn, summarize(tq, batch))
    return FoldLatencyReport(
        model_name=model.name,
        cached=False,
        end_to_end=None,  # the route reads them from the metrics when it answers
        scale="",
        model_version=str(model.version),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        case="isolated" if params.isolate else "ort_default",
        case_description=describe_case(params.isolate, bn_inputs, after_ort),
        isolate=params.isolate,
        graph_optimization_level="ORT_DISABLE_ALL" if params.isolate else "ORT_ENABLE_ALL",
        provider=provider,
        providers=list(folded.get_providers()),
        threads=model.threads,
        batch_size=params.batch_size,
        iterations=params.iterations,
        iterations_completed=int(timings.folded_s.size),
        warmup=params.warmup,
        seed=params.seed,
        seconds=timings.seconds,
        time_limited=timings.time_limited,
        folded=VariantLatency.of(meta.files.folded, bn["folded"], summarize(tf, batch)),
        unfolded=VariantLatency.of(meta.files.unfolded, bn["unfolded"], summarize(tu, batch)),
        speedup=SpeedupInterval.of(speedup),
        verdict=verdict(speedup),
        saving_us_per_call=saving,
        saving_us_per_sample=saving / batch,
        scope=RUNTIME_ONLY,
        max_abs_diff=timings.max_abs_diff,
        bn_nodes=bn,
        unfolded_bn_inputs=bn_inputs,
        unfolded_bn_nodes_after_ort=after_ort,
        machine=machine_facts(provider),
        bound=FoldBound.of(share, params.isolate),
        samples_ms={
            name: (times * 1e3).round(6).tolist()
            for name, times in (("folded", tf), ("unfolded", tu), ("int8", tq))
            if times is not None
        },
        int8=int8_report,
        int8_speedup=None if int8_speedup is None else Int8Speedup.of(int8_speedup),
        int8_verdict=None if int8_speedup is None else int8_verdict(int8_speedup),
        int8_max_abs_diff=timings.int8_max_abs_diff,
    )
