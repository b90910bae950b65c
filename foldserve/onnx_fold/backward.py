"""Folding a per-channel affine site into the layer that produces its input: Conv,
ConvTranspose (grouped too), Gemm, MatMul with a constant weight (and its bias Add), and a
channel Concat of such Convs (slice by slice). Each rule checks everything first and edits
only when the fold is valid, so a refusal leaves the graph as it was.

A rule returns a :class:`Fold`, a reason (str) it cannot fold, or None when the producer is
no layer at all (nothing to report for a Mul/Add run there)."""

from __future__ import annotations

import numpy as np
import onnx

from foldserve.onnx_fold import weights
from foldserve.onnx_fold.edits import Editor, Fold, fold, readers, same
from foldserve.onnx_fold.graph import (
    Scope,
    float_attribute,
    int_attribute,
    node_label,
    set_attribute,
    tensor_like,
)
from foldserve.onnx_fold.sites import Site

CONVS = ("Conv", "ConvTranspose")


def _bias(scope: Scope, layer: onnx.NodeProto, index: int) -> np.ndarray | str | None:
    """The layer's optional bias input as float64 (None if absent), a reason if not constant."""
    if len(layer.input) <= index or not layer.input[index]:
        return None
    const = scope.constant(layer.input[index])
    if const is None:
        return f"{layer.op_type} '{node_label(layer)}' has a bias that is not a constant"
    return const[0]


def _weight(scope: Scope, layer: onnx.NodeProto, index: int) -> tuple[np.ndarray, int] | str:
    const = scope.constant(layer.input[index])
    if const is None:
        return (
            f"the weight '{layer.input[index]}' of {layer.op_type} '{node_label(layer)}' is "
            "not a constant (computed or fed at run time)"
        )
    return const


def _conv_plan(
    scope: Scope, layer: onnx.NodeProto
) -> tuple[np.ndarray, int, np.ndarray, int] | str:
    """(W, dtype, bias, output channels) of a Conv or ConvTranspose."""
    got = _weight(scope, layer, 1)
    if isinstance(got, str):
        return got
    w, dtype = got
    group = int_attribute(layer, "group", 1)
    channels = w.shape[0] if layer.op_type == "Conv" else w.shape[1] * group
    bias = _bias(scope, layer, 2)
    if isinstance(bias, str):
        return bias
    return w, dtype, np.zeros(channels) if bias is None else bias, channels


def _fold_conv(
    scope: Scope,
    layer: onnx.NodeProto,
    plan: tuple[np.ndarray, int, np.ndarray, int],
    s: np.ndarray,
    t: np.ndarray,
    edit: Editor,
) -> None:
    w, dtype, bias, _ = plan
    if layer.op_type == "Conv":
        new_w, new_b = weights.conv_backward(w, bias, s, t)
    else:
        group = int_attribute(layer, "group", 1)
        new_w, new_b = weights.conv_transpose_backward(w, bias, s, t, group)
    edit.set_weight_and_bias(scope, layer, new_w, new_b, dtype)


def _conv(scope: Scope, site: Site, layer: onnx.NodeProto, edit: Editor) -> Fold | str:
    plan = _conv_plan(scope, layer)
    if isinstance(plan, str):
        return plan
    st = site.per_channel(1, plan[0].ndim, plan[3])
    if isinstance(st, str):
        return st
    _fold_conv(scope, layer, plan, *st, edit)
    edit.drop_site(scope, site)
    layer.output[0] = site.output
    return fold(layer, plan[0], "backward", plan[3])


def _concat(scope: Scope, site: Site, concat: onnx.NodeProto, edit: Editor) -> Fold | str:
    """BN after a channel Concat of Convs, each read only by the Concat: slice by slice."""
    parts = [scope.producer.get(name) for name in concat.input]
    plans = []
    for name, part in zip(concat.input, parts, strict=True):
        if part is None or part.op_type not in CONVS:
            return f"Concat input '{name}' does not come from a Conv"
        if not same(scope.only_consumer(name), concat):
            return f"Concat input {readers(scope, name)}"
        plan = _conv_plan(scope, part)
        if isinstance(plan, str):
            return plan
        plans.append(plan)
    rank = plans[0][0].ndim
    axis = int_attribute(concat, "axis", 1)
    if axis % rank != 1:
        return f"the Concat joins axis {axis}, not the channels"
    sizes = [p[3] for p in plans]
    st = site.per_channel(1, rank, sum(sizes))
    if isinstance(st, str):
        return st
    starts = np.cumsum([0, *sizes])
    for part, plan, lo, hi in zip(parts, plans, starts[:-1], starts[1:], strict=True):
        assert part is not None
        _fold_conv(scope, part, plan, st[0][lo:hi], st[1][lo:hi], edit)
    edit.drop_site(scope, site)
    concat.output[0] = site.output
    # into: the Convs, comma-separated, as training.fold reports a concat; shape: channels
    into = ", ".join(node_label(p) for p in parts if p is not None)
    kinds = ", ".join(p.op_type for p in parts if p is not None)
    return Fold(into, f"Concat({kinds})", [sum(sizes)], "backward", sum(sizes))


