"""Prometheus collectors of one app, in the app's own registry (tests build many apps).

With several worker processes, prometheus-client's multiprocess mode sums every
worker's counters and histograms (and live gauges) at each scrape, so
``/metrics`` reports the whole server whichever worker answers.
"""

from __future__ import annotations

import asyncio
import os
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from types import TracebackType

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service.errors import ServiceError
from service.process.runtime_dir import PROMETHEUS_DIR_ENV

# Seconds, fine enough for a small model's tens of microseconds and wide enough for a
# request that waited seconds in line (one set for every duration, so that they compare).
LATENCY_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# The phases of an answered request, in order (foldserve_request_phase_seconds; the
# batcher's queue is foldserve_queue_wait_seconds, end to end foldserve_request_duration).
PHASES = ("admission", "compute_input", "compute_infer", "compute_output")
# The phases are added up in the process and written to the histogram at most this long
# after a request (PhaseHistograms).
PHASE_FLUSH_S = 0.05
# Why a request was answered without being computed (foldserve_requests_dropped_total).
DROP_REASONS = ("queue_full", "rejected", "expired", "cancelled")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(slots=True)
class RequestRecord:
    """What an inference request resolved to; filled in while it is handled."""

    model: str
    protocol: str = "rest"  # the transport: rest or grpc
    version: str = ""
    admission_s: float = 0.0  # in line at the entry, body read
    input_s: float = 0.0  # payload to checked tensors, and its share of joining the batch
    infer_s: float = 0.0  # the ONNX Runtime call it was part of
    output_s: float = 0.0  # its rows split from the batch, and encoded


@dataclass(frozen=True)
class BatcherMetrics:
    """One model version's queue collectors, label lookups done once (they run per batch)."""

    queue_depth: Gauge
    queue_wait: Histogram
    batch_size: Histogram
    batch_requests: Histogram
    inference_seconds: Histogram
    last_inference: Gauge
    dropped: dict[str, Counter]  # by reason: DROP_REASONS
    executions: Counter  # the families, labelled (model, version, batch size) on first use
    execution_seconds: Counter
    labels: tuple[str, str]  # (model, version)
    by_batch_size: dict[int, tuple[Counter, Counter]] = field(default_factory=dict)

    def executed(self, samples: int, requests: int, seconds: float) -> None:
        """One ONNX Runtime call of ``samples`` rows for ``requests`` requests took ``seconds``."""
        self.inference_seconds.observe(seconds)
        self.batch_size.observe(samples)
        self.batch_requests.observe(requests)
        found = self.by_batch_size.get(samples)
        if found is None:
            labels = (*self.labels, str(samples))
            found = self.executions.labels(*labels), self.execution_seconds.labels(*labels)
            self.by_batch_size[samples] = found
        found[0].inc()
        found[1].inc(seconds)
        self.last_inference.set(time.time())


class PhaseHistograms:
    """``foldserve_request_phase_seconds``, observed in bulk.

    Four ``Histogram.observe`` calls per request cost 5.5% of a small model's throughput
    at saturation with several workers (each observe is two locked writes to the
    multiprocess values; docs/benchmarks.md, "Serving to a latency target"). So each
    request's phases are counted here, in plain lists, and written to the histogram's
    values once per bucket touched, ``PHASE_FLUSH_S`` after the first request not yet
    written (at once where no event loop runs): a scrape is at most that much behind.
    The histogram's buckets and sum are prometheus-client's own values (``_buckets``,
    per-bucket counts, and ``_sum``), so everything else (multiprocess merging, the
    text format, Triton's statistics) reads them as observed ones.
    """

    def __init__(self, family: Histogram) -> None:
        self.family = family
        self._pending: dict[tuple[str, str], tuple[list[list[int]], list[float]]] = {}
        self._children: dict[tuple[str, str], list[Histogram]] = {}
        self._armed = False

    def add(self, model: str, version: str, seconds: tuple[float, float, float, float]) -> None:
        """One answered request's time in each of :data:`PHASES`."""
        key = (model, version)
        found = self._pending.get(key)
        if found is None:
            buckets = len(LATENCY_BUCKETS) + 1  # and +Inf
            found = self._pending[key] = ([[0] * buckets for _ in PHASES], [0.0] * len(PHASES))
        counts, sums = found
        for i, value in enumerate(seconds):
            counts[i][bisect_left(LATENCY_BUCKETS, value)] += 1
            sums[i] += value
        if not self._armed:
            try:
                asyncio.get_running_loop().call_later(PHASE_FLUSH_S, self.flush)
            except RuntimeError:  # no event loop (a test, a script): written now
                self.flush()
                return
            self._armed = True

    def flush(self) -> None:
        """Write what was counted to the histogram's values."""
        self._armed = False
        pending, self._pending = self._pending, {}
        for key, (counts, sums) in pending.items():
            children = self._children.get(key)
            if children is None:
                children = self._children[key] = [self.family.labels(*key, p) for p in PHASES]
            for child, phase_counts, total in zip(children, counts, sums, strict=True):
                for value, count in zip(child._buckets, phase_counts, strict=True):
                    if count:
                        value.inc(count)
                child._sum.inc(total)


