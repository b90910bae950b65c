"""The KServe V2 tensor datatypes and their numpy dtypes (part of the repository contract:
:mod:`service.model_format` re-exports them)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

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
