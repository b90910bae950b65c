"""JSON tensor ``data`` (already parsed by orjson) to numpy, exactly and fast.

A flat list of numbers for a floating-point tensor, the common case and the
expensive one (an image is thousands of numbers), goes through
``array.array("d", data)``: one C loop that accepts only real numbers, cheaper
than ``np.asarray``'s type discovery. Whatever it cannot settle
exactly as ``np.asarray`` would (nested lists, a non-number, an all-boolean
list, an integer beyond 2**53) takes the general path, which gives the
answer or the error it always gave. Errors name the tensor and, for a value
of the wrong kind, the first such value and where it is.

Parsing the text straight into a numpy buffer was measured and lost: numpy's
own text parsers are several times slower than orjson on such a list
(``docs/throughput.md`` has the numbers).
"""

from __future__ import annotations

import array
import math
from typing import Any

import numpy as np
import orjson

from service.dataplane.tensors import cast_exact, tensor_dtype
from service.errors import BadRequest

JSON_KINDS = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}
JSON_ACCEPTS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}  # parsed kinds by tensor kind
FLOAT_MAX = {size: float(np.finfo(f"f{size}").max) for size in (2, 4, 8)}  # by itemsize
EXACT_INTEGERS = float(2**53)  # a float64 holds every integer up to this one exactly


def _flat_floats(data: list[Any], dtype: np.dtype[Any]) -> np.ndarray | None:
    """``data`` as ``dtype`` (a float type) when it is a flat list of numbers that
    ``np.asarray`` would read as the same values; None when the general path must decide."""
    if type(data[0]) is bool:  # all booleans is refused by the general path: let it say so
        return None
    try:
        values = np.frombuffer(array.array("d", data), np.float64)
    except TypeError:  # a nested list, a string, null...
        return None
    # An integer beyond 2**53 (or a value out of range) is not settled here: np.asarray keeps
    # an all-integer list as int64, and int64 -> float32 rounds once where this path would
    # round twice. Below 2**53 every integer is exact in float64 and both agree.
    limit = min(EXACT_INTEGERS, FLOAT_MAX[dtype.itemsize])
    if not (values.max() <= limit and values.min() >= -limit):  # cheaper than abs().max()
        return None
    return values.astype(dtype)


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "b"
    if isinstance(value, int):
        return "i"
    if isinstance(value, float):
        return "f"
    return "?"  # a string, null, an object: never accepted


def first_unaccepted(data: list[Any], accepts: str) -> tuple[Any, list[int], int] | None:
    """The first value (row-major) whose JSON kind is not in ``accepts``: the value, its
    position in the nested lists, and its flat index; None when every value is accepted."""
    flat = 0

    def walk(items: list[Any], path: list[int]) -> tuple[Any, list[int], int] | None:
        nonlocal flat
        for i, item in enumerate(items):
            if isinstance(item, list):
                found = walk(item, [*path, i])
                if found is not None:
                    return found
                continue
            if _json_kind(item) not in accepts:
                return item, [*path, i], flat
            flat += 1
        return None

    return walk(data, [])


def _describe(found: tuple[Any, list[int], int] | None) -> str:
    if found is None:
        return ""
    value, path, flat = found
    shown = orjson.dumps(value, default=repr).decode()
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    where = "data" + "".join(f"[{i}]" for i in path)
    return f": {shown} at {where}" + (f" (flat index {flat})" if len(path) > 1 else "")


def json_array(data: Any, datatype: str, where: str) -> np.ndarray:
    """JSON values (a list, nested or flat) as an array of ``datatype``, in their own shape.

    Numbers become floats freely (JSON decimals are approximations anyway);
    integer and BOOL tensors must hold integers and booleans that fit.
    """
    dtype = tensor_dtype(datatype, where)
    if not isinstance(data, list):
        raise BadRequest(f"{where}: data must be a list, got {type(data).__name__}")
    if dtype.kind == "f" and data:
        fast = _flat_floats(data, dtype)
        if fast is not None:
            return fast
    try:
        parsed = np.asarray(data)
    except ValueError as err:
        raise BadRequest(f"{where}: data is ragged (nested lists of unequal length)") from err
    if parsed.size == 0:
        return parsed.astype(dtype)
    if parsed.dtype.kind not in JSON_ACCEPTS[dtype.kind]:
        got = JSON_KINDS.get(parsed.dtype.kind, "non-numeric values")
        first = _describe(first_unaccepted(data, JSON_ACCEPTS[dtype.kind]))
        raise BadRequest(
            f"{where}: {datatype} data must hold {JSON_KINDS[dtype.kind]}, got {got}{first}"
        )
    if dtype.kind == "f":
        # JSON has no NaN or infinity, so every parsed value must fit (checked before casting:
        # a cast that overflows warns).
        if not np.abs(parsed).max() <= FLOAT_MAX[dtype.itemsize]:
            raise BadRequest(f"{where}: a value is out of range for {datatype}")
        return parsed.astype(dtype)
    converted = cast_exact(parsed, dtype)
    if converted is None:
        raise BadRequest(f"{where}: a value is out of range for {datatype}")
    return converted


def decode_json_data(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major) as an array of ``datatype`` and ``shape``."""
    array_ = json_array(data, datatype, f"input '{name}'")
    size = math.prod(shape)
    if array_.size != size:
        raise BadRequest(
            f"input '{name}': shape {list(shape)} needs {size} values, got {array_.size}"
        )
    return array_.reshape(shape)