class RequestTracker:
    """``with metrics.track_request(model) as record``: a class, not a generator (it runs
    per request)."""

    __slots__ = ("_metrics", "_record", "_start")

    def __init__(self, metrics: ServiceMetrics, record: RequestRecord) -> None:
        self._metrics = metrics
        self._record = record
        self._start = 0.0

    def __enter__(self) -> RequestRecord:
        self._start = time.perf_counter()
        return self._record

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None:
            status = 200
        elif isinstance(error, ServiceError):
            status = error.status_code
        elif kind is asyncio.CancelledError:  # the client cancelled (a gRPC call): nginx's 499
            status = 499
        else:
            status = 500
        self._metrics.count_request(self._record, status, time.perf_counter() - self._start)


class ServiceMetrics:
    """Requests by model/version/status, request and inference latency, batch sizes, queues."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "foldserve_inference_requests",
            "Inference requests by model, version, HTTP status code (gRPC: the HTTP status "
            "of the same error) and protocol (rest, grpc)",
            ["model", "version", "status", "protocol"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "foldserve_request_duration_seconds",
            "Inference request time from first byte read to response built",
            ["model", "version", "status", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "foldserve_inference_duration_seconds",
            "ONNX Runtime time per inference call",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "foldserve_batch_size",
            "Samples per inference call",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "foldserve_batch_requests",
            "Requests gathered into one inference call by the dynamic batcher",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "foldserve_queue_depth",
            "Requests waiting in a model version's batching queue (all workers)",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.queue_wait_seconds = Histogram(
            "foldserve_queue_wait_seconds",
            "Time a request waited in the batching queue before its inference call started",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.dropped = Counter(
            "foldserve_requests_dropped",
            "Requests answered without being computed: queue_full (503 at the entry), "
            "rejected (503 at the entry: predicted to miss its deadline), expired (503: "
            "its deadline passed while it waited, or its batch would have ended past it), "
            "cancelled (the client cancelled or disconnected while it waited)",
            ["model", "version", "reason"],
            registry=self.registry,
        )
        self.phase_seconds = Histogram(
            "foldserve_request_phase_seconds",
            "Where each answered request's time went: admission (in line at the entry), "
            "compute_input (payload to checked tensors, and joining the batch), "
            "compute_infer (the ONNX Runtime call it was part of), compute_output "
            "(splitting the batch, encoding the answer)",
            ["model", "version", "phase"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_executions = Counter(
            "foldserve_batch_executions",
            "ONNX Runtime calls by batch size (samples)",
            ["model", "version", "batch_size"],
            registry=self.registry,
        )
        self.batch_execution_seconds = Counter(
            "foldserve_batch_execution_seconds",
            "ONNX Runtime time by batch size (samples)",
            ["model", "version", "batch_size"],
            registry=self.registry,
        )
        self.last_inference = Gauge(
            "foldserve_last_inference_timestamp_seconds",
            "When the model version last ran (Unix time)",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.pending_requests = Gauge(
            "foldserve_pending_requests",
            "Requests of a model in progress or waiting in line at its entry, all workers "
            "(Triton's nv_inference_pending_request_count; sampled every 50 ms while any "
            "are pending): the signal to scale on",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.admission_waiting = Gauge(
            "foldserve_admission_waiting",
            "Requests waiting in line at a model's entry, body read, not decoded (all workers)",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.connections_closed = Counter(
            "foldserve_connections_closed",
            "Connections the server closed: header_timeout and body_timeout (408), "
            "idle_for_new (an idle keep-alive one, for a new one past max_connections), "
            "refused_at_cap (a new one, 503, none idle)",
            ["reason"],
            registry=self.registry,
        )
        self.open_connections = Gauge(
            "foldserve_open_connections",
            "Open HTTP connections (all workers)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._request_counters: dict[tuple[str, str, int, str], tuple[Counter, Histogram]] = {}
        self.phases = PhaseHistograms(self.phase_seconds)
        self.models_ready = Gauge(
            "foldserve_model_versions_ready",
            "Model versions currently ready to serve",
            registry=self.registry,
            multiprocess_mode="livemax",  # every worker serves the same versions
        )

    def track_request(self, model: str, protocol: str = "rest") -> RequestTracker:
        """Count and time one inference request (``with``): the status comes from the error
        raised, if any."""
        return RequestTracker(self, RequestRecord(model, protocol))

    def count_request(self, record: RequestRecord, status: int, seconds: float) -> None:
        # Labelled children are cached: labels() costs more than the update itself.
        key = (record.model, record.version, status, record.protocol)
        found = self._request_counters.get(key)
        if found is None:
            labels = (record.model, record.version, str(status), record.protocol)
            found = self.requests.labels(*labels), self.request_seconds.labels(*labels)
            self._request_counters[key] = found
        counter, timer = found
        counter.inc()
        timer.observe(seconds)
        if status != 200:
            return  # its phases are partial: Triton's compute statistics count successes
        self.phases.add(
            record.model,
            record.version,
            (record.admission_s, record.input_s, record.infer_s, record.output_s),
        )

    def batcher(self, model: str, version: str) -> BatcherMetrics:
        """The collectors of one model version's batching queue."""
        return BatcherMetrics(
            queue_depth=self.queue_depth.labels(model, version),
            queue_wait=self.queue_wait_seconds.labels(model, version),
            batch_size=self.batch_size.labels(model, version),
            batch_requests=self.batch_requests.labels(model, version),
            inference_seconds=self.inference_seconds.labels(model, version),
            last_inference=self.last_inference.labels(model, version),
            dropped={
                reason: self.dropped.labels(model, version, reason) for reason in DROP_REASONS
            },
            executions=self.batch_executions,
            execution_seconds=self.batch_execution_seconds,
            labels=(model, version),
        )

    def request_buckets(self, model: str, version: str) -> list[tuple[float, float]]:
        """Cumulative ``(upper bound s, count)`` buckets of the answered (200) requests of a
        model version, end to end, over every worker (see :meth:`collect_registry`)."""
        wanted = {"model": model, "version": version, "status": "200"}
        found: dict[float, float] = {}
        for family in self.collect_registry().collect():
            if family.name != "foldserve_request_duration_seconds":
                continue
            for sample in family.samples:
                labels = sample.labels
                if sample.name.endswith("_bucket") and all(
                    labels.get(k) == v for k, v in wanted.items()
                ):
                    bound = float(labels["le"])
                    found[bound] = found.get(bound, 0.0) + sample.value
        return sorted(found.items())

    def render(self) -> bytes:
        """The Prometheus text exposition: of every worker process of this server when
        prometheus-client's multiprocess mode is on (``PROMETHEUS_MULTIPROC_DIR``, set by
        ``python -m service`` for several workers), else of this app's registry."""
        return generate_latest(self.collect_registry())

    def collect_registry(self) -> CollectorRegistry:
        """Where the current values are read from (see :meth:`render`)."""
        if multiprocess_dir() is None:
            return self.registry
        merged = CollectorRegistry()
        MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return merged


def multiprocess_dir() -> str | None:
    """prometheus-client's multiprocess directory, when this process writes its values there.

    The library reads ``PROMETHEUS_MULTIPROC_DIR`` when it is imported; this is the one
    place the service looks at it (``RuntimeDir.start_metrics`` sets it)."""
    return os.environ.get(PROMETHEUS_DIR_ENV) or None


def leave_multiprocess() -> None:
    """This worker exits: drop its live gauges (its counters keep counting in the sums)."""
    if multiprocess_dir() is not None:
        mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
