"""Dynamic batching with real models and live servers: same bits batched or not, and the
wiring that only a server shows (request parameters, config.json, statuses, /metrics).

The batcher's own behaviour (coalescing, max_queue_delay, splitting, failures, timeouts,
close, disconnects) is tested in process, with calls the test finishes, in
test_batcher.py and test_batcher_failures.py. Here events are ordered by polling the
server's metrics, never by sleeping.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from foldserve.model_format import ModelVersionError
from service.models.config import BatchingConfig, BatchingOverrides, read_model_config
from service.models.repository import ModelRepository
from service.settings import Settings
from tests.polling import poll
from tests.servers import (
    ENDLESS_HOLD_US,
    HOLD_US,
    parse_metrics,
    scrape,
    serving_options,
    v2_body,
    value,
)

SAMPLE = {"digits_cnn": (1, 8, 8), "breast_cancer_mlp": (30,), "linear": (4,)}
INPUT = {"digits_cnn": "input", "breast_cancer_mlp": "input", "linear": "x"}
# Longer than any test: a request that leaves the queue before it did so for its own reason.


def batch_of(name: str, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, *SAMPLE[name])) * 4).astype(np.float32)


def binary_request(
    x: np.ndarray, name: str = "input", **params: Any
) -> tuple[bytes, dict[str, str]]:
    """A V2 request with binary input and binary outputs: the answer's bytes are the floats."""
    raw = x.astype("<f4").tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True, **params},
        }
    ).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def answer_bytes(r: httpx.Response) -> bytes:
    assert r.status_code == 200, r.text
    return r.content[int(r.headers["inference-header-content-length"]) :]


# -- equal bits, batched or alone -------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLE))
@pytest.mark.parametrize("rows", [(1,) * 12, (1, 3, 2, 5, 1, 4), (7, 1, 1, 9)])
def test_batched_rows_equal_the_request_run_alone_bit_for_bit(
    model_store: Any, name: str, rows: tuple[int, ...]
) -> None:
    """Requests gathered into shared calls get exactly the bits of their own call."""
    options = serving_options(max_batch_size=16, max_queue_delay_us=20_000)
    repo = ModelRepository(model_store.root, options)
    repo.load_all()
    model = repo.get(name)
    batcher = model.batcher
    inputs = [batch_of(name, n, seed) for seed, n in enumerate(rows)]
    feed = model.inputs[0].name

    async def all_at_once() -> list[dict[str, np.ndarray]]:
        calls = [batcher.run({feed: x}, model.output_names) for x in inputs]
        return await asyncio.gather(*calls)

    answers = asyncio.run(all_at_once())
    for x, got in zip(inputs, answers, strict=True):
        alone = model.run({feed: x})
        for out in model.output_names:
            assert got[out].shape == alone[out].shape
            assert got[out].tobytes() == alone[out].tobytes()
    samples = parse_metrics(options.metrics.render().decode())
    calls = value(samples, "foldserve_batch_requests_count", model=name, version="1")
    assert calls < len(rows)  # they really shared calls


@pytest.mark.parametrize("name", ["digits_cnn", "breast_cancer_mlp"])
def test_http_answers_are_identical_with_batching_on_and_off(
    fresh_server: Any, model_store: Any, tmp_path: Path, name: str
) -> None:
    inputs = [batch_of(name, 1 + seed % 3, seed) for seed in range(16)]
    answers: dict[bool, list[bytes]] = {}
    repo = model_store.copy_to(tmp_path / "repo")
    for batching in (True, False):
        with (
            fresh_server(repo=repo, batching=batching, max_queue_delay_us=20_000) as live,
            live.client() as client,
            ThreadPoolExecutor(len(inputs)) as pool,
        ):

            def send(x: np.ndarray, client: httpx.Client = client) -> bytes:
                body, headers = binary_request(x)
                return answer_bytes(
                    client.post(f"/v2/models/{name}/infer", content=body, headers=headers)
                )

            answers[batching] = list(pool.map(send, inputs))
            samples = scrape(client)
        labels = {"model": name, "version": "1"}
        calls = value(samples, "foldserve_batch_requests_count", **labels)
        requests = value(samples, "foldserve_batch_requests_sum", **labels)
        assert requests == len(inputs)
        assert (calls < requests) if batching else (calls == requests)
    assert answers[True] == answers[False]


