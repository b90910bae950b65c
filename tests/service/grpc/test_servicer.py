"""gRPC with Triton's own client: a real `python -m service --workers 2`, `tritonclient.grpc`.

Every RPC that REST has an equivalent for is called and its values compared with
REST's answer or with ONNX Runtime run directly on the served file; the error codes
are Triton's; a stream survives a bad request; a request and an answer over gRPC's
default 4 MiB pass; concurrent calls and a stream's requests batch; load and unload reach
every worker (each check opens a new channel, a new connection that the kernel may give
to either worker). How gRPC stops: tests/service/grpc/test_stop.py.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

KEY = "grpc-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
CHANNELS = 12  # new channels per "every worker" check: all on one of 2 workers 1 in 2,048
# A channel of its own connection: grpcio otherwise shares one between equal channels.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture(scope="module")
def server(
    model_store: Any, tmp_path_factory: pytest.TempPathFactory, serve_process: Any
) -> Iterator[Any]:
    repo = model_store.copy_to(tmp_path_factory.mktemp("grpc") / "models")
    with serve_process(repo, 2, grpc=True, FOLDSERVE_API_KEY=KEY) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.grpc_url) as found:
        yield found


def digits_reference(repository: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        str(repository / "digits_cnn" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return np.asarray(session.run(None, {"input": x})[0])


def digits_input(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, 1, 8, 8), dtype=np.float32) * 16


def infer_input(name: str, array: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def code_of(call: Any) -> tuple[str, str]:
    """The status name and message of a call that must fail."""
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()), caught.value.message()


def test_health_and_metadata_agree_with_rest(server: Any, client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits_cnn") and client.is_model_ready("digits_cnn", "1")
    rest = server.client
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "foldserve" == rest.get("/v2").json()["name"]
    assert meta["version"] == rest.get("/v2").json()["version"]
    assert set(meta["extensions"]) == set(rest.get("/v2").json()["extensions"])
    model = client.get_model_metadata("digits_cnn", as_json=True)
    expected = rest.get("/v2/models/digits_cnn").json()
    for key in ("name", "versions", "platform"):
        assert model[key] == expected[key]
    for side in ("inputs", "outputs"):
        got = [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in model[side]]
        assert got == [(t["name"], t["datatype"], t["shape"]) for t in expected[side]]
    config = client.get_model_config("digits_cnn", as_json=True)["config"]
    rest_config = rest.get("/v2/models/digits_cnn/config").json()
    assert config["max_batch_size"] == rest_config["max_batch_size"] == 32
    assert [i["dims"] for i in config["input"]] == [["1", "8", "8"]]  # int64 as JSON strings
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 4096  # int32
    with grpc.insecure_channel(server.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as shm:
            stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
        assert shm.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_infer_matches_onnxruntime_and_classifies(server: Any, client: Any) -> None:
    x = digits_input(5)
    expected = digits_reference(server_repository(server), x)
    result = client.infer("digits_cnn", [infer_input("input", x)], request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    assert result.get_response().id == "r-1" and result.get_response().model_version == "1"
    wanted = [triton.InferRequestedOutput("logits", class_count=2)]
    top = client.infer("digits_cnn", [infer_input("input", x)], outputs=wanted).as_numpy("logits")
    assert top.shape == (5, 2)
    assert [int(row[0].split(b":")[1]) for row in top] == list(expected.argmax(axis=1))
    # Typed contents (not raw) give the same answer.
    request = pb.ModelInferRequest(model_name="digits_cnn", model_version="1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(server.grpc_url) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    (raw,) = reply.raw_output_contents  # outputs always raw, never typed contents
    typed = np.frombuffer(raw, dtype="<f4").reshape(5, 10)
    np.testing.assert_allclose(typed, expected, rtol=1e-5, atol=1e-5)


def server_repository(server: Any) -> Path:
    return Path(server.runtime).parent / "models"


def test_error_codes_are_tritons(client: Any, server: Any) -> None:
    x = digits_input(2)
    good = infer_input("input", x)
    assert code_of(lambda: client.infer("nope", [good]))[0] == "StatusCode.NOT_FOUND"
    status, message = code_of(lambda: client.infer("digits_cnn", [good], model_version="9"))
    assert status == "StatusCode.NOT_FOUND" and "unknown version '9'" in message
    wrong_shape = infer_input("input", np.zeros((2, 64), np.float32))
    status, message = code_of(lambda: client.infer("digits_cnn", [wrong_shape]))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert message == "input 'input': expected shape [-1, 1, 8, 8], got [2, 64]"
    unknown = infer_input("pixels", x)
    status, message = code_of(lambda: client.infer("digits_cnn", [unknown]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "unknown input 'pixels'" in message
    for value in (0.1, 0.5):  # lossy in FP32, or exact: refused alike, as Triton does
        fp64 = infer_input("input", np.full((2, 1, 8, 8), value, np.float64), "FP64")
        status, message = code_of(lambda: client.infer("digits_cnn", [fp64]))  # noqa: B023
        assert status == "StatusCode.INVALID_ARGUMENT"
        assert message == "input 'input': datatype FP64 does not match the model's FP32; send FP32"
    no_output = [triton.InferRequestedOutput("probs")]
    status, message = code_of(lambda: client.infer("digits_cnn", [good], outputs=no_output))
    assert status == "StatusCode.INVALID_ARGUMENT" and "unknown output 'probs'" in message
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="digits_cnn")
        request.inputs.add(name="input", datatype="FP32", shape=[2, 1, 8, 8])
        request.raw_input_contents.append(x.tobytes()[:-4])  # one float short
        with pytest.raises(grpc.RpcError) as short:
            stub.ModelInfer(request)
        assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert short.value.details() == (
            "input 'input': binary data has 508 bytes, shape [2, 1, 8, 8] of FP32 needs 512"
        )
        request.raw_input_contents[0] = x.tobytes()
        request.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
        with pytest.raises(grpc.RpcError) as both:
            stub.ModelInfer(request)
        assert both.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "contents and raw_input_contents in one request" in both.value.details()
        missing = pb.ModelInferRequest(model_name="two_io")
        missing.inputs.add(name="a", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend(
            [1.0, 2.0, 3.0]
        )
        with pytest.raises(grpc.RpcError) as absent:
            stub.ModelInfer(missing)
        assert absent.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "missing input(s)" in absent.value.details()


def test_a_stream_survives_a_bad_request(server: Any) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    x = digits_input(3, seed=1)
    expected = digits_reference(server_repository(server), x)
    with triton.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("digits_cnn", [infer_input("input", x)], request_id="a")
        bad = infer_input("input", np.zeros((3, 7), np.float32))
        client.async_stream_infer("digits_cnn", [bad], request_id="b")
        client.async_stream_infer("digits_cnn", [infer_input("input", x)], request_id="c")
        got = [answers.get(timeout=30) for _ in range(3)]
        client.stop_stream()
    results = {r.get_response().id: r for r, e in got if e is None}
    errors = [e for r, e in got if e is not None]
    assert sorted(results) == ["a", "c"]
    for result in results.values():
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    (error,) = errors
    assert "expected shape [-1, 1, 8, 8], got [3, 7]" in error.message()


def test_a_request_and_an_answer_over_4_mib(server: Any, client: Any) -> None:
    rows = 300_000  # 4.8 MB in (4 FP32 per row), 6 MB out (5 per row)
    x = np.random.default_rng(2).random((rows, 4), dtype=np.float32)
    result = client.infer("linear", [infer_input("x", x)])
    session = ort.InferenceSession(
        str(server_repository(server) / "linear" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    np.testing.assert_allclose(
        result.as_numpy("scores"), session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5
    )


def ready_through_new_channels(server: Any, name: str) -> set[bool]:
    seen = set()
    for _ in range(CHANNELS):
        with triton.InferenceServerClient(server.grpc_url, channel_args=OWN_CONNECTION) as fresh:
            seen.add(fresh.is_model_ready(name))
    return seen


def test_load_and_unload_reach_every_worker_with_the_key(server: Any, client: Any) -> None:
    status, message = code_of(lambda: client.unload_model("linear"))
    assert status == "StatusCode.UNAUTHENTICATED" and "needs the API key" in message
    status, _ = code_of(
        lambda: client.unload_model("linear", headers={"authorization": "Bearer no"})
    )
    assert status == "StatusCode.UNAUTHENTICATED"
    client.unload_model("linear", headers=AUTH)
    try:
        assert ready_through_new_channels(server, "linear") == {False}
        x = infer_input("x", np.zeros((1, 4), np.float32))
        status, message = code_of(lambda: client.infer("linear", [x]))
        assert status == "StatusCode.UNAVAILABLE" and "has no ready version: unloaded" in message
        rest = server.client.post("/v2/models/linear/infer", json={"inputs": []})
        assert rest.status_code == 400  # REST: not transient, so not 503
        index = {(m.name, m.state, m.reason) for m in client.get_model_repository_index().models}
        assert ("linear", "UNAVAILABLE", "unloaded") in index
    finally:
        client.load_model("linear", headers=AUTH)
    assert ready_through_new_channels(server, "linear") == {True}
    status, message = code_of(lambda: client.load_model("nope", headers=AUTH))
    assert status == "StatusCode.NOT_FOUND" and "no model directory 'nope'" in message
    override = '{"max_batch_size": 4}'
    status, message = code_of(lambda: client.load_model("linear", headers=AUTH, config=override))
    assert status == "StatusCode.INVALID_ARGUMENT" and "load parameters ['config']" in message


def test_statistics_and_metrics_count_grpc_requests_of_every_worker(
    server: Any, client: Any
) -> None:
    def grpc_successes() -> float:
        stats = client.get_inference_statistics("two_io", as_json=True)["model_stats"][0]
        return float(stats["inference_stats"]["success"].get("count", 0))

    before = grpc_successes()
    sent = 6
    a = np.ones((1, 3), np.float32)
    for _ in range(sent):
        with triton.InferenceServerClient(server.grpc_url, channel_args=OWN_CONNECTION) as fresh:
            fresh.infer("two_io", [infer_input("a", a), infer_input("b", a)])
    assert grpc_successes() - before == sent
    rest = server.client.get("/v2/models/two_io/stats").json()["model_stats"][0]
    assert rest["inference_stats"]["success"]["count"] == before + sent
    metrics = server.client.get("/metrics").text
    line = next(
        row
        for row in metrics.splitlines()
        if row.startswith("foldserve_inference_requests_total{")
        and 'model="two_io"' in row
        and 'protocol="grpc"' in row
        and 'status="200"' in row
    )
    assert float(line.rsplit(" ", 1)[1]) == before + sent


def digits_counts(client: Any) -> tuple[int, int]:
    """digits_cnn's inferences and ONNX Runtime calls so far (Triton statistics, all workers)."""
    stats = client.get_inference_statistics("digits_cnn", as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_concurrent_calls_batch_over_grpc(server: Any, client: Any, stream: bool) -> None:
    """Concurrent calls on one connection (one worker) share ONNX Runtime calls, as REST
    requests do, and each answer is its own rows. A stream's 64 requests, written by
    grpcio's own thread at once, run as at most 32 calls (the code before the gathering:
    46-61 for 64). 64 unary calls depend on how fast this test process sends them: on a
    loaded machine they trickle in and the server rightly stops waiting (9-36 calls seen
    under load), so they assert batching only (fewer calls than requests). The
    turn-by-turn gathering itself is unit-tested (test_batcher_gathering.py)."""
    calls = 64
    xs = [digits_input(1, seed=100 + i) for i in range(calls)]
    expected = digits_reference(server_repository(server), np.concatenate(xs))
    x_shape = list(xs[0].shape)
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=x_shape)
    requests = [
        pb.ModelInferRequest(
            model_name="digits_cnn", id=str(i), inputs=[tensor], raw_input_contents=[x.tobytes()]
        )
        for i, x in enumerate(xs)
    ]
    before = digits_counts(client)
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        if stream:
            replies = list(stub.ModelStreamInfer(iter(requests), timeout=60))
            assert [r.error_message for r in replies if r.error_message] == []
            answers = [r.infer_response for r in replies]
        else:
            futures = [stub.ModelInfer.future(r, timeout=60) for r in requests]
            answers = [f.result() for f in futures]
    inferences, executions = (a - b for a, b in zip(digits_counts(client), before, strict=True))
    assert len(answers) == calls
    for answer in answers:
        i = int(answer.id)
        logits = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(1, -1)
        np.testing.assert_allclose(logits, expected[i : i + 1], rtol=1e-5, atol=1e-5)
    assert inferences == calls
    most = calls // 2 if stream else calls - 1
    assert executions <= most, f"{calls} calls ran as {executions} ONNX Runtime calls"
