"""Turn a torch module into an ONNX model whose BatchNormalization nodes are kept.

``torch.onnx.export`` (dynamo, ``optimize=True``) runs onnxscript's optimizer,
whose rewrite rules fold BatchNormalization into Conv, ConvTranspose and Gemm.
To export an *unfolded* network on purpose, and to give the folded one the very
same clean-up so that the two files differ only by folding, both go through
:func:`optimize_keeping_batchnorm`: onnxscript's constant folding and default
rewrite rules minus the three BN-fusion rules.
"""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from typing import Any

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
from onnxscript import optimizer, rewriter
from onnxscript.rewriter.rules import common as rules_common
from torch import nn

log = logging.getLogger(__name__)
# torch warns on every export that torchvision's ops are not registered; we use none of them.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _reuse_torchlib_registry() -> None:
    """Build torch.onnx's registry of ONNX decompositions once per process, not per export.

    ``torch.onnx.export`` (dynamo) rebuilds it on every call from onnxscript's torchlib,
    and onnxscript (0.7) re-parses the source of each of its functions to do so: more CPU
    than exporting a small network takes (docs/benchmarks.md, "Test suite time"). Each call
    now gets a copy of one registry per opset (its lists copied, so an op registered on
    the copy, as a ``custom_translation_table`` does, never reaches the others). Where
    torch's private layout differs, exports stay as they are, only slower."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:  # pragma: no cover - another torch layout
        return
    registry_class = _registration.ONNXRegistry
    build = getattr(registry_class.from_torchlib, "__func__", None)
    if build is None or getattr(build, "_built_once", False):
        return
    built: dict[tuple[Any, ...], Any] = {}
    lock = threading.Lock()

    def from_torchlib(cls: Any, *args: Any, **kwargs: Any) -> Any:
        key = (cls, args, tuple(sorted(kwargs.items())))
        with lock:
            if key not in built:
                built[key] = build(cls, *args, **kwargs)
            registry = copy.copy(built[key])
        registry.functions = {op: list(decomps) for op, decomps in built[key].functions.items()}
        return registry

    from_torchlib._built_once = True  # type: ignore[attr-defined]
    registry_class.from_torchlib = classmethod(from_torchlib)  # type: ignore[method-assign,assignment]


_reuse_torchlib_registry()

_BN_FUSION_RULES = (
    rules_common.fuse_batchnorm_into_conv_rule,
    rules_common.fuse_batchnorm_into_conv_transpose_rule,
    rules_common.fuse_batchnorm_into_gemm_rule,
)


def _rules_without_bn_fusion() -> list[Any]:
    # onnxscript exposes its default rule list only privately; without it we skip
    # the rewrites (constant folding alone still gives a valid, BN-preserving graph).
    default = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if default is None:
        log.warning("onnxscript has no default rewrite rule list; exporting without rewrites")
        return []
    return [r for r in default if all(r is not bn for bn in _BN_FUSION_RULES)]


def optimize_keeping_batchnorm(model: ir.Model, iterations: int = 2) -> None:
    """onnxscript's optimization pipeline, in place, without folding BatchNormalization."""
    rules = _rules_without_bn_fusion()
    common_passes.InlinePass()(model)
    for _ in range(iterations):
        optimizer.fold_constants(model)
        if rules:
            rewriter.rewrite(model, pattern_rewrite_rules=rules)
        optimizer.remove_unused_nodes(model)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common_passes.DeduplicateInitializersPass()(model)
    common_passes.CommonSubexpressionEliminationPass()(model)
    common_passes.RemoveUnusedNodesPass()(model)


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    input_name: str = "input",
    output_name: str = "logits",
) -> onnx.ModelProto:
    """Export ``module`` (eval mode) with a dynamic batch axis, BN nodes kept as they are."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            (example,),
            dynamo=True,
            optimize=False,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    assert program is not None
    optimize_keeping_batchnorm(program.model)
    proto = ir.serde.serialize_model(program.model)
    proto.producer_name = "foldserve"
    return proto
