"""Per-channel affine sites: a BatchNormalization node, or a run of ``Mul``/``Add`` by
constants (what BN becomes in some exporters). Each is ``y = S * x + T`` with ``S``, ``T``
broadcastable constants; a rule asks for them as ``(C,)`` vectors over one axis."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from foldserve.model_graph import BATCHNORM
from foldserve.onnx_fold.graph import Scope, float_attribute, int_attribute, node_label
from foldserve.onnx_fold.weights import batchnorm_affine


@dataclass
class Site:
    """``nodes`` (in order) compute ``output = scale * input + shift``. A BN's ``scale`` and
    ``shift`` are ``(C,)`` over axis 1 (``channel_axis``); a Mul/Add run's are its constants
    composed, shaped to broadcast numpy-style from the right (``channel_axis`` None)."""

    nodes: list[onnx.NodeProto]
    input: str
    output: str
    scale: np.ndarray
    shift: np.ndarray
    channel_axis: int | None
    kind: str  # "BatchNormalization", "Mul+Add", "Mul", "Add+Mul+Add", ...

    @property
    def label(self) -> str:
        return node_label(self.nodes[0])

    @property
    def is_batchnorm(self) -> bool:
        return self.kind == BATCHNORM

    @property
    def shape(self) -> list[int]:
        """Its parameters' shape: ``[C]`` for a BN, the constants' broadcast shape else."""
        return list(np.broadcast_shapes(self.scale.shape, self.shift.shape))

    def per_channel(
        self, axis: int, rank: int, channels: int
    ) -> tuple[np.ndarray, np.ndarray] | str:
        """``(s, t)`` as ``(channels,)`` vectors if the site varies only along ``axis`` of a
        rank-``rank`` tensor (and does not broadcast it bigger); else why not."""
        if self.channel_axis is not None:  # BN: axis 1
            if axis != self.channel_axis:
                return f"it normalizes axis 1, but the layer's channels are axis {axis}"
            if self.scale.shape != (channels,):
                return f"its parameters have shape {list(self.scale.shape)}, not [{channels}]"
            return self.scale, self.shift
        vectors = []
        for const in (self.scale, self.shift):
            if const.ndim > rank:
                return f"its constant has rank {const.ndim}, above the tensor's {rank}"
            shape = [1] * (rank - const.ndim) + list(const.shape)
            if any(d != 1 for i, d in enumerate(shape) if i != axis):
                return f"its constant (shape {list(const.shape)}) is not per-channel on axis {axis}"
            if shape[axis] not in (1, channels):
                return f"its constant has {shape[axis]} values for {channels} channels"
            vectors.append(np.broadcast_to(const.reshape(-1), (channels,)).copy())
        return vectors[0], vectors[1]


def _constant_operand(scope: Scope, node: onnx.NodeProto) -> tuple[str, np.ndarray] | None:
    """For ``Mul``/``Add`` with one float constant operand: (the other input, the constant)."""
    if node.op_type not in ("Mul", "Add") or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.input) != 2:
        return None
    for i in (0, 1):
        const = scope.constant(node.input[i])
        if const is not None and scope.constant(node.input[1 - i]) is None:
            return node.input[1 - i], const[0]
    return None


def batchnorm_site(scope: Scope, node: onnx.NodeProto) -> Site | str:
    """The BN's affine map, or why it cannot be folded at all."""
    if int_attribute(node, "training_mode", 0) == 1:
        return "it is in training mode (training_mode=1): it uses batch statistics"
    if sum(1 for o in node.output[1:] if o) > 0:
        return "it computes running statistics (training outputs), so it is not an inference BN"
    if int_attribute(node, "spatial", 1) == 0:
        return "spatial=0: per-activation statistics, not per-channel"
    params = [scope.constant(name) for name in node.input[1:5]]
    missing = [name for name, p in zip(node.input[1:5], params, strict=True) if p is None]
    if missing:
        names = ", ".join(missing)
        return f"its parameters are not constants ({names}: computed or fed at run time)"
    gamma, beta, mean, var = (p[0] for p in params if p is not None)
    if not gamma.ndim == beta.ndim == mean.ndim == var.ndim == 1:
        return f"its parameters are not per-channel vectors (shape {list(gamma.shape)})"
    epsilon = float_attribute(node, "epsilon", 1e-5)
    s, t = batchnorm_affine(gamma, beta, mean, var, epsilon)
    return Site([node], node.input[0], node.output[0], s, t, 1, BATCHNORM)


def affine_run(scope: Scope, node: onnx.NodeProto) -> Site | None:
    """The longest run of Mul/Add-by-constant starting at ``node``, each link the only
    reader of the one before, none a graph output in the middle. None when ``node`` is not
    one, or continues a run that starts earlier."""
    first = _constant_operand(scope, node)
    if first is None:
        return None
    before = scope.producer.get(first[0])
    if before is not None and _constant_operand(scope, before) is not None:
        if scope.only_consumer(before.output[0]) is not None:
            return None  # part of a longer run
    scale, shift = np.ones(()), np.zeros(())
    nodes: list[onnx.NodeProto] = []
    current: onnx.NodeProto | None = node
    while current is not None:
        operand = _constant_operand(scope, current)
        if operand is None or (nodes and operand[0] != nodes[-1].output[0]):
            break
        const = operand[1]
        if current.op_type == "Mul":
            scale, shift = scale * const, shift * const
        else:
            shift = shift + const
        nodes.append(current)
        current = scope.only_consumer(current.output[0])
    kind = "+".join(n.op_type for n in nodes)
    return Site(nodes, first[0], nodes[-1].output[0], scale, shift, None, kind)