# -- back-pressure, deadlines, disconnects ------------------------------------------


def queue_depth(client: httpx.Client, model: str) -> float:
    return value(scrape(client), "foldserve_queue_depth", model=model, version="1")


def _post_later(
    client: httpx.Client, path: str, body: bytes, out: list[httpx.Response]
) -> threading.Thread:
    thread = threading.Thread(target=lambda: out.append(client.post(path, content=body)))
    thread.start()
    return thread


def test_a_full_queue_answers_503_with_retry_after(fresh_server: Any) -> None:
    body = json.dumps(v2_body(np.full((1, 1, 8, 8), 0.5, np.float32))).encode()
    path = "/v2/models/digits_cnn/infer"
    with (
        fresh_server(max_queue_size=2, max_queue_delay_us=HOLD_US) as live,
        live.client() as client,
    ):
        done: list[httpx.Response] = []
        waiting: list[threading.Thread] = []
        for _ in range(2):
            waiting.append(_post_later(client, path, body, done))
            poll(lambda: queue_depth(client, "digits_cnn") == len(waiting))
        refused = client.post(path, content=body)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert "2 requests are in progress and 0 waiting" in error and "max_queue_size 2" in error
        for thread in waiting:
            thread.join()
        assert [r.status_code for r in done] == [200, 200]
        samples = scrape(client)
    labels = {"model": "digits_cnn", "version": "1"}
    assert value(samples, "foldserve_requests_dropped_total", reason="queue_full", **labels) == 1
    assert (
        value(
            samples, "foldserve_inference_requests_total", status="503", protocol="rest", **labels
        )
        == 1
    )
    assert value(samples, "foldserve_batch_requests_sum", **labels) == 2  # one call, both


def test_config_json_overrides_the_server_batching_settings(
    fresh_server: Any, model_store: Any, tmp_path: Path
) -> None:
    repo = model_store.copy_to(tmp_path / "repo")
    config = {
        "max_batch_size": 8,
        "dynamic_batching": {"max_queue_delay_microseconds": HOLD_US, "max_queue_size": 1},
    }
    (repo / "digits_cnn" / "config.json").write_text(json.dumps(config))
    body = json.dumps(v2_body(np.full((1, 1, 8, 8), 0.5, np.float32))).encode()
    with fresh_server(repo=repo) as live, live.client() as client:
        done: list[httpx.Response] = []
        first = _post_later(client, "/v2/models/digits_cnn/infer", body, done)
        poll(lambda: queue_depth(client, "digits_cnn") == 1)
        refused = client.post("/v2/models/digits_cnn/infer", content=body)
        assert refused.status_code == 503 and "max_queue_size 1" in refused.json()["error"]
        other = client.post(
            "/v1/models/breast_cancer_mlp:predict", json={"instances": [[0.0] * 30]}
        )
        assert other.status_code == 200  # other models keep the server's settings
        first.join()
        assert done[0].status_code == 200


def test_a_request_past_its_timeout_answers_503_and_never_runs(fresh_server: Any) -> None:
    body, headers = binary_request(batch_of("digits_cnn", 1, 0), timeout=100_000)  # 100 ms
    labels = {"model": "digits_cnn", "version": "1"}
    # The hold outlasts the client's own timeout (10 s): the 503 is the request's timeout.
    with fresh_server(max_queue_delay_us=ENDLESS_HOLD_US) as live, live.client() as client:
        before = scrape(client)
        start = time.monotonic()
        r = client.post("/v2/models/digits_cnn/infer", content=body, headers=headers)
        waited = time.monotonic() - start
        assert r.status_code == 503, r.text  # Triton's UNAVAILABLE "Request timeout expired"
        assert r.json()["error"].startswith(
            "Request timeout expired: model 'digits_cnn' version 1: its deadline passed"
        )
        assert waited >= 0.1
        after = scrape(client)  # it left the queue before the answer: nothing can run it
    assert value(after, "foldserve_batch_requests_count", **labels) == value(
        before, "foldserve_batch_requests_count", **labels
    )
    assert value(after, "foldserve_requests_dropped_total", reason="expired", **labels) == 1
    assert (
        value(after, "foldserve_inference_requests_total", status="503", protocol="rest", **labels)
        == 1
    )


