"""Hand-built ONNX graphs with BatchNormalization (or its Mul/Add form) in every pattern the
ONNX folder handles or refuses, in float32, float16 or bfloat16. Shared by
tests/foldserve/test_onnx_fold.py and bench/onnx_fold_tools.py (the tool comparison)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
}
IR_VERSION = 10  # what the ONNX Runtime here reads (opset 22 needs IR 10)


class Builder:
    """Nodes and initializers of one graph in one dtype, with reproducible random weights."""

    def __init__(self, dtype: str = "float32", seed: int = 0) -> None:
        self.type = DTYPES[dtype]
        self.np_type = helper.tensor_dtype_to_np_dtype(self.type)
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.count = 0

    def const(self, name: str, shape: list[int], low: float | None = None) -> str:
        """An initializer: standard normal, or uniform in [low, low + 1] when ``low`` is set."""
        values = (
            self.rng.standard_normal(shape)
            if low is None
            else self.rng.uniform(low, low + 1, shape)
        )
        self.inits.append(numpy_helper.from_array(values.astype(self.np_type), name))
        return name

    def input(self, name: str, shape: list[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, self.type, shape))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs: Any) -> str:
        self.count += 1
        name = f"{op.lower()}{self.count}"
        outputs = [name if i == 0 else f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return name

    def bn(
        self, x: str, c: int, params_as: str = "initializer", n_out: int = 1, **attrs: Any
    ) -> str:
        """BatchNormalization over ``c`` channels with non-trivial statistics."""
        k = self.count + 1
        names = [f"bn{k}_{p}" for p in ("scale", "bias", "mean", "var")]
        lows: list[float | None] = [0.5, None, None, 0.5]
        for name, low in zip(names, lows, strict=True):
            self.const(name, [c], low)
        if params_as == "constant_nodes":
            for name in names:
                tensor = self.inits.pop(next(i for i, t in enumerate(self.inits) if t.name == name))
                self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        elif params_as == "inputs":
            for name in names:
                self.inits = [t for t in self.inits if t.name != name]
                self.input(name, [c])
        return self.node("BatchNormalization", [x, *names], n_out, epsilon=1e-3, **attrs)

    def conv(self, x: str, cin: int, cout: int, k: int = 3, pad: int = 1, group: int = 1) -> str:
        w = self.const(f"w{self.count + 1}", [cout, cin // group, k, k])
        b = self.const(f"b{self.count + 1}", [cout])
        return self.node("Conv", [x, w, b], pads=[pad] * 4, group=group)

    def model(self, outputs: list[str], opset: int = 17) -> onnx.ModelProto:
        if self.type == TensorProto.BFLOAT16 and opset < 22:
            opset = 22  # Conv and friends accept bfloat16 from opset 22
        graph = helper.make_graph(
            self.nodes,
            "g",
            self.inputs,
            [helper.make_tensor_value_info(o, self.type, None) for o in outputs],
            self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = IR_VERSION
        return with_output_shapes(m)


def with_output_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Graph (and If branch) outputs typed with the shapes ONNX's inference gives them."""
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in inferred.graph.value_info}
    for graph in (inferred.graph,):
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    known.update({v.name: v for v in attr.g.value_info})
                    for out in attr.g.output:
                        if out.name in known:
                            out.CopyFrom(known[out.name])
    for out in inferred.graph.output:
        if not out.type.tensor_type.HasField("shape") and out.name in known:
            out.CopyFrom(known[out.name])
    del inferred.graph.value_info[:]
    return inferred


def _conv_bn(b: Builder, opset: int = 17) -> onnx.ModelProto:
    x = b.input("x", ["N", 3, 8, 8])
    return b.model([b.node("Relu", [b.bn(b.conv(x, 3, 4), 4)])], opset)


def _conv_nobias_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("x", ["N", 3, 8, 8])
    return b.model([b.bn(b.node("Conv", [x, b.const("w", [4, 3, 3, 3])], pads=[1] * 4), 4)])


