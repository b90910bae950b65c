"""Deadlines in a real server of two worker processes, over REST and gRPC: a request whose
deadline passes while it waits is answered 503 / UNAVAILABLE and never computed (the
dropped counter and the model's execution count agree), and the phase histograms of the
answered requests are the sums over both workers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.observability.metrics import PHASES
from tests.polling import poll
from tests.servers import ENDLESS_HOLD_US, Samples, parse_metrics, v2_body, value

TARGET_MS = 150


def test_requests_past_their_deadline_are_never_computed(
    model_store: Any, tmp_path: Path, serve_process: Any
) -> None:
    repo = model_store.copy_to(tmp_path / "models")
    # Every digits_cnn request waits in the queue for company that never comes: it can only
    # leave by its deadline, which the target sets.
    (repo / "digits_cnn" / "config.json").write_text(
        json.dumps(
            {
                "latency_target_ms": TARGET_MS,
                "dynamic_batching": {"max_queue_delay_microseconds": ENDLESS_HOLD_US},
            }
        )
    )
    x = np.zeros((1, 1, 8, 8), np.float32)
    with serve_process(repo, 2, grpc=True) as server:
        rest = [
            httpx.post(f"{server.url}/v2/models/digits_cnn/infer", json=v2_body(x), timeout=30)
            for _ in range(3)
        ]
        for answer in rest:
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"].startswith(
                "Request timeout expired: model 'digits_cnn' version 1: its deadline passed"
            )
        request = pb.ModelInferRequest(
            model_name="digits_cnn",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=x.shape)
            ],
            raw_input_contents=[x.tobytes()],
        )
        with grpc.insecure_channel(server.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(2):
                try:
                    stub.ModelInfer(request, timeout=30)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE
                    assert "Request timeout expired" in str(err.details())
                else:
                    raise AssertionError("a request past its deadline was answered")
        metrics = parse_metrics(server.client.get("/metrics").text)
    labels = {"model": "digits_cnn", "version": "1"}
    assert value(metrics, "foldserve_requests_dropped_total", reason="expired", **labels) == 5
    assert value(metrics, "foldserve_batch_requests_count", **labels) == 0  # never computed
    assert value(metrics, "foldserve_queue_wait_seconds_count", **labels) == 0  # nor dispatched
    for protocol, count in (("rest", 3), ("grpc", 2)):
        sent = {"status": "503", "protocol": protocol, **labels}
        assert value(metrics, "foldserve_inference_requests_total", **sent) == count


def test_phase_histograms_sum_over_the_workers(
    model_store: Any, tmp_path: Path, serve_process: Any
) -> None:
    repo = model_store.copy_to(tmp_path / "models")
    x = np.zeros((1, 30), np.float32)
    requests = 40  # each on a new connection: the kernel spreads them over both workers
    with serve_process(repo, 2) as server:
        for _ in range(requests):
            answer = httpx.post(
                f"{server.url}/v2/models/breast_cancer_mlp/infer", json=v2_body(x), timeout=30
            )
            assert answer.status_code == 200, answer.text
        labels = {"model": "breast_cancer_mlp", "version": "1"}

        def scraped() -> Samples:
            return parse_metrics(server.client.get("/metrics").text)

        def written(phase: str) -> float:  # each worker writes its phases within 50 ms
            return value(scraped(), "foldserve_request_phase_seconds_count", phase=phase, **labels)

        poll(lambda: all(written(p) == requests for p in PHASES))
        metrics = scraped()
        stats = server.client.get("/v2/models/breast_cancer_mlp/stats").json()
    ok = {"status": "200", "protocol": "rest", **labels}
    assert value(metrics, "foldserve_request_duration_seconds_count", **ok) == requests
    [model] = stats["model_stats"]
    for phase in PHASES:
        count = value(metrics, "foldserve_request_phase_seconds_count", phase=phase, **labels)
        assert count == requests, phase
        seconds = value(metrics, "foldserve_request_phase_seconds_sum", phase=phase, **labels)
        assert seconds < value(metrics, "foldserve_request_duration_seconds_sum", **ok)
        if phase != "admission":
            assert model["inference_stats"][phase] == {
                "count": requests,
                "ns": round(seconds * 1e9),
            }
    assert value(metrics, "foldserve_queue_wait_seconds_count", **labels) == requests
