"""Triton's model configuration and statistics extensions, read with tritonclient."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2

from tests.polling import poll
from tests.servers import scrape, value


def infer_linear(client: Any, rows: int) -> None:
    x = triton.InferInput("x", [rows, 4], "FP32")
    x.set_data_from_numpy(np.ones((rows, 4), np.float32))
    client.infer("linear", [x])


def test_model_config_describes_the_served_version(fresh_server: Any) -> None:
    with fresh_server(max_batch_size=16, max_queue_delay_us=250) as live:
        (live.repository / "digits_cnn" / "config.json").write_text(
            json.dumps({"version_policy": {"latest": {"num_versions": 1}}, "latency_target_ms": 20})
        )
        client = triton.InferenceServerClient(f"127.0.0.1:{live.port}")
        with live.client() as http:
            assert (
                http.post("/v2/repository/models/digits_cnn/load", headers=KEY).status_code == 200
            )
        config = client.get_model_config("digits_cnn")
        assert config["name"] == "digits_cnn" and config["platform"] == "onnxruntime_onnx"
        assert config["max_batch_size"] == 16
        assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}]
        assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}]
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 250
        # The target as Triton's queue policy (the request waits at most that, then
        # UNAVAILABLE; its own timeout may shorten it) and as the model's parameter.
        assert config["dynamic_batching"]["default_queue_policy"] == {
            "max_queue_size": 4096,
            "timeout_action": "REJECT",
            "default_timeout_microseconds": 20_000,
            "allow_timeout_override": True,
        }
        assert config["parameters"] == {"latency_target_ms": {"string_value": "20"}}
        # The gRPC ModelConfig is the same body parsed into Triton's message.
        message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
        policy = message.dynamic_batching.default_queue_policy
        assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
        assert policy.default_timeout_microseconds == 20_000 and policy.allow_timeout_override
        assert message.parameters["latency_target_ms"].string_value == "20"
        assert config["version_policy"] == {"latest": {"num_versions": 1}}
        assert config["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]
        assert client.get_model_config("digits_cnn", "1") == config
        with pytest.raises(triton.InferenceServerException, match="unknown model 'nope'"):
            client.get_model_config("nope")
        client.close()


KEY = {"X-API-Key": "test-key"}


def test_inference_statistics_count_what_was_served(fresh_server: Any) -> None:
    with fresh_server(max_queue_delay_us=0) as live:
        client = triton.InferenceServerClient(f"127.0.0.1:{live.port}")
        since_ms, start_ns = time.time() * 1e3, time.perf_counter_ns()
        for rows in (1, 1, 3):
            infer_linear(client, rows)
        wall_ns, until_ms = time.perf_counter_ns() - start_ns, time.time() * 1e3
        with live.client() as http:  # one failure: wrong shape
            bad = {"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [0] * 5}]}
            assert http.post("/v2/models/linear/infer", json=bad).status_code == 400

        def compute_input_count() -> int:
            [stats] = client.get_inference_statistics("linear")["model_stats"]
            return int(stats["inference_stats"]["compute_input"]["count"])

        poll(lambda: compute_input_count() == 3)  # the phases are written within 50 ms
        [stats] = client.get_inference_statistics("linear")["model_stats"]
        assert (stats["name"], stats["version"]) == ("linear", "1")
        assert stats["inference_count"] == 5  # samples
        assert stats["execution_count"] == 3  # calls: requests one after another
        inference = stats["inference_stats"]
        assert inference["success"]["count"] == 3 and inference["fail"]["count"] == 1
        assert inference["queue"]["count"] == 3
        # Each phase took some time, within the requests' time, within the client's.
        assert 0 < inference["success"]["ns"] <= wall_ns
        phases = ("compute_input", "compute_infer", "compute_output")
        assert [inference[p]["count"] for p in phases] == [3, 3, 3]
        assert all(inference[p]["ns"] > 0 for p in phases)
        assert sum(inference[p]["ns"] for p in phases) <= inference["success"]["ns"]
        with live.client() as http:  # the statistics are the phase histograms, read out
            metrics = scrape(http)
        for p in phases:
            labels = {"model": "linear", "version": "1", "phase": p}
            seconds = value(metrics, "foldserve_request_phase_seconds_sum", **labels)
            assert value(metrics, "foldserve_request_phase_seconds_count", **labels) == 3
            assert inference[p]["ns"] == round(seconds * 1e9)
        admitted = {"model": "linear", "version": "1", "phase": "admission"}
        assert value(metrics, "foldserve_request_phase_seconds_count", **admitted) == 3
        assert [(b["batch_size"], b["compute_infer"]["count"]) for b in stats["batch_stats"]] == [
            (1, 2),
            (3, 1),
        ]
        assert int(since_ms) <= stats["last_inference"] <= until_ms  # ms since the epoch
        everything = client.get_inference_statistics()["model_stats"]
        assert {(s["name"], s["version"]) for s in everything} >= {("linear", "1"), ("two_io", "1")}
        assert client.get_inference_statistics("linear", "1")["model_stats"] == [stats]
        with pytest.raises(triton.InferenceServerException, match="unknown version '9'"):
            client.get_inference_statistics("linear", "9")
        client.close()