def _conv_transpose_bn(b: Builder, group: int = 1) -> onnx.ModelProto:
    x = b.input("x", ["N", 4, 5, 5])
    w = b.const("w", [4, 3, 3, 3])  # (Cin, Cout/g, k, k)
    y = b.node("ConvTranspose", [x, w, b.const("b", [3 * group])], group=group, strides=[2, 2])
    return b.model([b.bn(y, 3 * group)])


def _gemm_bn(
    b: Builder, trans_b: int = 0, with_c: bool = True, c_shape: tuple[int, ...] = (6,)
) -> onnx.ModelProto:
    x = b.input("x", ["N", 8])
    w = b.const("w", [6, 8] if trans_b else [8, 6])
    c = [b.const("c", list(c_shape))] if with_c else []
    y = b.node("Gemm", [x, w, *c], transB=trans_b, alpha=0.5, beta=2.0)
    return b.model([b.bn(y, 6)])


def _matmul_bn(b: Builder, bias: bool = False) -> onnx.ModelProto:
    x = b.input("x", ["N", 8])
    y = b.node("MatMul", [x, b.const("w", [8, 6])])
    if bias:
        y = b.node("Add", [y, b.const("bias", [6])])
    return b.model([b.bn(y, 6)])


def _bn_gemm(b: Builder, trans_b: int = 1) -> onnx.ModelProto:
    x = b.input("x", ["N", 8])
    w = b.const("w", [6, 8] if trans_b else [8, 6])
    return b.model([b.node("Gemm", [b.bn(x, 8), w, b.const("c", [6])], transB=trans_b)])


def _bn_matmul(b: Builder) -> onnx.ModelProto:
    x = b.input("x", ["N", 8])
    return b.model([b.node("MatMul", [b.bn(x, 8), b.const("w", [8, 6])])])


def _bn_conv(b: Builder, group: int = 1) -> onnx.ModelProto:
    x = b.input("x", ["N", 4, 8, 8])
    return b.model([b.conv(b.bn(x, 4), 4, 4, pad=0, group=group)])


def _mul_add(b: Builder, x: str, shape: list[int], mul: bool = True, add: bool = True) -> str:
    if mul:
        x = b.node("Mul", [x, b.const(f"scale{b.count + 1}", shape, 0.5)])
    if add:
        x = b.node("Add", [x, b.const(f"shift{b.count + 1}", shape)])
    return x


