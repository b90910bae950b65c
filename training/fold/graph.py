"""Folding in a ``torch.fx`` graph: a BN's neighbours are the nodes around it.

:func:`trace_for_folding` keeps every BN and weight layer a ``call_module``
node (a Conv subclass with a forward of its own too: the probe reads that
forward); :func:`fold_graph` asks the :class:`BatchNormFolder` about each BN
node and removes the ones it folds, rewiring their users to the BN's input.
"""

from __future__ import annotations

from collections import Counter

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from training.fold.layer_forward import base_layer
from training.fold.report import KeptBN
from training.fold.rules import BatchNormFolder, Neighbour, layer_kind, qualified_name


class _Tracer(fx.Tracer):
    """Keeps every BN and weight layer (even user subclasses) a ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BatchNorm | _ConvNd | nn.Linear) or super().is_leaf_module(
            m, module_qualified_name
        )


def trace_for_folding(module: nn.Module) -> fx.Graph:
    """``module``'s graph with BNs and layers as leaves; raises whatever torch.fx raises."""
    return _Tracer().trace(module)


def fold_graph(
    folder: BatchNormFolder, module: nn.Module, graph: fx.Graph, prefix: str
) -> fx.GraphModule:
    """``module`` as a GraphModule of ``graph``, every BN that ``folder`` folds taken out.

    A BN's neighbours are its input node and its single user; a layer whose
    output feeds anything else, or whose weights the graph reads directly,
    is refused. ``prefix`` is ``module``'s qualified name in the whole model.
    """
    gm = fx.GraphModule(module, graph)
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    graph_calls = Counter(str(n.target) for n in nodes if n.op == "call_module")
    read_directly = {str(n.target).rpartition(".")[0] for n in nodes if n.op == "get_attr"}

    def describe(node: fx.Node) -> str:
        if node.op == "placeholder":
            return f"model input '{node.name}'"
        if node.op == "call_module":
            kind = type(modules[str(node.target)]).__name__
            return f"'{qualified_name(prefix, str(node.target))}' ({kind})"
        return f"{node.op} {getattr(node.target, '__name__', node.target)}"

    def neighbour(node: fx.Node, role: str, consumers: list[str]) -> Neighbour:
        target = str(node.target)
        module = modules.get(target) if node.op == "call_module" else None
        name = qualified_name(prefix, target)
        if module is None or base_layer(module) is None:  # not a layer to fold into
            return Neighbour(name, None, describe(node))
        what = f"{role} {layer_kind(module)} '{name}'"
        refusal = None
        if consumers:
            refusal = f"{what} output has other consumers ({', '.join(consumers)})"
        elif target in read_directly:
            refusal = f"{what} has its weights read directly elsewhere in the graph"
        return Neighbour(name, module, describe(node), refusal, graph_calls[target])

    for node in nodes:
        bn = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(bn, _BatchNorm):
            continue
        name, source = qualified_name(prefix, str(node.target)), node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or len(node.args) > 1 or node.kwargs:
            folder.report.kept.append(KeptBN(name, "BN is called with unusual arguments"))
            continue
        before = neighbour(source, "preceding", [u.name for u in source.users if u != node])
        users = list(node.users)
        if len(users) == 1 and users[0].args == (node,) and not users[0].kwargs:
            after = neighbour(users[0], "following", [])
        elif len(users) == 1:
            after = Neighbour("", None, f"output goes to {describe(users[0])}")
        else:
            after = Neighbour("", None, f"its output has {len(users)} consumers")
        if folder.decide(bn, name, before, after):
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            gm.delete_submodule(str(node.target))
    gm.graph.lint()
    gm.recompile()
    return gm
