"""The tensors every transport decodes a request into and the data plane answers with.

A transport (REST's V2 JSON and binary codec, the V1 codec, gRPC's codec) turns its
wire form into a :class:`DecodedRequest`; the data plane checks it against the model
(:mod:`service.dataplane.validation`), runs it and hands back :class:`OutputTensor`
objects for the transport to encode. What the transports share about a tensor is
defined here once: the check of a wire datatype name (:func:`tensor_dtype`), the
lossless conversion (:func:`cast_exact`), and raw little-endian tensor bytes, which
REST's binary extension and gRPC's ``raw_*_contents`` both carry
(:func:`decode_binary_data`, :func:`tensor_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from foldserve.datatypes import NUMPY_DTYPES
from service.errors import BadRequest


@dataclass(slots=True)
class InputTensor:
    name: str
    datatype: str  # as sent (V2 name)
    array: np.ndarray  # reshaped to the sent shape, dtype of ``datatype``


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: follow the request-level binary_data_output
    classification: int  # top-K; 0 means the raw tensor


@dataclass(slots=True)
class DecodedRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: every model output
    binary_output: bool
    timeout_us: int | None = None  # parameters.timeout (Triton's): deadline in microseconds


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray  # BYTES: object array of ``bytes``
    binary: bool


def tensor_dtype(datatype: Any, where: str) -> np.dtype[Any]:
    """The numpy dtype of a V2 datatype name, or BadRequest saying what to send."""
    if datatype == "BYTES":
        raise BadRequest(f"{where}: datatype BYTES is not supported; these models take numbers")
    if not isinstance(datatype, str) or datatype not in NUMPY_DTYPES:
        raise BadRequest(
            f"{where}: unknown datatype {datatype!r}; use one of {', '.join(NUMPY_DTYPES)}"
        )
    return NUMPY_DTYPES[datatype]


def cast_exact(values: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray | None:
    """``values`` as ``dtype`` when every value survives the round trip, else None."""
    if values.dtype == dtype:
        return values
    with np.errstate(all="ignore"):
        out = values.astype(dtype)
        back = out.astype(values.dtype)
    same = np.array_equal(back, values, equal_nan=values.dtype.kind == "f")
    return out if same else None


def decode_binary_data(
    name: str, datatype: str, shape: tuple[int, ...], raw: memoryview
) -> np.ndarray:
    """Raw little-endian bytes as a (read-only, zero-copy) array of ``shape``."""
    dtype = tensor_dtype(datatype, f"input '{name}'").newbyteorder("<")
    needed = math.prod(shape) * dtype.itemsize
    if len(raw) != needed:
        raise BadRequest(
            f"input '{name}': binary data has {len(raw)} bytes, "
            f"shape {list(shape)} of {datatype} needs {needed}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def serialize_bytes_tensor(array: np.ndarray) -> bytes:
    """BYTES on the wire: each element as a 4-byte little-endian length, then its bytes."""
    parts = []
    for item in array.ravel():
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts.append(len(raw).to_bytes(4, "little"))
        parts.append(raw)
    return b"".join(parts)


def tensor_bytes(tensor: OutputTensor) -> bytes:
    if tensor.datatype == "BYTES":
        return serialize_bytes_tensor(tensor.array)
    little = tensor.array.dtype.newbyteorder("<")
    return np.ascontiguousarray(tensor.array, dtype=little).tobytes()
