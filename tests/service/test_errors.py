"""Every bad input gets a 4xx with {"error": ...} naming the problem, never a 500."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

MAX_REQUEST_BYTES = 1 << 20  # conftest's server limit

DIGIT = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}


def digits(**tensor: Any) -> dict[str, Any]:
    return {"inputs": [{**DIGIT, **tensor}]}


INFER = "/v2/models/digits_cnn/infer"
BINARY_HEAD = json.dumps(
    {"inputs": [{**DIGIT, "data": None, "parameters": {"binary_data_size": 100}}]}
).encode()

CASES: list[tuple[str, str, dict[str, Any], int, str]] = [
    # (id, path, request kwargs, status, message fragment)
    ("unknown model", "/v2/models/nope/infer", {"json": digits()}, 404, "unknown model 'nope'"),
    (
        "unknown version",
        "/v2/models/digits_cnn/versions/7/infer",
        {"json": digits()},
        404,
        "unknown version '7' of model 'digits_cnn'; versions: 1",
    ),
    (
        "non-numeric version",
        "/v2/models/digits_cnn/versions/latest/infer",
        {"json": digits()},
        404,
        "unknown version 'latest'",
    ),
    ("unknown model metadata", "/v2/models/nope", {}, 404, "unknown model 'nope'"),
    ("malformed json", INFER, {"content": b'{"inputs": ['}, 400, "request body is not valid JSON"),
    ("not an object", INFER, {"json": [1, 2]}, 400, "must be a JSON object, got list"),
    ("empty body", INFER, {"content": b""}, 400, "request body is not valid JSON"),
    ("no inputs", INFER, {"json": {"inputs": []}}, 400, "'inputs' must be a non-empty list"),
    (
        "wrong shape",
        INFER,
        {"json": digits(shape=[2, 64], data=[0.0] * 128)},
        400,
        "input 'input': expected shape [-1, 1, 8, 8], got [2, 64]",
    ),
    (
        "too few values",
        INFER,
        {"json": digits(data=[1.0, 2.0, 3.0])},
        400,
        "input 'input': shape [1, 1, 8, 8] needs 64 values, got 3",
    ),
    (
        "huge shape, little data",
        INFER,
        {"json": digits(shape=[10**9, 1, 8, 8])},
        400,
        "needs 64000000000 values, got 64",
    ),
    (
        "batch of zero",
        INFER,
        {"json": digits(shape=[0, 1, 8, 8], data=[])},
        400,
        "batch size must be at least 1",
    ),
    (
        "lossy FP64",
        INFER,
        {"json": digits(datatype="FP64", data=[0.1] * 64)},
        400,
        "input 'input': datatype FP64 does not match the model's FP32; send FP32",
    ),
    (
        "exact FP64",  # the same answer whatever the values: Triton's
        INFER,
        {"json": digits(datatype="FP64", data=[0.5] * 64)},
        400,
        "input 'input': datatype FP64 does not match the model's FP32; send FP32",
    ),
    (
        "lossy INT64",
        INFER,
        {"json": digits(datatype="INT64", data=[2**24 + 1] * 64)},
        400,
        "datatype INT64 does not match the model's FP32",
    ),
    (
        "unknown datatype",
        INFER,
        {"json": digits(datatype="FLOAT32")},
        400,
        "unknown datatype 'FLOAT32'",
    ),
    (
        "string data",
        INFER,
        {"json": digits(data=["x"] * 64)},
        400,
        "FP32 data must hold numbers, got non-numeric values",
    ),
    ("null data", INFER, {"json": digits(data=None)}, 400, "data must be a list, got NoneType"),
    ("ragged data", INFER, {"json": digits(data=[[0.0] * 8] * 7 + [[0.0] * 7])}, 400, "ragged"),
    (
        "unknown input",
        INFER,
        {"json": digits(name="pixels")},
        400,
        "unknown input 'pixels'; model 'digits_cnn' takes 'input'",
    ),
    ("duplicate input", INFER, {"json": {"inputs": [DIGIT, DIGIT]}}, 400, "given twice"),
    (
        "missing input",
        "/v2/models/two_io/infer",
        {
            "json": {
                "inputs": [{"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]
            }
        },
        400,
        "missing input(s) 'b' of model 'two_io'",
    ),
    (
        "inputs disagree on batch",
        "/v2/models/two_io/infer",
        {
            "json": {
                "inputs": [
                    {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
                    {"name": "b", "shape": [2, 3], "datatype": "FP32", "data": [1] * 6},
                ]
            }
        },
        400,
        "inputs disagree on the batch size: [1, 2]",
    ),
    (
        "unknown output",
        INFER,
        {"json": {**digits(), "outputs": [{"name": "probs"}]}},
        400,
        "unknown output 'probs'; model 'digits_cnn' gives 'logits'",
    ),
    (
        "bad classification",
        INFER,
        {
            "json": {
                **digits(),
                "outputs": [{"name": "logits", "parameters": {"classification": "3"}}],
            }
        },
        400,
        "classification must be a positive integer",
    ),
    (
        "binary size mismatch",
        INFER,
        {
            "content": BINARY_HEAD + bytes(100),
            "headers": {"Inference-Header-Content-Length": str(len(BINARY_HEAD))},
        },
        400,
        "binary data has 100 bytes, shape [1, 1, 8, 8] of FP32 needs 256",
    ),
    (
        "header length past body",
        INFER,
        {"json": digits(), "headers": {"Inference-Header-Content-Length": "100000"}},
        400,
        "Inference-Header-Content-Length 100000 is outside the body",
    ),
    (
        "header length not a number",
        INFER,
        {"json": digits(), "headers": {"Inference-Header-Content-Length": "ten"}},
        400,
        "Inference-Header-Content-Length must be an integer",
    ),
    (
        "deeply nested",
        INFER,
        {"content": b'{"inputs": ' + b"[" * 200_000},
        400,
        "request body is not valid JSON",
    ),
    (
        "unknown encoding",
        INFER,
        {"json": digits(), "headers": {"Content-Encoding": "br"}},
        415,
        "Content-Encoding 'br' is not supported",
    ),
    (
        "corrupt gzip",
        INFER,
        {"content": b"not gzip", "headers": {"Content-Encoding": "gzip"}},
        400,
        "request body is not valid gzip",
    ),
    (
        "over the limit",
        INFER,
        {"content": b" " * (MAX_REQUEST_BYTES + 1)},
        413,
        f"exceeds the limit of {MAX_REQUEST_BYTES} bytes",
    ),
    (
        "over the limit, chunked",
        INFER,
        {"content": iter([b" " * (MAX_REQUEST_BYTES // 2)] * 3)},
        413,
        f"request body exceeds the limit of {MAX_REQUEST_BYTES} bytes",
    ),
    (
        "v1 not instances",
        "/v1/models/digits_cnn:predict",
        {"json": {"rows": []}},
        400,
        "'instances' must be a non-empty list",
    ),
    (
        "v1 wrong instance shape",
        "/v1/models/digits_cnn:predict",
        {"json": {"instances": [[0.0] * 63]}},
        400,
        "instances: each instance must have shape [1, 8, 8], got [63]",
    ),
    (
        "v1 multi-input model",
        "/v1/models/two_io:predict",
        {"json": {"instances": [[1, 2, 3]]}},
        400,
        "V1 predict serves single-input models",
    ),
    (
        "v1 unknown model",
        "/v1/models/nope:predict",
        {"json": {"instances": [[1]]}},
        404,
        "unknown model 'nope'",
    ),
    (
        "fastapi validation",
        "/v2/repository/index?ready=maybe",
        {"method": "GET"},
        422,
        "invalid request: query.ready",
    ),
    ("unknown route", "/v3/anything", {"method": "GET"}, 404, "Not Found"),
    (
        "wrong method",
        "/v2/health/live",
        {"method": "DELETE"},
        405,
        "method DELETE is not allowed on /v2/health/live; it takes GET",
    ),
    (
        "load without key",
        "/v2/repository/models/digits_cnn/load",
        {},
        401,
        "this route needs the API key",
    ),
    (
        "load with wrong key",
        "/v2/repository/models/digits_cnn/load",
        {"headers": {"Authorization": "Bearer nope"}},
        401,
        "the API key is wrong",
    ),
    (
        "unload without key",
        "/v2/repository/models/digits_cnn/unload",
        {"headers": {"Authorization": "Basic test-key"}},
        401,
        "needs the API key",
    ),
]


def _send(client: httpx.Client, path: str, kwargs: dict[str, Any]) -> httpx.Response:
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "POST" if "json" in kwargs or "content" in kwargs else "GET")
    if "/repository/models/" in path:
        method = "POST"
    return client.request(method, path, **kwargs)


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_request_gets_its_status_and_message(
    client: httpx.Client, path: str, kwargs: dict[str, Any], status: int, message: str
) -> None:
    r = _send(client, path, kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert "x-request-id" in r.headers
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


def test_server_survives_every_bad_request(client: httpx.Client) -> None:
    """After the whole table above, the server still answers inference correctly."""
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.post(INFER, json=digits()).status_code == 200


@pytest.fixture
def raw_connection(server: Any) -> Iterator[Any]:
    import socket

    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    yield sock
    sock.close()


def test_declared_content_length_over_limit_is_refused_before_the_body(raw_connection: Any) -> None:
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MAX_REQUEST_BYTES * 50}\r\n\r\n"
    )
    raw_connection.sendall(head.encode())  # no body is ever sent
    answer = raw_connection.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413")
    assert f"exceeds the limit of {MAX_REQUEST_BYTES} bytes" in answer
