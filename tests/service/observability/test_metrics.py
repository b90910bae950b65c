"""/metrics moves by exactly the requests made (per-app registry, Prometheus text format)."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import numpy as np
import pytest

from service.observability.metrics import PHASES, ServiceMetrics
from tests.servers import scrape, value


def test_counters_and_histograms_move_by_the_requests_made(client: httpx.Client) -> None:
    x = [0.0] * 64
    ok = {"inputs": [{"name": "input", "shape": [3, 1, 8, 8], "datatype": "FP32", "data": x * 3}]}
    bad = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": x * 2}]}
    before = scrape(client)
    for _ in range(3):
        assert client.post("/v2/models/digits_cnn/infer", json=ok).status_code == 200
    for _ in range(2):
        assert client.post("/v2/models/digits_cnn/infer", json=bad).status_code == 400
    assert client.post("/v2/models/nope/infer", json=ok).status_code == 404
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "foldserve_inference_requests_total"
    assert delta(requests, model="digits_cnn", version="1", status="200", protocol="rest") == 3
    assert delta(requests, model="digits_cnn", version="1", status="400", protocol="rest") == 2
    assert delta(requests, model="unknown", version="", status="404", protocol="rest") == 1
    timed = "foldserve_request_duration_seconds_count"
    assert delta(timed, model="digits_cnn", version="1", status="200", protocol="rest") == 3
    assert delta(timed, model="digits_cnn", version="1", status="400", protocol="rest") == 2
    assert delta("foldserve_inference_duration_seconds_count", model="digits_cnn", version="1") == 3
    assert delta("foldserve_batch_size_count", model="digits_cnn", version="1") == 3
    assert delta("foldserve_batch_size_sum", model="digits_cnn", version="1") == 9
    assert value(after, "foldserve_model_versions_ready") >= 4


def test_v1_predict_is_counted_too(client: httpx.Client) -> None:
    before = scrape(client)
    body = {"instances": [[0.0] * 30, [1.0] * 30]}
    assert client.post("/v1/models/breast_cancer_mlp:predict", json=body).status_code == 200
    after = scrape(client)
    labels = {"model": "breast_cancer_mlp", "version": "1"}
    name = "foldserve_inference_requests_total"
    sent = {"status": "200", "protocol": "rest", **labels}
    assert value(after, name, **sent) - value(before, name, **sent) == 1
    batch = "foldserve_batch_size_sum"
    assert value(after, batch, **labels) - value(before, batch, **labels) == 2


def test_each_app_has_its_own_registry() -> None:
    first, second = ServiceMetrics(), ServiceMetrics()
    first.batcher("m", "1").batch_size.observe(4)
    assert b'foldserve_batch_size_count{model="m",version="1"} 1.0' in first.render()
    assert b'model="m"' not in second.render()


def test_a_request_its_client_cancels_is_counted_499_not_500() -> None:
    """A gRPC call the client cancels cancels its handler: nobody gets an answer, and it
    is no server error."""
    metrics = ServiceMetrics()
    with contextlib.suppress(asyncio.CancelledError):
        with metrics.track_request("m", "grpc") as record:
            record.version = "1"
            raise asyncio.CancelledError
    labels = {"model": "m", "version": "1", "protocol": "grpc"}
    sample = metrics.registry.get_sample_value
    assert sample("foldserve_inference_requests_total", {**labels, "status": "499"}) == 1
    assert sample("foldserve_inference_requests_total", {**labels, "status": "500"}) is None


def test_phases_written_in_bulk_read_as_observed_ones() -> None:
    """The phase histogram is filled in bulk (PhaseHistograms): every bucket, count and sum
    reads as if each request's phases had been observed one by one."""
    metrics, observed = ServiceMetrics(), ServiceMetrics()
    rng = np.random.default_rng(0)
    requests = [tuple(float(x) for x in rng.exponential(0.002, 4)) for _ in range(500)]
    requests += [(0.0, 1e-5, 20.0, 0.5)]  # a bucket's edge, the +Inf bucket

    async def answered() -> None:  # on an event loop: written PHASE_FLUSH_S later
        for phases in requests:
            metrics.phases.add("m", "1", phases)  # type: ignore[arg-type]
        metrics.phases.flush()  # what the timer does

    asyncio.run(answered())
    for phases in requests:
        for name, seconds in zip(PHASES, phases, strict=True):
            observed.phase_seconds.labels("m", "1", name).observe(seconds)
    got, want = phase_samples(metrics), phase_samples(observed)
    assert got.keys() == want.keys() and len(got) == len(PHASES) * (20 + 2)  # buckets, count, sum
    for key, expected in want.items():
        assert got[key] == pytest.approx(expected, rel=1e-12), key  # sums: added in another order


def phase_samples(metrics: ServiceMetrics) -> dict[tuple[str, str, str], float]:
    """The phase histogram's samples by (name, phase, le), creation times left out."""
    return {
        (s.name, s.labels["phase"], s.labels.get("le", "")): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name.startswith("foldserve_request_phase_seconds") and not s.name.endswith("_created")
    }
