"""Folding a per-channel affine site into the layer that reads its output: Gemm (transA 0),
MatMul with a constant 2-D weight, and a Conv without padding (a padded border would be
zeros, not the shift, so padding refuses). Same contract as the backward rules: check
everything, then edit; a reason (str) or None (no layer after it) otherwise."""

from __future__ import annotations

import numpy as np
import onnx

from foldserve.onnx_fold import weights
from foldserve.onnx_fold.backward import matmul_bias, per_feature
from foldserve.onnx_fold.edits import Editor, Fold, fold, readers
from foldserve.onnx_fold.graph import (
    Scope,
    attribute,
    float_attribute,
    int_attribute,
    node_label,
    set_attribute,
    tensor_like,
)
from foldserve.onnx_fold.sites import Site


def _constant(scope: Scope, layer: onnx.NodeProto, index: int) -> tuple[np.ndarray, int] | str:
    const = scope.constant(layer.input[index]) if len(layer.input) > index else None
    if const is None:
        return f"after it: {layer.op_type} '{node_label(layer)}' input {index} is not a constant"
    return const


def _weight_and_bias(
    scope: Scope, layer: onnx.NodeProto
) -> tuple[np.ndarray, int, np.ndarray | None] | str:
    """A Conv's or Gemm's constant weight (input 1), its data type, and its bias (input 2) as
    float64, None when absent; a reason when either is not a constant."""
    got = _constant(scope, layer, 1)
    if isinstance(got, str):
        return got
    if len(layer.input) <= 2 or not layer.input[2]:
        return (*got, None)
    bias = _constant(scope, layer, 2)
    return bias if isinstance(bias, str) else (*got, bias[0])


def _conv(scope: Scope, site: Site, layer: onnx.NodeProto, edit: Editor) -> Fold | str:
    pads = attribute(layer, "pads", [])
    assert isinstance(pads, list)
    auto_pad = attribute(layer, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if any(pads) or auto_pad not in ("NOTSET", "VALID"):
        padding = f"pads={pads}" if any(pads) else f"auto_pad={auto_pad}"
        return (
            f"after it: Conv '{node_label(layer)}' pads its input ({padding}); the padded "
            "border would miss the shift"
        )
    got = _weight_and_bias(scope, layer)
    if isinstance(got, str):
        return got
    w, dtype, bias = got
    group = int_attribute(layer, "group", 1)
    st = site.per_channel(1, w.ndim, w.shape[1] * group)
    if isinstance(st, str):
        return st
    new_w, new_b = weights.conv_forward(
        w, np.zeros(w.shape[0]) if bias is None else bias, *st, group
    )
    edit.set_weight_and_bias(scope, layer, new_w, new_b, dtype)
    layer.input[0] = site.input
    edit.drop_site(scope, site)
    return fold(layer, w, "forward", w.shape[1] * group)


def _gemm(scope: Scope, site: Site, layer: onnx.NodeProto, edit: Editor) -> Fold | str:
    if int_attribute(layer, "transA", 0) == 1:
        return f"after it: Gemm '{node_label(layer)}' transposes its input (transA=1)"
    got = _weight_and_bias(scope, layer)
    if isinstance(got, str):
        return got
    b_mat, dtype, c = got
    trans_b = int_attribute(layer, "transB", 0) == 1
    k = b_mat.shape[1] if trans_b else b_mat.shape[0]
    st = site.per_channel(1, 2, k)
    if isinstance(st, str):
        return st
    alpha = float_attribute(layer, "alpha", 1.0)
    beta = float_attribute(layer, "beta", 1.0)
    new_b, new_c = weights.gemm_forward(b_mat, c, *st, alpha, beta, trans_b)
    edit.set_weight_and_bias(scope, layer, new_b, new_c, dtype)
    for name in ("alpha", "beta"):
        set_attribute(layer, name, 1.0)
    layer.input[0] = site.input
    edit.drop_site(scope, site)
    return fold(layer, b_mat, "forward", k)


def _matmul(scope: Scope, site: Site, layer: onnx.NodeProto, edit: Editor) -> Fold | str:
    got = _constant(scope, layer, 1)
    if isinstance(got, str):
        return got
    w, dtype = got
    rank = scope.rank(site.output)
    if w.ndim != 2 or rank is None:
        return (
            f"after it: MatMul '{node_label(layer)}' has a weight of rank {w.ndim} or an "
            "input of unknown rank"
        )
    st = site.per_channel(rank - 1, rank, w.shape[0])
    if isinstance(st, str):
        return st
    after = scope.only_consumer(layer.output[0])
    bias_info = matmul_bias(scope, after) if after is not None else None
    bias = None if bias_info is None else bias_info[2]
    if bias is not None and not per_feature(bias, rank):
        bias_info = bias = None  # a bias that is not per-channel: leave that Add alone
    new_w, new_b = weights.matmul_forward(w, None if bias is None else bias.reshape(-1), *st)
    edit.set_input(scope, layer, 1, new_w, dtype, layer.input[1])
    if after is not None and bias_info is not None:
        edit.set_input(scope, after, bias_info[1], new_b, dtype, after.input[bias_info[1]])
    else:
        out = edit.fresh(f"{layer.output[0]}_matmul", scope, layer.output[0])
        bias_name = edit.fresh(f"{layer.input[1]}_bias", scope, "")
        scope.graph.initializer.append(tensor_like(new_b, dtype, bias_name))
        add = onnx.helper.make_node("Add", [out, bias_name], [layer.output[0]], name=bias_name)
        layer.output[0] = out
        edit.insert_after(out, add)
    layer.input[0] = site.input
    edit.drop_site(scope, site)
    return fold(layer, w, "forward", w.shape[0])


def fold_forward(scope: Scope, site: Site, edit: Editor) -> Fold | str | None:
    reader = scope.only_consumer(site.output)
    after = {n.op_type for n in scope.consumers.get(site.output, [])}
    if not (site.is_batchnorm or after & {"Conv", "Gemm", "MatMul"}):
        return None  # a Mul/Add with no layer after it: nothing to report
    if reader is None:
        return f"after it: {readers(scope, site.output)}"
    if reader.input[0] != site.output:
        return (
            None
            if not site.is_batchnorm
            else (f"after it: {reader.op_type} '{node_label(reader)}' reads it as a weight")
        )
    if reader.op_type == "Conv":
        return _conv(scope, site, reader, edit)
    if reader.op_type == "Gemm":
        return _gemm(scope, site, reader, edit)
    if reader.op_type == "MatMul":
        return _matmul(scope, site, reader, edit)
    return None
