"""The V2 codecs as pure functions: JSON and binary tensors in, numpy out, and back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.http import InferResult
from tritonclient.utils import deserialize_bytes_tensor

from foldserve.datatypes import NUMPY_DTYPES
from service.dataplane.classification import classify
from service.dataplane.tensors import OutputTensor, cast_exact, serialize_bytes_tensor
from service.errors import BadRequest
from service.rest.codec import decode_infer_request, encode_infer_response
from service.rest.json_data import decode_json_data


def binary_body(header: dict, *tensors: np.ndarray) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + b"".join(t.astype(t.dtype.newbyteorder("<")).tobytes() for t in tensors), str(
        len(head)
    )


@pytest.mark.parametrize(
    ("data", "shape"),
    [
        ([1.5, 2.0, -3.25, 4.0, 5.0, 6.0], (2, 3)),  # flat
        ([[1.5, 2.0, -3.25], [4.0, 5.0, 6.0]], (2, 3)),  # nested as the shape
        ([[1.5, 2.0], [-3.25, 4.0], [5.0, 6.0]], (2, 3)),  # nested otherwise: row-major
    ],
)
def test_json_data_flat_or_nested_is_row_major(data: list, shape: tuple[int, ...]) -> None:
    array = decode_json_data("x", "FP32", shape, data)
    assert array.dtype == np.float32 and array.shape == shape
    np.testing.assert_array_equal(array.ravel(), [1.5, 2.0, -3.25, 4.0, 5.0, 6.0])


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("FP32", [1.0, 2.0], "shape [3] needs 3 values, got 2"),
        ("FP32", [[1.0, 2.0], [3.0]], "ragged"),
        ("FP32", ["a", "b", "c"], "FP32 data must hold numbers, got non-numeric values"),
        ("FP32", [True, False, True], "FP32 data must hold numbers, got booleans"),
        ("INT64", [1.0, 2.5, 3.0], "INT64 data must hold integers, got numbers"),
        ("UINT8", [1, 2, 300], "out of range for UINT8"),
        ("FP16", [1.0, 2.0, 1e6], "out of range for FP16"),
        ("BOOL", [0, 1, 1], "BOOL data must hold booleans, got integers"),
        ("BYTES", [1, 2, 3], "datatype BYTES is not supported"),
        ("FLOAT", [1, 2, 3], "unknown datatype 'FLOAT'"),
        ("FP32", {"a": 1}, "data must be a list"),
    ],
)
def test_json_data_errors_name_the_problem(datatype: str, data: object, message: str) -> None:
    with pytest.raises(BadRequest, match="input 'x'") as err:
        decode_json_data("x", datatype, (3,), data)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("values", "source", "target", "exact"),
    [
        ([1, 2, -16_777_216], "INT64", "FP32", True),  # |v| <= 2**24: exact in FP32
        ([16_777_217], "INT64", "FP32", False),
        ([0.5, -1.25, 3.0], "FP64", "FP32", True),
        ([0.1], "FP64", "FP32", False),
        ([1e300], "FP64", "FP32", False),
        ([float("nan"), 1.0], "FP64", "FP32", True),
        ([0.5, 2.0], "FP16", "FP32", True),
        ([True, False], "BOOL", "FP32", True),
        ([255, 0], "UINT8", "FP32", True),
        ([3.0, -2.0], "FP32", "INT64", True),
        ([3.5], "FP32", "INT64", False),
        ([float("nan")], "FP32", "INT64", False),
        ([2, 1], "INT64", "BOOL", False),
        ([2**63 - 1], "INT64", "FP64", False),
    ],
)
def test_cast_exact_accepts_only_lossless(
    values: list, source: str, target: str, exact: bool
) -> None:
    array = np.array(values, dtype=NUMPY_DTYPES[source])
    out = cast_exact(array, NUMPY_DTYPES[target])
    assert (out is not None) == exact
    if out is not None:
        assert out.dtype == NUMPY_DTYPES[target]
        np.testing.assert_array_equal(out.astype(array.dtype), array)


def test_binary_request_decodes_each_input_in_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[1, -2], [3, -4]], dtype=np.int64)
    header = {
        "id": "r1",
        "inputs": [
            {
                "name": "a",
                "shape": [2, 3],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 24},
            },
            {"name": "j", "shape": [1], "datatype": "FP32", "data": [7.0]},
            {
                "name": "b",
                "shape": [2, 2],
                "datatype": "INT64",
                "parameters": {"binary_data_size": 32},
            },
        ],
        "outputs": [{"name": "o", "parameters": {"binary_data": True, "classification": 2}}],
        "parameters": {"binary_data_output": True},
    }
    body, length = binary_body(header, a, b)
    request = decode_infer_request(body, length)
    assert request.id == "r1" and request.binary_output
    assert [t.name for t in request.inputs] == ["a", "j", "b"]
    np.testing.assert_array_equal(request.inputs[0].array, a)
    np.testing.assert_array_equal(request.inputs[1].array, [7.0])
    np.testing.assert_array_equal(request.inputs[2].array, b)
    assert request.outputs is not None
    assert (request.outputs[0].binary, request.outputs[0].classification) == (True, 2)


def _input(size: int | None = 24, **extra: object) -> dict:
    tensor = {"name": "a", "shape": [2, 3], "datatype": "FP32", **extra}
    if size is not None:
        tensor["parameters"] = {"binary_data_size": size}
    return tensor


@pytest.mark.parametrize(
    ("header", "payload", "length", "message"),
    [
        ({"inputs": [_input()]}, 0, None, "binary_data_size needs the Inference-Header-Content"),
        ({"inputs": [_input()]}, 24, None, "binary tensors after the JSON need the Inference-"),
        (
            {"inputs": [_input(20)]},
            20,
            "auto",
            "binary data has 20 bytes, shape [2, 3] of FP32 needs 24",
        ),
        ({"inputs": [_input()]}, 20, "auto", "binary_data_size 24 exceeds the 20 bytes left"),
        ({"inputs": [_input()]}, 28, "auto", "4 bytes after the binary tensors belong to no input"),
        ({"inputs": [_input()]}, 24, "abc", "must be an integer, got 'abc'"),
        ({"inputs": [_input()]}, 24, "999999", "outside the body"),
        ({"inputs": [_input(None)]}, 0, None, "needs 'data' or parameters.binary_data_size"),
        ({"inputs": []}, 0, None, "'inputs' must be a non-empty list"),
        ({"inputs": [_input(shape=[2, -3])]}, 24, "auto", "'shape' must be a list of non-negative"),
        (
            {"inputs": [_input(None, data=[1] * 6, parameters={"shared_memory_region": "r"})]},
            0,
            None,
            "shared memory is not supported",
        ),
        (
            {
                "inputs": [_input(None, data=[1] * 6)],
                "outputs": [{"name": "o", "parameters": {"classification": -1}}],
            },
            0,
            None,
            "classification must be a positive integer",
        ),
        ({"inputs": [_input(None, data=[1] * 6)], "id": 5}, 0, None, "'id' must be a string"),
    ],
)
def test_binary_request_errors(
    header: dict, payload: int, length: str | None, message: str
) -> None:
    head = json.dumps(header).encode()
    body = head + bytes(payload)
    if length == "auto":
        length = str(len(head))
    with pytest.raises(BadRequest) as err:
        decode_infer_request(body, length)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "request body is not valid JSON"),
        (b"[1, 2]", "request body must be a JSON object, got list"),
        (b"[" * 100_000, "request body is not valid JSON"),  # recursion depth, not a crash
        (b"\xff\xfe\x00", "request body is not valid JSON"),
    ],
)
def test_malformed_json_is_a_bad_request(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        decode_infer_request(body, None)


def test_response_roundtrips_through_tritonclient() -> None:
    """Binary and JSON outputs in one response, read back by tritonclient's own parser."""
    floats = np.array([[0.1, -2.5, 3e-8]], dtype=np.float32)
    ints = np.array([1, 2, 3], dtype=np.int64)
    labels = np.array([[b"0.9:1:cat", b"0.1:0:dog"]], dtype=object)
    encoded = encode_infer_response(
        "m",
        "3",
        "req",
        [
            OutputTensor("f", "FP32", floats, binary=True),
            OutputTensor("i", "INT64", ints, binary=False),
            OutputTensor("c", "BYTES", labels, binary=True),
        ],
    )
    assert encoded.header_length is not None
    result = InferResult.from_response_body(encoded.body, header_length=encoded.header_length)
    assert result.get_response()["model_version"] == "3" and result.get_response()["id"] == "req"
    np.testing.assert_array_equal(result.as_numpy("f"), floats)
    np.testing.assert_array_equal(result.as_numpy("i"), ints)
    assert result.as_numpy("c").tolist() == labels.tolist()


def test_all_json_response_has_no_header_length() -> None:
    encoded = encode_infer_response(
        "m", "1", "x", [OutputTensor("f", "FP32", np.float32([[0.1, 0.2]]), binary=False)]
    )
    assert encoded.header_length is None
    body = json.loads(encoded.body)
    assert body["outputs"][0]["shape"] == [1, 2]
    np.testing.assert_array_equal(np.float32(body["outputs"][0]["data"]), np.float32([0.1, 0.2]))


def test_bytes_tensor_serialization_matches_tritonclient() -> None:
    items = np.array([b"a", b"", "\u00e9".encode()], dtype=object)
    assert deserialize_bytes_tensor(serialize_bytes_tensor(items)).tolist() == items.tolist()


def test_classification_is_triton_formatted_top_k() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [3.0, -1.0, 2.0]], dtype=np.float32)
    top = classify(scores, 2, ["a", "b", "c"])
    assert top.shape == (2, 2)
    assert top.tolist() == [[b"0.700000:1:b", b"0.200000:2:c"], [b"3.000000:0:a", b"2.000000:2:c"]]
    unlabeled = classify(scores, 5, [])  # K is capped at the class count
    assert unlabeled.shape == (2, 3) and unlabeled[0, 0] == b"0.700000:1"
