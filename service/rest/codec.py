"""V2 tensor codecs: request bodies to numpy, numpy to response bodies (pure functions).

A request is either all JSON, or a JSON header of ``Inference-Header-Content-Length``
bytes followed by raw little-endian tensors, one per input whose
``parameters.binary_data_size`` says how many bytes it takes, in input order.
JSON is parsed by orjson and ``data`` goes to numpy in one C loop
(:mod:`service.rest.json_data`); binary tensors are views of the body (no copy).
Responses are written by orjson straight from the numpy outputs. Every
problem raises :class:`~service.errors.BadRequest` naming the tensor and what
was expected.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from foldserve.datatypes import NUMPY_DTYPES
from service.dataplane.tensors import (
    DecodedRequest,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    decode_binary_data,
    tensor_bytes,
)
from service.errors import BadRequest
from service.rest.json_data import decode_json_data


@dataclass(slots=True)
class EncodedResponse:
    body: bytes
    header_length: int | None  # set when binary tensors follow the JSON header


def parse_json_object(raw: bytes | memoryview, what: str) -> dict[str, Any]:
    """``raw`` as a JSON object, or BadRequest saying why not."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise BadRequest(f"{what} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, list):
        for d in value:  # a loop, not all(<genexpr>): this runs for every input of every request
            if type(d) is not int or d < 0:
                break
        else:
            return tuple(value)
    raise BadRequest(f"{where}: 'shape' must be a list of non-negative integers, got {value!r}")


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: 'parameters' must be a JSON object")
    return value


def _requested_outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadRequest("'outputs' must be a list of {'name': ...} objects")
    outputs = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"outputs[{i}] must be an object with a string 'name'")
        where = f"output '{item['name']}'"
        params = _parameters(item.get("parameters"), where)
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise BadRequest(f"{where}: parameters.binary_data must be true or false")
        k = params.get("classification", 0)
        if type(k) is not int or k < 0:
            raise BadRequest(f"{where}: parameters.classification must be a positive integer")
        outputs.append(RequestedOutput(item["name"], binary, k))
    return outputs


def decode_infer_request(body: bytes, header_length: str | None) -> DecodedRequest:
    """Decode a V2 inference body; ``header_length`` is the Inference-Header-Content-Length."""
    view = memoryview(body)
    header: bytes | memoryview = body
    if header_length is None:
        json_end = len(body)
    else:
        try:
            json_end = int(header_length)
        except ValueError as err:
            raise BadRequest(
                f"Inference-Header-Content-Length must be an integer, got {header_length!r}"
            ) from err
        if not 0 < json_end <= len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {json_end} is outside the body of "
                f"{len(body)} bytes"
            )
        header = view[:json_end]
    try:
        request = parse_json_object(header, "request body")
    except BadRequest as err:
        if header_length is None and "content after document" in err.message:
            raise BadRequest(
                f"{err.message}; binary tensors after the JSON need the "
                "Inference-Header-Content-Length header"
            ) from err
        raise
    params = _parameters(request.get("parameters"), "request")
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise BadRequest("parameters.binary_data_output must be true or false")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    timeout = params.get("timeout")
    if timeout is not None and (type(timeout) is not int or timeout < 0):
        raise BadRequest("parameters.timeout must be a whole number of microseconds >= 0")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    offset, inputs = json_end, []
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"inputs[{i}] must be an object with a string 'name'")
        name = item["name"]
        where = f"input '{name}'"
        shape = _shape(item.get("shape"), where)
        datatype = item.get("datatype")
        if datatype is None:
            raise BadRequest(
                f"{where}: 'datatype' is missing; use one of {', '.join(NUMPY_DTYPES)}"
            )
        tensor_params = _parameters(item.get("parameters"), where)
        if "shared_memory_region" in tensor_params:
            raise BadRequest(f"{where}: shared memory is not supported; send the data")
        size = tensor_params.get("binary_data_size")
        if size is None:
            if "data" not in item:
                raise BadRequest(f"{where}: needs 'data' or parameters.binary_data_size")
            array = decode_json_data(name, str(datatype), shape, item["data"])
        else:
            if header_length is None:
                raise BadRequest(
                    f"{where}: binary_data_size needs the Inference-Header-Content-Length header"
                )
            if type(size) is not int or size < 0 or offset + size > len(body):
                raise BadRequest(
                    f"{where}: binary_data_size {size!r} exceeds the "
                    f"{len(body) - offset} bytes left in the body"
                )
            array = decode_binary_data(name, str(datatype), shape, view[offset : offset + size])
            offset += size
        inputs.append(InputTensor(name, str(datatype), array))
    if offset != len(body):
        raise BadRequest(
            f"{len(body) - offset} bytes after the binary tensors belong to no input "
            "(check each binary_data_size)"
        )
    return DecodedRequest(
        request_id,
        inputs,
        _requested_outputs(request.get("outputs")),
        binary_output,
        timeout or None,
    )


def _json_data(tensor: OutputTensor) -> list[Any] | np.ndarray:
    """A flat, native-endian array (orjson writes it without a Python list), or a list."""
    if tensor.datatype == "BYTES":
        return [item.decode("utf-8", "replace") for item in tensor.array.ravel()]
    flat = tensor.array.ravel()
    return flat if flat.dtype.isnative else flat.astype(flat.dtype.newbyteorder("="))


def dump_json(value: Any, arrays: Iterable[np.ndarray]) -> bytes:
    """``value`` (numpy arrays inside, which are ``arrays``) as compact JSON.

    orjson writes the arrays without building Python lists, each float32 with
    the shortest digits that read back as the same float32. It writes NaN and
    infinity as null, so when a ``null`` shows up and an array is not finite,
    Python's json writes the answer instead (NaN, Infinity, as Triton does).
    """
    text = orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    if b"null" not in text or all(a.dtype.kind != "f" or np.isfinite(a).all() for a in arrays):
        return text
    return json.dumps(value, separators=(",", ":"), default=lambda a: a.tolist()).encode()


def encode_infer_response(
    model_name: str, model_version: str, request_id: str, outputs: list[OutputTensor]
) -> EncodedResponse:
    """The V2 response body; binary outputs follow the JSON header in output order."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.array.shape),
        }
        if tensor.binary:
            blob = tensor_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(tensor)
        entries.append(entry)
    header = {
        "model_name": model_name,
        "model_version": model_version,
        "id": request_id,
        "outputs": entries,
    }
    head = dump_json(header, [t.array for t in outputs if not t.binary and t.datatype != "BYTES"])
    if not blobs:
        return EncodedResponse(head, None)
    return EncodedResponse(b"".join([head, *blobs]), len(head))
