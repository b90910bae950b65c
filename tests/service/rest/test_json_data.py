"""JSON tensor data: the fast path gives exactly the general path's values and errors, and
errors name the missing datatype or the first value of the wrong kind."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest

from service.errors import BadRequest
from service.rest import json_data
from service.rest.codec import decode_infer_request


def number_text(rng: random.Random) -> str:
    """A JSON number in one of the forms clients send."""
    kind = rng.randrange(8)
    if kind == 0:
        return str(rng.randint(-1000, 1000))  # integer
    if kind == 1:
        return repr(float(np.float32(rng.gauss(0, 1))))  # float32 as Python writes it
    if kind == 2:
        return f"{rng.uniform(-1e6, 1e6):.6e}"  # exponent, lower case
    if kind == 3:
        return f"{rng.uniform(-1, 1):.3E}".replace("E-0", "E-")  # exponent, upper case
    if kind == 4:
        return rng.choice(["0", "-0", "-0.0", "1e-45", "3.4028234663852886e38", "1E+2"])
    if kind == 5:
        return str(rng.choice([2**53, -(2**53), 2**53 + 1, 2**63 - 1, 2**70]))  # huge integers
    if kind == 6:
        return repr(rng.uniform(-1e-300, 1e-300))  # subnormal in float32, not in float64
    return repr(rng.uniform(-1e30, 1e30))


def general(data: Any, datatype: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """What the general path (np.asarray) answers: an array or the error text."""
    with monkeypatch.context() as patch:
        patch.setattr(json_data, "_flat_floats", lambda data, dtype: None)
        return outcome(data, datatype)


def outcome(data: Any, datatype: str) -> Any:
    try:
        return json_data.json_array(data, datatype, "input 'x'")
    except BadRequest as err:
        return err.message


def same(fast: Any, slow: Any) -> bool:
    if isinstance(fast, str) or isinstance(slow, str):
        return bool(fast == slow)
    return bool(fast.dtype == slow.dtype and fast.shape == slow.shape) and np.array_equal(
        fast.view(np.uint8),
        slow.view(np.uint8),  # bit for bit: -0.0 and 0.0 differ
    )


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "FP64"])
def test_fast_path_equals_the_general_path_on_generated_bodies(
    datatype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(datatype)
    for _ in range(300):
        values = [number_text(rng) for _ in range(rng.randrange(1, 60))]
        data = json.loads("[" + ",".join(values) + "]")  # as orjson would: same numbers
        assert same(outcome(data, datatype), general(data, datatype, monkeypatch)), values


@pytest.mark.parametrize(
    "data",
    [
        [True, False],  # all booleans: refused
        [True, 1.5],  # mixed with a number: a number
        [2, True],
        [1.5, "2.5"],  # a string is never a number
        [1.5, None],
        [1.5, [2.0]],  # ragged
        [[1.5, 2.0], [3.0, 4.0]],  # nested: the general path
        [1e39],  # out of range for FP32
        [2**64],
        [1, 2, 3],
    ],
)
def test_fast_path_equals_the_general_path_on_edge_cases(
    data: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for datatype in ("FP32", "FP16", "FP64"):
        assert same(outcome(data, datatype), general(data, datatype, monkeypatch)), datatype


def test_a_3072_value_body_decodes_exactly_as_orjson_and_numpy() -> None:
    x = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
    tensor = {"name": "x", "shape": [1, 3, 32, 32], "datatype": "FP32"}
    body = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
    (decoded,) = decode_infer_request(body, None).inputs
    assert decoded.array.dtype == np.float32 and decoded.array.shape == (1, 3, 32, 32)
    np.testing.assert_array_equal(decoded.array, x)


def body(**tensor: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [2, 2], **tensor}]}).encode()


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        (
            body(data=[1, 2, 3, 4]),
            "input 'x': 'datatype' is missing; use one of BOOL, UINT8",
        ),
        (
            body(datatype="FP32", data=[1.0, 2.0, "three", 4.0]),
            "input 'x': FP32 data must hold numbers, got non-numeric values: \"three\" at data[2]",
        ),
        (
            body(datatype="FP32", data=[[1.0, 2.0], [None, 4.0]]),
            "got non-numeric values: null at data[1][0] (flat index 2)",
        ),
        (
            body(datatype="FP32", data=[[1.0, 2.0], [3.0, {"v": 4}]]),
            'got non-numeric values: {"v":4} at data[1][1] (flat index 3)',
        ),
        (
            body(datatype="INT64", data=[1, 2, 2.5, 4]),
            "INT64 data must hold integers, got numbers: 2.5 at data[2]",
        ),
        (
            body(datatype="FP32", data=[True, False, True, True]),
            "FP32 data must hold numbers, got booleans: true at data[0]",
        ),
        (body(datatype="FLOAT", data=[1, 2, 3, 4]), "unknown datatype 'FLOAT'; use one of"),
        (
            b'{"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1,2,]}]}',
            "not valid JSON",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [01, 2]}]}',
            "not valid JSON",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [NaN, 2]}]}',
            "not valid JSON",
        ),
    ],
)
def test_errors_name_the_problem_and_where(request_body: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as err:
        decode_infer_request(request_body, None)
    assert message in err.value.message
