"""Several worker processes, one server: load, unload, errors and metrics as a client sees them.

Each test starts ``python -m service --workers N`` as a real process and talks to
it over HTTP on 127.0.0.1 with a new connection per request, so requests land
on whichever worker the kernel picks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.polling import poll

REQUESTS = 40  # per check: with N workers, each takes some of them


def served_versions(client: httpx.Client, name: str) -> list[list[str] | int]:
    """What ``REQUESTS`` metadata requests answer: the versions list, or the status."""
    seen: list[list[str] | int] = []
    for _ in range(REQUESTS):
        r = client.get(f"/v2/models/{name}")
        seen.append(r.json()["versions"] if r.status_code == 200 else r.status_code)
    return seen


def infer_versions(client: httpx.Client, name: str) -> list[str | int]:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    seen: list[str | int] = []
    for _ in range(REQUESTS):
        r = client.post(f"/v2/models/{name}/infer", json=body)
        seen.append(r.json()["model_version"] if r.status_code == 200 else r.status_code)
    return seen


def uses_onnxruntime(pid: int) -> bool:
    """Process ``pid`` has ONNX Runtime's native library mapped."""
    return "onnxruntime_pybind11_state" in Path(f"/proc/{pid}/maps").read_text()


def index(client: httpx.Client) -> list[Any]:
    found: list[Any] = client.get("/v2/repository/index").json()
    return found


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_load_and_unload_reach_every_worker(
    build: Any, tmp_path: Path, serve_process: Any, workers: int
) -> None:
    build.write_version(tmp_path, "linear", 1, build.linear_model(4, 5))
    with serve_process(tmp_path, workers) as server:
        client = server.client
        assert served_versions(client, "linear") == [["1"]] * REQUESTS
        build.write_version(tmp_path, "linear", 2, build.linear_model(4, 5, seed=2))
        r = client.post("/v2/repository/models/linear/load")
        assert r.status_code == 200, r.text
        assert r.json()["workers"] == workers
        assert [v["state"] for v in r.json()["versions"]] == ["READY", "READY"]
        assert served_versions(client, "linear") == [["1", "2"]] * REQUESTS
        assert infer_versions(client, "linear") == ["2"] * REQUESTS
        first = index(client)
        assert all(index(client) == first for _ in range(REQUESTS // 4))

        r = client.post("/v2/repository/models/linear/unload")
        assert r.status_code == 200 and r.json()["workers"] == workers
        assert infer_versions(client, "linear") == [400] * REQUESTS
        r = client.post("/v2/repository/models/linear/load")
        assert r.status_code == 200
        assert infer_versions(client, "linear") == ["2"] * REQUESTS


def test_a_load_that_finds_a_corrupt_version_is_refused_everywhere(
    build: Any, tmp_path: Path, serve_process: Any
) -> None:
    build.write_version(tmp_path, "linear", 1, build.linear_model(4, 5))
    with serve_process(tmp_path, 2) as server:
        client = server.client
        bad = tmp_path / "linear" / "2"
        build.write_version(tmp_path, "linear", 2, build.linear_model(4, 5, seed=2))
        (bad / "model.onnx").write_bytes(b"not an onnx model")
        r = client.post("/v2/repository/models/linear/load")
        assert r.status_code == 400, r.text
        body = r.json()
        assert "version 2: sha256 of model.onnx" in body["error"]
        states = {v["version"]: (v["state"], v["reason"][:9]) for v in body["versions"]}
        assert states == {"1": ("READY", ""), "2": ("UNAVAILABLE", "sha256 of")}
        assert infer_versions(client, "linear") == ["1"] * REQUESTS  # the old one serves on
        assert served_versions(client, "linear") == [["1"]] * REQUESTS


def test_metrics_count_every_workers_requests(
    build: Any, tmp_path: Path, serve_process: Any
) -> None:
    build.write_version(tmp_path, "linear", 1, build.linear_model(4, 5))
    with serve_process(tmp_path, 2) as server:
        client = server.client
        sent = infer_versions(client, "linear") + infer_versions(client, "linear")
        assert sent == ["1"] * 2 * REQUESTS
        for _ in range(4):  # whichever worker answers the scrape
            text = client.get("/metrics").text
            counts = {
                (s.labels.get("model"), s.labels.get("status")): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "foldserve_inference_requests_total"
            }
            assert counts[("linear", "200")] == 2 * REQUESTS
            ready = [
                s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "foldserve_model_versions_ready"
            ]
            assert ready == [1.0]
            [stats] = client.get("/v2/models/linear/stats").json()["model_stats"]
            assert stats["inference_stats"]["success"]["count"] == 2 * REQUESTS
            assert stats["inference_count"] == 2 * REQUESTS  # one sample each


def test_direct_inference_values_match_onnxruntime_on_every_worker(
    build: Any, tmp_path: Path, serve_process: Any
) -> None:
    import onnxruntime as ort

    model = build.linear_model(4, 5, seed=3)
    build.write_version(tmp_path, "linear", 1, model)
    x = np.array([[1, 2, 3, 4]], np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    with serve_process(tmp_path, 2) as server:
        client = server.client
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.tolist()}]}
        for _ in range(10):
            out = client.post("/v2/models/linear/infer", json=body).json()["outputs"][0]
            np.testing.assert_allclose(np.reshape(out["data"], (1, 5)), expected, atol=1e-6)
        # The workers run ONNX Runtime; the supervisor, which serves nothing, never loads it
        # (nor the app).
        workers = server.worker_pids()
        assert len(workers) == 2
        assert all(uses_onnxruntime(pid) for pid in workers)
        assert not uses_onnxruntime(server.process.pid)


def test_one_fold_latency_measurement_at_a_time_across_workers(
    build: Any, tmp_path: Path, serve_process: Any
) -> None:
    import threading

    build.write_version(tmp_path, "wide", 1, build.linear_model(512, 512))  # ~ms per run
    with serve_process(tmp_path, 2, FOLDSERVE_FOLD_LATENCY_MAX_SECONDS="2") as server:
        client = server.client
        url = "/v2/models/wide/fold-latency"
        long: dict[str, httpx.Response] = {}

        def measure_long() -> None:  # far more runs than 2 s allow: stopped by the time limit
            long["r"] = client.get(url, params={"batch_size": 256, "iterations": 10_000})

        worker = threading.Thread(target=measure_long)
        worker.start()
        # The measurement writes its progress once it holds the server-wide lock.
        poll(lambda: (server.runtime / "fold-latency.progress.json").exists())
        busy = [client.get(url, params={"iterations": 10}).status_code for _ in range(10)]
        assert busy == [429] * 10  # whichever worker takes the request
        worker.join(30)
        assert long["r"].status_code == 200 and long["r"].json()["time_limited"] is True
        measured = long["r"].json()["measured_at"]
        cached = [client.get(url, params={"cached": "true"}).json() for _ in range(10)]
        assert {c["measured_at"] for c in cached} == {measured}  # every worker has the report
        assert all(c["cached"] is True for c in cached)
