"""ONNX files as users bring them: BatchNormalization nodes kept, built with ``onnx.helper``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

CLASSES = 3


def _bn(
    rng: np.random.Generator, name: str, x: str, channels: int
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    params = {
        "scale": rng.uniform(0.5, 2.0, channels),
        "bias": rng.normal(size=channels),
        "mean": rng.normal(size=channels),
        "var": rng.uniform(0.5, 2.0, channels),
    }
    inits = [
        numpy_helper.from_array(v.astype(np.float32), f"{name}.{k}") for k, v in params.items()
    ]
    node = helper.make_node(
        "BatchNormalization", [x, *(f"{name}.{k}" for k in params)], [f"{name}.y"], name=name
    )
    return node, inits


def cnn_with_bn(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """x (``batch``, 3, 8, 8) -> Conv+BN+Relu -> GlobalAveragePool -> Gemm+BN+Relu -> Gemm -> logits
    (N, 3): two BatchNormalization nodes, one after a Conv, one after a Gemm."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32) * 0.5, name)

    bn1, bn1_inits = _bn(rng, "bn1", "conv.y", 4)
    bn2, bn2_inits = _bn(rng, "bn2", "fc1.y", 6)
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["conv.y"], name="conv", pads=[1] * 4),
        bn1,
        helper.make_node("Relu", ["bn1.y"], ["relu1.y"]),
        helper.make_node("GlobalAveragePool", ["relu1.y"], ["pool.y"]),
        helper.make_node("Flatten", ["pool.y"], ["flat.y"]),
        helper.make_node("Gemm", ["flat.y", "fc1.w", "fc1.b"], ["fc1.y"], name="fc1", transB=1),
        bn2,
        helper.make_node("Relu", ["bn2.y"], ["relu2.y"]),
        helper.make_node("Gemm", ["relu2.y", "fc2.w", "fc2.b"], ["logits"], name="fc2", transB=1),
    ]
    inits = [
        init("conv.w", 4, 3, 3, 3),
        init("conv.b", 4),
        init("fc1.w", 6, 4),
        init("fc1.b", 6),
        init("fc2.w", CLASSES, 6),
        init("fc2.b", CLASSES),
        *bn1_inits,
        *bn2_inits,
    ]
    graph = helper.make_graph(
        nodes,
        "user_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    model.producer_name = "a-user-exporter"
    onnx.checker.check_model(model, full_check=True)
    return model


def write_bare(repo: Path, name: str, version: int, data: bytes) -> Path:
    """A version directory holding nothing but the user's ``model.onnx``."""
    version_dir = repo / name / str(version)
    version_dir.mkdir(parents=True)
    (version_dir / "model.onnx").write_bytes(data)
    return version_dir


def run_original(data: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return [np.asarray(y) for y in session.run(None, feeds)]


def batchnorm_count(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def bfloat16_input() -> onnx.ModelProto:
    """x (N, 2) BFLOAT16 -> float32 y: a valid graph whose input V2 cannot carry."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with float16 weights, inputs and outputs."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for init in half.graph.initializer:
        init.CopyFrom(
            numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name)
        )
    for value in [*half.graph.input, *half.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(half, full_check=True)
    return half


def cnn_any_size(seed: int = 0) -> onnx.ModelProto:
    """x (N, 3, H, W) -> Conv+BN -> MaxPool 16x16 -> GlobalAveragePool -> (N, 4, 1, 1): runs
    only when H and W are at least 16."""
    rng = np.random.default_rng(seed)
    bn, bn_inits = _bn(rng, "bn", "conv.y", 4)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "conv.w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "conv.w"], ["conv.y"], name="conv", pads=[1] * 4),
            bn,
            helper.make_node("MaxPool", ["bn.y"], ["pool.y"], kernel_shape=[16, 16]),
            helper.make_node("GlobalAveragePool", ["pool.y"], ["y"]),
        ],
        "any_size",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 1, 1])],
        [w, *bn_inits],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def custom_op() -> onnx.ModelProto:
    """A valid graph with an operator of a custom domain: no ONNX Runtime here runs it."""
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)
