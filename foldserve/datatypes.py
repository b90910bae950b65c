"""The KServe V2 tensor datatypes: their numpy dtypes, ONNX and ONNX Runtime type names,
and the float rounding two runs of one network may differ by in each.

The one table of datatypes: the repository contract (:mod:`foldserve.model_format`),
the codecs, the ONNX folder and training all import it from here."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from onnx import TensorProto

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]

# V2 datatype name -> numpy dtype (little-endian on the wire). BYTES has no fixed dtype.
NUMPY_DTYPES: dict[Datatype, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
V2_DATATYPES: dict[np.dtype[Any], Datatype] = {dt: name for name, dt in NUMPY_DTYPES.items()}

# ONNX's TensorProto element types -> V2 datatype.
ONNX_DATATYPES: dict[int, Datatype] = {
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
}

# ONNX Runtime's type strings (NodeArg.type) -> V2 datatype.
ORT_DATATYPES: dict[str, Datatype] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}

# The float rounding allowed between two computations of one network's outputs in this
# datatype (folded against unfolded, exporter against runtime): a reference batch's
# atol is at least this.
REFERENCE_ATOL: dict[Datatype, float] = {"FP16": 2e-2, "FP32": 1e-4, "FP64": 1e-8}
