"""The fold-latency report in scale: the saving in microseconds per call and per sample,
that it is ONNX Runtime time only, and the server's own end-to-end p50 beside it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest


def test_histogram_quantile_interpolates_as_prometheus_does() -> None:
    from foldserve.latency_stats import histogram_quantile

    buckets = [(0.001, 0.0), (0.002, 10.0), (0.005, 30.0), (math.inf, 40.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.002 + 0.003 * 10 / 20)
    assert histogram_quantile(0.2, buckets) == pytest.approx(0.001 + 0.001 * 8 / 10)
    assert histogram_quantile(0.99, buckets) == 0.005  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, [(0.001, 0.0), (math.inf, 0.0)]) is None


@pytest.mark.parametrize("workers", [2])
def test_fold_latency_gives_the_saving_in_microseconds_beside_the_served_p50(
    model_store: Any, tmp_path: Path, serve_process: Any, workers: int
) -> None:
    repo = model_store.copy_to(tmp_path / "models")
    requests = 12
    body = {"instances": [[10.0] * 30]}
    with serve_process(repo, workers) as server:
        client = server.client
        for _ in range(requests):  # a new connection each: both workers answer some
            assert client.post("/v1/models/breast_cancer_mlp:predict", json=body).is_success
        params = {"batch_size": 4, "iterations": 50, "warmup": 5}
        report = client.get("/v2/models/breast_cancer_mlp/fold-latency", params=params).json()
        idle = client.get("/v2/models/digits_cnn/fold-latency", params=params).json()

    per_call = (report["unfolded"]["p50_ms"] - report["folded"]["p50_ms"]) * 1e3
    assert report["saving_us_per_call"] == pytest.approx(per_call, rel=1e-9, abs=1e-9)
    assert report["saving_us_per_sample"] == pytest.approx(per_call / 4, rel=1e-9, abs=1e-9)
    assert report["scope"].startswith("These times are ONNX Runtime's session.run alone")
    e2e = report["end_to_end"]
    assert e2e["requests"] == requests
    assert 0.0 < e2e["p50_ms"] <= 1000.0
    assert (
        f"{requests} answered request(s) to this version took {e2e['p50_ms']:.3f} ms"
        in (report["scale"])
    )
    faster = "faster" if per_call >= 0 else "slower"
    assert report["scale"].startswith(f"The folded model runs {abs(per_call):.2f} us {faster} ")
    assert f"({abs(per_call) / 4:.2f} us per sample)" in report["scale"]
    assert idle["end_to_end"] is None
    assert idle["scale"].endswith("No answered requests to this version are in the metrics yet.")
