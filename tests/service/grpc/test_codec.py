"""gRPC tensors to and from the data plane's form (pure functions, no server)."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from service.dataplane.tensors import OutputTensor
from service.errors import BadRequest
from service.grpc.codec import decode_grpc_request, encode_grpc_response


def request_with(datatype: str, shape: list[int]) -> tuple[pb.ModelInferRequest, object]:
    request = pb.ModelInferRequest(model_name="m", id="q")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=shape)
    return request, tensor


def test_typed_contents_of_each_kind_decode_to_their_values() -> None:
    cases = [
        ("FP32", "fp32_contents", [0.5, -1.25], np.float32),
        ("FP64", "fp64_contents", [0.1, 2.0], np.float64),
        ("INT8", "int_contents", [-128, 127], np.int8),
        ("INT64", "int64_contents", [-(2**40), 7], np.int64),
        ("UINT16", "uint_contents", [0, 65535], np.uint16),
        ("BOOL", "bool_contents", [True, False], np.bool_),
    ]
    for datatype, field, values, dtype in cases:
        request, tensor = request_with(datatype, [1, 2])
        getattr(tensor.contents, field).extend(values)
        decoded = decode_grpc_request(request, None)
        (x,) = decoded.inputs
        assert x.array.dtype == dtype and x.array.shape == (1, 2)
        np.testing.assert_array_equal(x.array, np.array([values], dtype=dtype))
        assert decoded.id == "q" and decoded.outputs is None and decoded.timeout_us is None


def test_raw_contents_are_little_endian_views() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    request, _ = request_with("FP32", [2, 3])
    request.raw_input_contents.append(values.astype("<f4").tobytes())
    (x,) = decode_grpc_request(request, None).inputs
    np.testing.assert_array_equal(x.array, values)


@pytest.mark.parametrize(
    ("datatype", "field", "values", "message"),
    [
        (
            "FP32",
            "fp32_contents",
            [1.0],
            "contents.fp32_contents holds 1 values, shape [1, 2] needs 2",
        ),
        ("INT8", "int_contents", [1, 300], "a value does not fit INT8"),
        ("FP16", "fp32_contents", [1.0, 2.0], "FP16 has no typed contents field"),
        ("COMPLEX", "fp32_contents", [1.0, 2.0], "unknown datatype 'COMPLEX'"),
    ],
)
def test_bad_typed_contents_name_the_problem(
    datatype: str, field: str, values: list[float], message: str
) -> None:
    request, tensor = request_with(datatype, [1, 2])
    getattr(tensor.contents, field).extend(values)
    with pytest.raises(BadRequest) as raised:
        decode_grpc_request(request, None)
    assert message in raised.value.message


def test_raw_blobs_must_match_the_inputs() -> None:
    request, _ = request_with("FP32", [1, 2])
    request.inputs.add(name="y", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    with pytest.raises(BadRequest, match="holds 1 tensors for 2 inputs"):
        decode_grpc_request(request, None)


def test_deadline_parameters_and_requested_outputs() -> None:
    request, tensor = request_with("FP32", [1, 1])
    tensor.contents.fp32_contents.append(1.0)
    request.parameters["timeout"].int64_param = 5_000
    wanted = request.outputs.add(name="scores")
    wanted.parameters["classification"].int64_param = 3
    decoded = decode_grpc_request(request, 2_000)  # the call's deadline is sooner
    assert decoded.timeout_us == 2_000
    assert decoded.outputs is not None
    assert [(o.name, o.classification) for o in decoded.outputs] == [("scores", 3)]
    assert decode_grpc_request(request, None).timeout_us == 5_000
    request.parameters["timeout"].string_param = "soon"
    with pytest.raises(BadRequest, match="parameters.timeout must be"):
        decode_grpc_request(request, None)


def test_answers_carry_every_output_raw_in_order() -> None:
    scores = np.array([[1.5, -2.0]], np.float32)
    top = np.array([[b"1.500000:0:a"]], dtype=object)
    response = encode_grpc_response(
        "m",
        "3",
        "q",
        [OutputTensor("scores", "FP32", scores, True), OutputTensor("top", "BYTES", top, True)],
    )
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "q")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("scores", "FP32", [1, 2]),
        ("top", "BYTES", [1, 1]),
    ]
    raw_scores, raw_top = response.raw_output_contents
    np.testing.assert_array_equal(np.frombuffer(raw_scores, "<f4").reshape(1, 2), scores)
    assert raw_top == len(b"1.500000:0:a").to_bytes(4, "little") + b"1.500000:0:a"
    assert not any(o.HasField("contents") for o in response.outputs)
