"""The self-check: original and folded graphs run in ONNX Runtime on the same random inputs.

CPUExecutionProvider with graph optimizations disabled, so ORT's own Conv+BN fusion cannot
hide a wrong fold. Inputs follow the declared shapes; a symbolic (or unknown) leading dim
is :data:`SYMBOLIC_DIM`, the others the first of :data:`OTHER_DIMS` the original runs with
(a CNN with dynamic height and width needs more than 2). ORT's CPU provider has no
bfloat16 kernels (and lacks some float16 ones): such graphs run as float32 copies, every
16-bit constant widened exactly, which measures the error of the folded weights
themselves."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from foldserve.model_graph import all_graphs

SYMBOLIC_DIM = 2  # the leading (batch) dim, and every other one when the graph runs so
OTHER_DIMS = (2, 32, 224)  # else tried in turn for the others (a CNN's dynamic H, W)
BATCHES = 4
# Max abs diff allowed, relative to the largest |output| (at least 1): 1e-4, or 10 units in
# the last place of the model's narrowest float type where that is larger (float16: ~1e-2,
# bfloat16: ~8e-2). 1e-4 leaves float32 room for a different summation order over deep
# networks; 10 ulps leave a 16-bit network room for its own rounding at every layer, which
# the folded graph does at different places.
EPSILON: dict[int, float] = {  # machine epsilon (1 ulp at 1.0) of each float type
    onnx.TensorProto.DOUBLE: 2.0**-52,
    onnx.TensorProto.FLOAT: 2.0**-23,
    onnx.TensorProto.FLOAT16: 2.0**-10,
    onnx.TensorProto.BFLOAT16: 2.0**-7,
}
RELATIVE_TOLERANCE = {t: max(1e-4, 10 * eps) for t, eps in EPSILON.items()}
NARROW = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


class CheckError(ValueError):
    """The graph cannot be run by ONNX Runtime at all (so it cannot be verified)."""


@dataclass
class Parity:
    max_abs_diff: float
    output_scale: float  # max |original output|, at least 1
    inputs: str  # how the inputs were made


def weight_type(model: onnx.ModelProto) -> int:
    """The narrowest float type among the model's constants and outputs (sets the tolerance)."""
    found = {t.data_type for g in all_graphs(model.graph) for t in g.initializer}
    found |= {o.type.tensor_type.elem_type for o in model.graph.output}
    for narrow in (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16):
        if narrow in found:
            return narrow
    return onnx.TensorProto.FLOAT if onnx.TensorProto.FLOAT in found else onnx.TensorProto.DOUBLE


def widened(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 copy of a float16/bfloat16 model (constants widened exactly)."""
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    f32 = onnx.TensorProto.FLOAT
    for graph in all_graphs(wide.graph):
        for i, t in enumerate(graph.initializer):
            if t.data_type in NARROW:
                wider = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)
                graph.initializer[i].CopyFrom(wider)
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.tensor_type.elem_type in NARROW:
                info.type.tensor_type.elem_type = f32
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in NARROW:
                    arr = numpy_helper.to_array(attr.t).astype(np.float32)
                    attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))
                elif attr.name == "to" and node.op_type == "Cast" and attr.i in NARROW:
                    attr.i = f32
    return wide


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as err:  # ORT raises its own Fail/NotImplemented/InvalidGraph types
        raise CheckError(f"ONNX Runtime cannot run the model: {err}") from err


def _random_input(arg: ort.NodeArg, rng: np.random.Generator, other: int) -> np.ndarray:
    shape = [
        d if isinstance(d, int) and d >= 0 else (SYMBOLIC_DIM if i == 0 else other)
        for i, d in enumerate(arg.shape)
    ]
    kind = arg.type
    if "float16" in kind:
        return rng.standard_normal(shape).astype(np.float16)
    if "double" in kind:
        return rng.standard_normal(shape)
    if "float" in kind:
        return rng.standard_normal(shape).astype(np.float32)
    if "bool" in kind:
        return rng.integers(0, 2, shape).astype(bool)
    if "int" in kind:
        dtype = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}.get(kind, np.int64)
        return rng.integers(0, 2, shape).astype(dtype)
    raise CheckError(f"input '{arg.name}' has type {kind}, which the self-check cannot make")


def compare(original: onnx.ModelProto, folded: onnx.ModelProto, seed: int) -> Parity:
    """Run both on :data:`BATCHES` random input sets; the max |difference| over all outputs."""
    note = ""
    if weight_type(original) in NARROW:
        try:
            sessions = (_session(original), _session(folded))
        except CheckError:
            sessions = (_session(widened(original)), _session(widened(folded)))
            note = ", run as float32 copies (ORT's CPU provider lacks 16-bit kernels)"
    else:
        sessions = (_session(original), _session(folded))
    other = _runnable_size(sessions[0], seed)
    rng = np.random.default_rng(seed)
    diff, scale = 0.0, 1.0
    for _ in range(BATCHES):
        feeds = {a.name: _random_input(a, rng, other) for a in sessions[0].get_inputs()}
        try:
            expected, got = (s.run(None, feeds) for s in sessions)
        except Exception as err:  # ORT's runtime errors have no common public base class
            raise CheckError(f"ONNX Runtime failed to run the model: {err}") from err
        for e, g in zip(expected, got, strict=True):
            e64, g64 = np.asarray(e, np.float64), np.asarray(g, np.float64)
            if e64.size:
                gap = np.abs(e64 - g64)
                gap[(e64 == g64) | (np.isnan(e64) & np.isnan(g64))] = 0.0  # inf == inf, nan
                diff = max(diff, float(np.max(gap)))
                scale = max(scale, float(np.max(np.abs(e64[np.isfinite(e64)]), initial=0.0)))
    dims = f"{SYMBOLIC_DIM}" if other == SYMBOLIC_DIM else f"{SYMBOLIC_DIM} (leading), {other}"
    inputs = f"{BATCHES} random batches, symbolic dims set to {dims}{note}"
    return Parity(diff, scale, inputs)


def _runnable_size(session: ort.InferenceSession, seed: int) -> int:
    """The first of :data:`OTHER_DIMS` the original graph runs with."""
    symbolic = any(
        not (isinstance(d, int) and d >= 0) for a in session.get_inputs() for d in a.shape[1:]
    )
    error: Exception | None = None
    for other in OTHER_DIMS if symbolic else OTHER_DIMS[:1]:
        rng = np.random.default_rng(seed)
        try:
            session.run(None, {a.name: _random_input(a, rng, other) for a in session.get_inputs()})
            return other
        except Exception as err:  # ORT's runtime errors have no common public base class
            error = err
    raise CheckError(f"ONNX Runtime failed to run the original model: {error}")