def _conv_mul_add(
    b: Builder, mul: bool = True, add: bool = True, group: int = 1
) -> onnx.ModelProto:
    """A bias-free Conv then BN as Mul/Add (tf2onnx leaves this after depthwise convs)."""
    x = b.input("x", ["N", 4, 8, 8])
    y = b.node("Conv", [x, b.const("w", [4, 4 // group, 3, 3])], pads=[1] * 4, group=group)
    return b.model([_mul_add(b, y, [4, 1, 1], mul, add)])


def _linear_mul_add(b: Builder, op: str) -> onnx.ModelProto:
    x = b.input("x", ["N", 8])
    y = b.node(op, [x, b.const("w", [8, 6])])
    return b.model([_mul_add(b, y, [6])])


def _matmul3d_mul_add(b: Builder) -> onnx.ModelProto:
    """A MatMul on (N, T, K) activations, scaled and shifted per output feature."""
    y = b.node("MatMul", [b.input("x", ["N", 5, 8]), b.const("w", [8, 6])])
    return b.model([_mul_add(b, y, [6])])


def _mul_add_linear(b: Builder, op: str) -> onnx.ModelProto:
    x = _mul_add(b, b.input("x", ["N", 8]), [8])
    return b.model([b.node(op, [x, b.const("w", [8, 6])])])


def _mul_add_conv(b: Builder) -> onnx.ModelProto:
    x = _mul_add(b, b.input("x", ["N", 4, 8, 8]), [4, 1, 1])
    return b.model([b.conv(x, 4, 6, pad=0)])


def _concat_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("x", ["N", 4, 8, 8])
    parts = [b.conv(x, 4, 2, 3, 1), b.conv(x, 4, 3, 5, 2), b.conv(x, 4, 1, 1, 0)]
    return b.model([b.bn(b.node("Concat", parts, axis=1), 6)])


def _bn_in_if(b: Builder) -> onnx.ModelProto:
    """Conv+BN in both branches of an If; the branches read the outer input and weights."""
    x = b.input("x", ["N", 3, 8, 8])
    b.inputs.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    branches = []
    for name in ("then", "else"):
        inner = Builder({v: k for k, v in DTYPES.items()}[b.type], seed=len(branches) + 1)
        inner.count = 100 * (len(branches) + 1)  # names unique across the branches
        y = inner.bn(inner.conv(x, 3, 4), 4)
        out = helper.make_tensor_value_info(y, b.type, None)
        branches.append(helper.make_graph(inner.nodes, name, [], [out], inner.inits))
    y = b.node("If", ["flag"], then_branch=branches[0], else_branch=branches[1])
    return b.model([y])


def _conv_bn_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("x", ["N", 3, 8, 8])
    return b.model([b.bn(b.bn(b.conv(x, 3, 4), 4), 4)])


def _initializers_as_inputs(b: Builder) -> onnx.ModelProto:
    """Every initializer also listed as a graph input (keep_initializers_as_inputs)."""
    y = b.bn(b.conv(b.input("x", ["N", 3, 8, 8]), 3, 4), 4)
    b.inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in b.inits]
    return b.model([y])


# Patterns that must fold to zero BN (and zero constant Mul/Add beyond a layer's bias).
PATTERNS: dict[str, Callable[[Builder], onnx.ModelProto]] = {
    "conv_bn": _conv_bn,
    "conv_bn_opset7": lambda b: _conv_bn(b, 7),  # BN-7: the spatial attribute
    "conv_bn_opset9": lambda b: _conv_bn(b, 9),
    "conv_bn_opset14": lambda b: _conv_bn(b, 14),
    "conv_nobias_bn": _conv_nobias_bn,
    "conv_bn_bn": _conv_bn_bn,
    "conv_transpose_bn": _conv_transpose_bn,
    "conv_transpose_grouped_bn": lambda b: _conv_transpose_bn(b, 2),
    "gemm_bn": lambda b: _gemm_bn(b, 0, False),
    "gemm_transb_c_bn": lambda b: _gemm_bn(b, 1, True),
    "gemm_c_bn": lambda b: _gemm_bn(b, 0, True),
    "gemm_c_row_bn": lambda b: _gemm_bn(b, 1, True, (1, 6)),
    "matmul_bn": _matmul_bn,
    "matmul_add_bn": lambda b: _matmul_bn(b, True),
    "bn_gemm": _bn_gemm,
    "bn_gemm_notrans": lambda b: _bn_gemm(b, 0),
    "bn_matmul": _bn_matmul,
    "bn_conv_unpadded": _bn_conv,
    "bn_depthwise_conv_unpadded": lambda b: _bn_conv(b, 4),
    "conv_mul_add": _conv_mul_add,
    "conv_mul": lambda b: _conv_mul_add(b, add=False),
    "conv_add": lambda b: _conv_mul_add(b, mul=False),
    "depthwise_conv_mul_add": lambda b: _conv_mul_add(b, group=4),
    "gemm_mul_add": lambda b: _linear_mul_add(b, "Gemm"),
    "matmul_mul_add": lambda b: _linear_mul_add(b, "MatMul"),
    "matmul3d_mul_add": _matmul3d_mul_add,
    "mul_add_gemm": lambda b: _mul_add_linear(b, "Gemm"),
    "mul_add_matmul": lambda b: _mul_add_linear(b, "MatMul"),
    "mul_add_conv_unpadded": _mul_add_conv,
    "concat_bn": _concat_bn,
    "bn_in_if": _bn_in_if,
    "initializers_as_inputs": _initializers_as_inputs,
    "bn_constant_nodes": lambda b: b.model(
        [b.bn(b.conv(b.input("x", ["N", 3, 8, 8]), 3, 4), 4, "constant_nodes")]
    ),
}


def build(pattern: str, dtype: str = "float32", seed: int = 0) -> onnx.ModelProto:
    return PATTERNS[pattern](Builder(dtype, seed))


def op_count(model: onnx.ModelProto, op: str) -> int:
    """Nodes of type ``op`` in the model's graph and its subgraphs."""

    def walk(graph: onnx.GraphProto) -> int:
        n = 0
        for node in graph.node:
            n += node.op_type == op
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    n += walk(attr.g)
        return n

    return walk(model.graph)


def _layer_output_shared(b: Builder) -> onnx.ModelProto:
    y = b.conv(b.input("x", ["N", 3, 8, 8]), 3, 4)
    return b.model([b.bn(y, 4), b.node("Relu", [y])])


def _bn_output_shared(b: Builder) -> onnx.ModelProto:
    y = b.bn(b.node("Relu", [b.input("x", ["N", 8])]), 8)
    return b.model([b.node("Gemm", [y, b.const("w", [8, 6])]), b.node("Sigmoid", [y])])


def _weight_fed_at_run_time(b: Builder) -> onnx.ModelProto:
    x = b.input("x", ["N", 3, 8, 8])
    return b.model([b.bn(b.node("Conv", [x, b.input("w", [4, 3, 3, 3])], pads=[1] * 4), 4)])


def _shared_weight(b: Builder) -> onnx.ModelProto:
    """Two Convs read one weight; only the first is followed by BN."""
    x = b.input("x", ["N", 3, 8, 8])
    w = b.const("w", [3, 3, 3, 3])
    y = b.bn(b.node("Conv", [x, w], pads=[1] * 4), 3)
    return b.model([b.node("Conv", [y, w], pads=[1] * 4)])


def _training_mode(b: Builder) -> onnx.ModelProto:
    y = b.conv(b.input("x", ["N", 3, 8, 8]), 3, 4)
    k = b.count + 1
    bn = b.bn(y, 4, n_out=3, training_mode=1)
    assert bn == f"batchnormalization{k}"
    return b.model([bn])


def _padded_conv_after_bn(b: Builder) -> onnx.ModelProto:
    x = b.bn(b.node("Relu", [b.input("x", ["N", 4, 8, 8])]), 4)
    return b.model([b.conv(x, 4, 4, pad=1)])


def _output_in_middle(b: Builder) -> onnx.ModelProto:
    y = b.conv(b.input("x", ["N", 3, 8, 8]), 3, 4)
    return b.model([b.bn(y, 4), y])


def _matmul_3d_bn(b: Builder) -> onnx.ModelProto:
    """BN over axis 1 of a (N, 5, 6) MatMul output: axis 1 is not the weight's channels."""
    y = b.node("MatMul", [b.input("x", ["N", 5, 8]), b.const("w", [8, 6])])
    return b.model([b.bn(y, 5)])


SHARED_WEIGHT = _shared_weight

# name -> (builder, a phrase the kept reason must contain)
REFUSALS: dict[str, tuple[Callable[[Builder], onnx.ModelProto], str]] = {
    "layer_output_shared": (_layer_output_shared, "'conv1' is read by 2 nodes"),
    "bn_output_shared": (_bn_output_shared, "'batchnormalization2' is read by 2 nodes"),
    "weight_fed_at_run_time": (_weight_fed_at_run_time, "'w' of Conv 'conv1' is not a constant"),
    "training_mode": (_training_mode, "training mode"),
    "nonconstant_params": (
        lambda b: b.model([b.bn(b.conv(b.input("x", ["N", 3, 8, 8]), 3, 4), 4, "inputs")]),
        "parameters are not constants",
    ),
    "padded_conv_after_bn": (_padded_conv_after_bn, "pads its input (pads=[1, 1, 1, 1])"),
    "graph_output_in_middle": (_output_in_middle, "'conv1' is a graph output"),
    "matmul_3d_bn": (_matmul_3d_bn, "normalizes axis 1, but the layer's channels are axis 2"),
    "bn_gemm_transa": (
        lambda b: b.model(
            [
                b.node(
                    "Gemm",
                    [b.bn(b.node("Relu", [b.input("x", [8, 3])]), 3), b.const("w", [8, 6])],
                    transA=1,
                )
            ]
        ),
        "transposes its input (transA=1)",
    ),
}


def build_refusal(name: str, dtype: str = "float32") -> onnx.ModelProto:
    return REFUSALS[name][0](Builder(dtype))