def _gemm(scope: Scope, site: Site, layer: onnx.NodeProto, edit: Editor) -> Fold | str:
    got = _weight(scope, layer, 1)
    if isinstance(got, str):
        return got
    b_mat, dtype = got
    trans_b = int_attribute(layer, "transB", 0) == 1
    n = b_mat.shape[0] if trans_b else b_mat.shape[1]
    c = _bias(scope, layer, 2)
    if isinstance(c, str):
        return c
    st = site.per_channel(1, 2, n)
    if isinstance(st, str):
        return st
    alpha = float_attribute(layer, "alpha", 1.0)
    beta = float_attribute(layer, "beta", 1.0)
    new_b, new_c = weights.gemm_backward(b_mat, c, *st, alpha, beta, trans_b)
    edit.set_weight_and_bias(scope, layer, new_b, new_c, dtype)
    for name in ("alpha", "beta"):
        set_attribute(layer, name, 1.0)
    edit.drop_site(scope, site)
    layer.output[0] = site.output
    return fold(layer, b_mat, "backward", n)


def per_feature(bias: np.ndarray, rank: int) -> bool:
    """Whether a MatMul bias varies along the last axis only and does not raise the rank."""
    return bias.ndim <= rank and all(d == 1 for d in bias.shape[:-1])


def matmul_bias(scope: Scope, add: onnx.NodeProto) -> tuple[onnx.NodeProto, int, np.ndarray] | None:
    """For ``Add(MatMul(x, W), b)`` with constant W and b: (the MatMul, b's input index, b)."""
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    for i in (0, 1):
        mm = scope.producer.get(add.input[1 - i])
        const = scope.constant(add.input[i])
        if mm is not None and mm.op_type == "MatMul" and const is not None:
            if same(scope.only_consumer(mm.output[0]), add):
                return mm, i, const[0]
    return None


def _matmul(
    scope: Scope, site: Site, layer: onnx.NodeProto, add: onnx.NodeProto | None, edit: Editor
) -> Fold | str | None:
    """MatMul with a constant weight (and maybe its bias ``add``) before the site."""
    got = _weight(scope, layer, 1)
    if isinstance(got, str):
        return got
    w, dtype = got
    rank = scope.rank(layer.output[0])
    if w.ndim < 2 or rank is None:
        return f"the rank of MatMul '{node_label(layer)}' output is unknown or its weight is 1-D"
    bias_info = matmul_bias(scope, add) if add is not None else None
    if add is None and site.kind == "Add":
        return None  # a MatMul and one Add: that is already a layer with its bias
    bias = None if bias_info is None else bias_info[2]
    n = w.shape[-1]
    st = site.per_channel(rank - 1, rank, n)
    if isinstance(st, str):
        return st
    if bias is not None and not per_feature(bias, rank):
        return "the bias after the MatMul is not per-channel"
    new_w, new_b = weights.matmul_backward(w, None if bias is None else bias.reshape(-1), *st)
    edit.set_input(scope, layer, 1, new_w, dtype, layer.input[1])
    edit.drop_site(scope, site)
    if add is not None and bias_info is not None:
        edit.set_input(scope, add, bias_info[1], new_b, dtype, add.input[bias_info[1]])
        add.output[0] = site.output
    else:
        out = edit.fresh(f"{layer.output[0]}_matmul", scope, layer.output[0])
        bias_name = edit.fresh(f"{layer.input[1]}_bias", scope, "")
        scope.graph.initializer.append(tensor_like(new_b, dtype, bias_name))
        new_add = onnx.helper.make_node("Add", [out, bias_name], [site.output], name=bias_name)
        layer.output[0] = out
        edit.insert_after(out, new_add)
    return fold(layer, w, "backward", n)


def fold_backward(scope: Scope, site: Site, edit: Editor) -> Fold | str | None:
    layer = scope.producer.get(site.input)
    if layer is None:
        return None
    absorbs = layer.op_type in (*CONVS, "Gemm", "MatMul", "Concat") or matmul_bias(scope, layer)
    if not (site.is_batchnorm or absorbs):
        return None  # a Mul/Add with no layer before it: nothing to report
    if scope.only_consumer(site.input) is None:
        return f"before it: {readers(scope, site.input)}"
    if layer.op_type in CONVS:
        return _conv(scope, site, layer, edit)
    if layer.op_type == "Gemm":
        return _gemm(scope, site, layer, edit)
    if layer.op_type == "MatMul":
        return _matmul(scope, site, layer, None, edit)
    if layer.op_type == "Concat":
        return _concat(scope, site, layer, edit)
    bias = matmul_bias(scope, layer)
    if bias is not None:
        return _matmul(scope, site, bias[0], layer, edit)
    return None
