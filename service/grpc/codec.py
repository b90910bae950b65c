"""gRPC tensors: ``ModelInferRequest`` to a decoded request, outputs to ``ModelInferResponse``.

The messages are Triton's ``inference.GRPCInferenceService`` ones, as generated
in ``tritonclient.grpc.service_pb2`` (the server uses the client's own module, so
the wire form is the one Triton's clients speak). An input's values come either
in ``raw_input_contents`` (one little-endian blob per input, in input order: what
``tritonclient.grpc`` sends) or in its typed ``contents`` field, never both in one
request. Outputs always go back in ``raw_output_contents``: ``tritonclient.grpc``
reads outputs from there only. Every problem raises
:class:`~service.errors.BadRequest` naming the tensor, as the REST decoder does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from service.dataplane.tensors import (
    DecodedRequest,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    decode_binary_data,
    tensor_bytes,
    tensor_dtype,
)
from service.errors import BadRequest

# The typed contents field of each datatype (Triton's InferTensorContents); FP16 and BF16
# have none: they travel raw only.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _parameter(param: pb.InferParameter) -> Any:
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def _shape(tensor: pb.ModelInferRequest.InferInputTensor) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise BadRequest(f"input '{tensor.name}': shape {list(shape)} has a negative size")
    return shape


def _typed_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    dtype = tensor_dtype(datatype, f"input '{name}'")
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise BadRequest(
            f"input '{name}': {datatype} has no typed contents field; send it in raw_input_contents"
        )
    shape = _shape(tensor)
    values = getattr(tensor.contents, field)
    if len(values) != math.prod(shape):
        raise BadRequest(
            f"input '{name}': contents.{field} holds {len(values)} values, "
            f"shape {list(shape)} needs {math.prod(shape)}"
        )
    try:
        array = np.array(values, dtype=dtype)
    except OverflowError as err:  # e.g. int_contents of INT8 past 127
        raise BadRequest(f"input '{name}': a value does not fit {datatype}: {err}") from err
    return array.reshape(shape)


def _has_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> bool:
    return bool(tensor.HasField("contents") and tensor.contents.ByteSize() > 0)


def decode_grpc_request(request: pb.ModelInferRequest, timeout_us: int | None) -> DecodedRequest:
    """A ``ModelInferRequest`` as a decoded request; ``timeout_us`` is the call's deadline."""
    raw = request.raw_input_contents
    inputs = []
    if raw:
        if len(raw) != len(request.inputs):
            raise BadRequest(
                f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs "
                "(one per input, in input order)"
            )
        for tensor, blob in zip(request.inputs, raw, strict=True):
            if _has_contents(tensor):
                raise BadRequest(
                    f"input '{tensor.name}': contents and raw_input_contents in one request; "
                    "send each input's values one way"
                )
            array = decode_binary_data(
                tensor.name, tensor.datatype, _shape(tensor), memoryview(blob)
            )
            inputs.append(InputTensor(tensor.name, tensor.datatype, array))
    else:
        for tensor in request.inputs:
            inputs.append(InputTensor(tensor.name, tensor.datatype, _typed_contents(tensor)))
    outputs = None
    if request.outputs:
        outputs = []
        for wanted in request.outputs:
            given = wanted.parameters.get("classification")
            k = 0 if given is None else _parameter(given)
            if type(k) is not int or k < 0:
                raise BadRequest(
                    f"output '{wanted.name}': parameters.classification must be a positive integer"
                )
            outputs.append(RequestedOutput(wanted.name, True, k))
    own = request.parameters.get("timeout")
    timeout = _parameter(own) if own is not None else None
    if timeout is not None and (type(timeout) is not int or timeout < 0):
        raise BadRequest("parameters.timeout must be a non-negative integer (microseconds)")
    deadlines = [t for t in (timeout, timeout_us) if t]
    return DecodedRequest(
        request.id or None, inputs, outputs, True, min(deadlines) if deadlines else None
    )


def encode_grpc_response(
    model: str, version: str, request_id: str, outputs: list[OutputTensor]
) -> pb.ModelInferResponse:
    """The answer, every output's values in ``raw_output_contents``, in output order."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for tensor in outputs:
        response.outputs.add(
            name=tensor.name, datatype=tensor.datatype, shape=list(tensor.array.shape)
        )
        response.raw_output_contents.append(tensor_bytes(tensor))
    return response
