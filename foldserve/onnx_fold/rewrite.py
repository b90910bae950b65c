"""The fold loop: every affine site of every graph (subgraphs of If/Loop/Scan included) is
tried backward, then forward, until a pass folds nothing; what is left is reported with the
reasons from that last pass."""

from __future__ import annotations

import onnx

from foldserve.model_format import FoldedBatchNorm, KeptBatchNorm
from foldserve.model_graph import BATCHNORM
from foldserve.onnx_fold.backward import fold_backward
from foldserve.onnx_fold.edits import Editor, Fold
from foldserve.onnx_fold.forward import fold_forward
from foldserve.onnx_fold.graph import Scope, all_names, drop_unused_constants, node_label, scopes
from foldserve.onnx_fold.sites import Site, affine_run, batchnorm_site


def _site(scope: Scope, node: onnx.NodeProto) -> Site | str | None:
    if node.op_type == BATCHNORM and node.domain in ("", "ai.onnx"):
        return batchnorm_site(scope, node)
    return affine_run(scope, node)


def _before(scope: Scope, site: Site) -> str:
    layer = scope.producer.get(site.input)
    if layer is not None:
        return f"before it: {layer.op_type} '{node_label(layer)}' cannot absorb it"
    if any(i.name == site.input for i in scope.graph.input) or scope.parent is None:
        return "before it: the graph input, no layer"
    return "before it: a value of the enclosing graph, no layer here"


def _after(scope: Scope, site: Site) -> str:
    readers = [f"{n.op_type} '{node_label(n)}'" for n in scope.consumers.get(site.output, [])]
    if not readers:
        return "after it: a graph output, no layer"
    return f"after it: {', '.join(readers)} cannot absorb it"


def _try(scope: Scope, site: Site, edit: Editor) -> Fold | str | None:
    """Fold ``site`` if a neighbour can absorb it; else the reason on both sides (None: a
    Mul/Add with no layer next to it, which is no BN and not worth a report line)."""
    back = fold_backward(scope, site, edit)
    if isinstance(back, Fold):
        return back
    ahead = fold_forward(scope, site, edit)
    if isinstance(ahead, Fold):
        return ahead
    if not site.is_batchnorm and (not (back or ahead) or max(site.shape, default=1) == 1):
        return None  # arithmetic by scalars (hard-swish's x + 3) is no BN: not reported
    return f"{back or _before(scope, site)}; {ahead or _after(scope, site)}"


def _record(site: Site, done: Fold) -> FoldedBatchNorm:
    return FoldedBatchNorm(
        bn=site.label,
        into=done.into,
        direction=done.direction,
        bn_type=site.kind,
        bn_shape=[done.channels],
        into_type=done.into_type,
        into_shape=done.into_shape,
    )


def fold_graphs(model: onnx.ModelProto) -> tuple[list[FoldedBatchNorm], list[KeptBatchNorm]]:
    """Fold every foldable site of ``model`` in place (the caller passes its own copy)."""
    edit = Editor(all_names(model), set(), model.ir_version < 4)
    folded: list[FoldedBatchNorm] = []
    kept: dict[str, KeptBatchNorm] = {}
    ranks = None
    changed = True
    while changed:
        changed, kept = False, {}
        indexed = scopes(model, ranks)
        ranks = indexed[0].ranks
        for k in range(len(indexed)):
            for first_output in [n.output[0] for n in indexed[k].graph.node]:
                scope = indexed[k]
                node = scope.producer.get(first_output)
                if node is None:
                    continue  # dropped by an earlier fold of this pass
                site = _site(scope, node)
                if site is None:
                    continue
                outcome = _try(scope, site, edit) if isinstance(site, Site) else site
                if isinstance(outcome, Fold):
                    assert isinstance(site, Site)
                    edit.commit(scope.graph)
                    folded.append(_record(site, outcome))
                    changed = True
                    indexed = scopes(model, ranks)
                elif outcome is not None:
                    label = site.label if isinstance(site, Site) else node_label(node)
                    kept[label] = KeptBatchNorm(
                        bn=label,
                        reason=outcome,
                        bn_type=site.kind if isinstance(site, Site) else BATCHNORM,
                        bn_shape=site.shape if isinstance(site, Site) else [],
                    )
    drop_unused_constants(model, edit.released)
    return folded, [*kept.values(), *_in_functions(model)]


def _in_functions(model: onnx.ModelProto) -> list[KeptBatchNorm]:
    """BNs inside model-local functions: counted in the report's BN totals, not folded."""
    return [
        KeptBatchNorm(
            bn=f"{function.name}/{node_label(node)}",
            reason=f"inside the model-local function '{function.name}', whose weights are "
            "its inputs: inline the function to fold it",
            bn_type=BATCHNORM,
        )
        for function in model.functions
        for node in function.node
        if node.op_type == BATCHNORM and node.domain in ("", "ai.onnx")
    ]
