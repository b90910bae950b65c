"""End to end on a real uvicorn server: answers equal ONNX Runtime run on the file directly."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton

from service.observability.logs import RequestIdFilter, new_request_id
from tests.servers import v2_body

MODELS = {"digits_cnn": (1, 8, 8), "breast_cancer_mlp": (30,)}


def direct(
    repository: Path, name: str, feeds: dict[str, np.ndarray], version: int = 1
) -> list[Any]:
    """The folded file run by ONNX Runtime itself, outside the service."""
    path = repository / name / str(version) / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs: list[Any] = session.run(None, feeds)
    return outputs


def sample(name: str, n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, *MODELS[name])) * 4).astype(np.float32)


@pytest.fixture
def triton_client(server: Any) -> Any:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=10.0)
    yield client
    client.close()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("nested", [False, True])
def test_json_infer_equals_direct_onnxruntime(
    client: httpx.Client, server: Any, name: str, nested: bool
) -> None:
    x = sample(name, 5)
    r = client.post(f"/v2/models/{name}/infer", json=v2_body(x, nested=nested, id="abc"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (name, "1", "abc")
    [out] = body["outputs"]
    expected = direct(server.repository, name, {"input": x})[0]
    assert (out["name"], out["datatype"], out["shape"]) == ("logits", "FP32", list(expected.shape))
    np.testing.assert_allclose(np.float32(out["data"]).reshape(expected.shape), expected, atol=1e-6)


def test_versioned_route_and_generated_id(client: httpx.Client, server: Any) -> None:
    x = sample("digits_cnn", 1)
    r = client.post("/v2/models/digits_cnn/versions/1/infer", json=v2_body(x))
    assert r.status_code == 200
    assert r.json()["model_version"] == "1"
    generated = r.headers["x-request-id"]
    prefix, counter = generated.split("-")  # the server process's random prefix, a counter
    assert prefix == new_request_id().split("-")[0]  # the shared server runs in this process
    again = client.post("/v2/models/digits_cnn/versions/1/infer", json=v2_body(x))
    assert again.headers["x-request-id"].split("-")[0] == prefix
    assert int(again.headers["x-request-id"].split("-")[1], 16) > int(counter, 16)
    assert r.json()["id"] == generated  # no id in the body: the request id answers


def test_request_id_is_echoed_and_logged(client: httpx.Client, server: Any) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign,assignment]
    handler.addFilter(RequestIdFilter())
    access = logging.getLogger("service.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        r = client.get("/v2/health/live", headers={"X-Request-ID": "trace-42"})
        bad = client.get("/v2/health/live", headers={"X-Request-ID": "no spaces allowed"})
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    assert r.headers["x-request-id"] == "trace-42"
    assert bad.headers["x-request-id"] != "no spaces allowed"
    mine = [rec for rec in records if getattr(rec, "request_id", "") == "trace-42"]
    assert mine and "GET /v2/health/live" in mine[0].getMessage()


def test_two_inputs_two_outputs_and_output_selection(client: httpx.Client) -> None:
    a = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    b = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -2.0]], np.float32)
    inputs = [
        {"name": n, "shape": [2, 3], "datatype": "FP32", "data": v.ravel().tolist()}
        for n, v in (("b", b), ("a", a))  # any order
    ]
    both = client.post("/v2/models/two_io/infer", json={"inputs": inputs}).json()
    got = {o["name"]: np.float32(o["data"]).reshape(o["shape"]) for o in both["outputs"]}
    np.testing.assert_array_equal(got["sum"], a + b)
    np.testing.assert_array_equal(got["product"], a * b)
    only = client.post(
        "/v2/models/two_io/infer", json={"inputs": inputs, "outputs": [{"name": "product"}]}
    ).json()
    assert [o["name"] for o in only["outputs"]] == ["product"]


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True])
def test_tritonclient_infer_equals_direct(
    triton_client: Any, server: Any, binary_in: bool, binary_out: bool
) -> None:
    x = sample("digits_cnn", 3, seed=1)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary_in)
    wanted = [triton.InferRequestedOutput("logits", binary_data=binary_out)]
    result = triton_client.infer("digits_cnn", [tensor], outputs=wanted, request_id="t1")
    assert result.get_response()["id"] == "t1"
    expected = direct(server.repository, "digits_cnn", {"input": x})[0]
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-6)


def test_tritonclient_binary_default_outputs_and_multi_io(triton_client: Any) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 0.5, np.float32)
    inputs = []
    for name, value in (("a", a), ("b", b)):
        tensor = triton.InferInput(name, [2, 3], "FP32")
        tensor.set_data_from_numpy(value, binary_data=True)
        inputs.append(tensor)
    result = triton_client.infer("two_io", inputs)  # no outputs: binary_data_output for all
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
    np.testing.assert_array_equal(result.as_numpy("product"), a * b)


@pytest.mark.parametrize("binary_out", [False, True])
def test_tritonclient_classification_top_k(
    triton_client: Any, server: Any, binary_out: bool
) -> None:
    x = sample("digits_cnn", 4, seed=2)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    wanted = [triton.InferRequestedOutput("logits", binary_data=binary_out, class_count=3)]
    top = triton_client.infer("digits_cnn", [tensor], outputs=wanted).as_numpy("logits")
    assert top.shape == (4, 3)
    logits = direct(server.repository, "digits_cnn", {"input": x})[0]
    labels = json.loads((server.repository / "digits_cnn/1/metadata.json").read_text())["labels"]
    for row, scores in zip(top, logits, strict=True):
        entries = [(item.decode() if isinstance(item, bytes) else item).split(":") for item in row]
        indices = [int(e[1]) for e in entries]
        assert indices == list(np.argsort(-scores, kind="stable")[:3])
        assert [e[2] for e in entries] == [labels[i] for i in indices]
        np.testing.assert_allclose([float(e[0]) for e in entries], scores[indices], atol=1e-6)


def test_tritonclient_metadata_and_health(triton_client: Any, server: Any) -> None:
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready("digits_cnn")
    assert not triton_client.is_model_ready("digits_cnn", "9")
    server_meta = triton_client.get_server_metadata()
    assert {"binary_tensor_data", "model_repository"} <= set(server_meta["extensions"])
    meta = triton_client.get_model_metadata("digits_cnn")
    stored = json.loads((server.repository / "digits_cnn/1/metadata.json").read_text())
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["provider"] == "CPUExecutionProvider"
    assert meta["bn_nodes"] == stored["bn_nodes"] and meta["bn_nodes"]["folded"] == 0
    assert meta["fold_report"]["folded"] == len(stored["fold_report"]["folded"]) > 0
    assert meta["labels"] == [str(i) for i in range(10)]
    index = triton_client.get_model_repository_index()
    assert {"name": "digits_cnn", "version": "1", "state": "READY", "reason": ""} in index


@pytest.mark.parametrize(
    ("datatype", "convert"),
    [
        ("INT64", lambda x: np.round(x).astype(np.int64)),
        ("UINT8", lambda x: np.clip(np.round(x), 0, 16).astype(np.uint8)),
        ("FP64", lambda x: (np.round(x * 4) / 4).astype(np.float64)),  # exact in FP32
        ("FP16", lambda x: x.astype(np.float16)),
        ("BOOL", lambda x: x > 0),
    ],
)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_declared_datatype_other_than_the_model_s_is_refused(
    client: httpx.Client, datatype: str, convert: Any, binary: bool
) -> None:
    """Values that FP32 holds exactly, declared as another datatype, are refused as
    Triton refuses them: the same client code must not work on some inputs and fail on
    others (it was accepted when every value converted exactly, refused otherwise)."""
    value = convert(sample("digits_cnn", 2, seed=3))
    tensor = {"name": "input", "shape": [2, 1, 8, 8], "datatype": datatype}
    if binary:
        raw = value.astype(value.dtype.newbyteorder("<")).tobytes()
        head = json.dumps(
            {"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]}
        ).encode()
        r = client.post(
            "/v2/models/digits_cnn/infer",
            content=head + raw,
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
    else:
        r = client.post(
            "/v2/models/digits_cnn/infer",
            json={"inputs": [{**tensor, "data": value.ravel().tolist()}]},
        )
    assert r.status_code == 400, r.text
    assert r.json()["error"] == (
        f"input 'input': datatype {datatype} does not match the model's FP32; send FP32"
    )


@pytest.mark.parametrize("flat", [False, True])
def test_v1_predict_equals_direct(client: httpx.Client, server: Any, flat: bool) -> None:
    x = sample("digits_cnn", 3, seed=4)
    instances = x.reshape(3, -1).tolist() if flat else x.tolist()
    r = client.post("/v1/models/digits_cnn:predict", json={"instances": instances})
    assert r.status_code == 200, r.text
    expected = direct(server.repository, "digits_cnn", {"input": x})[0]
    np.testing.assert_allclose(np.float32(r.json()["predictions"]), expected, atol=1e-6)
    status = client.get("/v1/models/digits_cnn").json()
    assert status["ready"] is True and status["name"] == "digits_cnn"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_request_body(client: httpx.Client, server: Any, encoding: str) -> None:
    import zlib

    x = sample("breast_cancer_mlp", 2)
    raw = json.dumps(v2_body(x)).encode()
    packed = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    r = client.post(
        "/v2/models/breast_cancer_mlp/infer", content=packed, headers={"Content-Encoding": encoding}
    )
    assert r.status_code == 200, r.text
    expected = direct(server.repository, "breast_cancer_mlp", {"input": x})[0]
    np.testing.assert_allclose(
        np.float32(r.json()["outputs"][0]["data"]).reshape(expected.shape), expected, atol=1e-6
    )


def test_io_binding_server_equals_direct(fresh_server: Any) -> None:
    """The IO-binding path end to end (on the CPU here; on a GPU it is the default)."""
    with fresh_server(io_binding="on") as live, live.client() as http:
        assert http.get("/v2/models/digits_cnn").json()["io_binding"] is True
        client = triton.InferenceServerClient(url=f"127.0.0.1:{live.port}", network_timeout=10.0)
        x = sample("digits_cnn", 6, seed=5)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        got = client.infer("digits_cnn", [tensor]).as_numpy("logits")
        client.close()
    np.testing.assert_allclose(
        got, direct(live.repository, "digits_cnn", {"input": x})[0], atol=1e-6
    )