def test_the_server_default_timeout_applies_to_v1_too(fresh_server: Any) -> None:
    with (
        fresh_server(max_queue_delay_us=ENDLESS_HOLD_US, request_timeout_ms=50) as live,
        live.client() as client,
    ):
        r = client.post("/v1/models/breast_cancer_mlp:predict", json={"instances": [[0.0] * 30]})
    assert r.status_code == 503 and "Request timeout expired" in r.json()["error"]


def test_a_client_that_disconnects_leaves_no_work_behind(fresh_server: Any) -> None:
    body, headers = binary_request(batch_of("digits_cnn", 2, 0))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    labels = {"model": "digits_cnn", "version": "1"}
    # The hold outlasts the test: the request leaves the queue because its client left.
    with fresh_server(max_queue_delay_us=ENDLESS_HOLD_US) as live, live.client() as client:
        before = scrape(client)
        with socket.create_connection(("127.0.0.1", live.port)) as sock:
            sock.sendall(
                f"POST /v2/models/digits_cnn/infer HTTP/1.1\r\nHost: x\r\n{head}"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            poll(lambda: queue_depth(client, "digits_cnn") == 1)
        counted = {"status": "499", "protocol": "rest", **labels}
        poll(lambda: value(scrape(client), "foldserve_inference_requests_total", **counted) == 1)
        after = scrape(client)
    assert value(after, "foldserve_queue_depth", **labels) == 0
    assert value(after, "foldserve_requests_dropped_total", reason="cancelled", **labels) == 1
    assert value(after, "foldserve_batch_requests_count", **labels) == value(
        before, "foldserve_batch_requests_count", **labels
    )
    assert (
        value(after, "foldserve_inference_requests_total", status="499", protocol="rest", **labels)
        == 1
    )


# -- config.json batching settings -------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, BatchingOverrides()),
        ({"dynamic_batching": False}, BatchingOverrides(enabled=False)),
        ({"max_batch_size": 4}, BatchingOverrides(max_batch_size=4)),
        (
            {"dynamic_batching": {"max_queue_delay_microseconds": 0, "max_queue_size": 3}},
            BatchingOverrides(enabled=True, max_queue_delay_us=0, max_queue_size=3),
        ),
        ({"latency_target_ms": 20}, BatchingOverrides(latency_target_ms=20.0)),
        (
            {"latency_target_ms": 2.5, "dynamic_batching": {"max_queue_size": 8}},
            BatchingOverrides(enabled=True, max_queue_size=8, latency_target_ms=2.5),
        ),
    ],
)
def test_config_json_batching(
    tmp_path: Path, config: dict[str, Any], expected: BatchingOverrides
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_model_config(tmp_path).batching == expected


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1"),
        ({"dynamic_batching": {"max_queue_size": "8"}}, "max_queue_size must be an integer >= 1"),
        (
            {"dynamic_batching": {"preferred_batch_size": [4]}},
            "unknown key(s) ['preferred_batch_size']",
        ),
        ({"dynamic_batching": 3}, "dynamic_batching must be true, false or an object"),
        ({"latency_target_ms": 0}, "latency_target_ms must be a number of milliseconds > 0"),
        ({"latency_target_ms": "20"}, "latency_target_ms must be a number of milliseconds > 0"),
        ({"latency_target_ms": True}, "got True"),
    ],
)
def test_bad_batching_config_says_what_is_wrong(
    tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelVersionError) as err:
        read_model_config(tmp_path)
    assert message in str(err.value)


def test_the_server_target_is_every_model_s_unless_its_config_json_sets_one() -> None:
    server = BatchingConfig.from_settings(Settings(latency_target_ms=50))
    assert server.latency_target_s == 0.05
    assert server.merged(BatchingOverrides()).latency_target_s == 0.05
    assert server.merged(BatchingOverrides(latency_target_ms=20)).latency_target_s == 0.02
    none = BatchingConfig.from_settings(Settings())
    assert none.latency_target_s is None  # no target by default: today's behaviour
