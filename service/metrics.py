"""Prometheus collectors of one app, in the app's own registry (tests build many apps)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.errors import ServiceError

LATENCY_BUCKETS = (
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
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class RequestRecord:
    """What an inference request resolved to; filled in while it is handled."""

    model: str
    version: str = ""


class ServiceMetrics:
    """Requests by model/version/status, request and inference latency, batch sizes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "foldserve_inference_requests",
            "Inference requests by model, version and HTTP status code",
            ["model", "version", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "foldserve_request_duration_seconds",
            "Inference request time from first byte read to response built",
            ["model"],
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
        self.models_ready = Gauge(
            "foldserve_model_versions_ready",
            "Model versions currently ready to serve",
            registry=self.registry,
        )

    @contextmanager
    def track_request(self, model: str) -> Iterator[RequestRecord]:
        """Count and time one inference request; the status comes from the error raised, if any."""
        record = RequestRecord(model)
        start = time.perf_counter()
        status = 500
        try:
            yield record
            status = 200
        except ServiceError as err:
            status = err.status_code
            raise
        finally:
            self.requests.labels(record.model, record.version, str(status)).inc()
            self.request_seconds.labels(record.model).observe(time.perf_counter() - start)

    def observe_inference(self, model: str, version: str, seconds: float, batch: int) -> None:
        self.inference_seconds.labels(model, version).observe(seconds)
        self.batch_size.labels(model, version).observe(batch)

    def render(self) -> bytes:
        """The Prometheus text exposition of this app's registry."""
        return generate_latest(self.registry)
