"""Folding in a ``torch.fx`` graph: a BN's neighbours are the nodes around it.

:func:`trace_for_folding` keeps every BN and weight layer a ``call_module``
node (a Conv subclass with a forward of its own too: the probe reads that
forward); :func:`fold_graph` asks the :class:`BatchNormFolder` about each BN
node and removes the ones it folds, rewiring their users to the BN's input.
A BN's input is one layer's output, or a ``torch.cat`` of several along the
channel axis, whose slices fold into their producers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from foldserve.model_format import KeptBatchNorm
from training.fold.layer_forward import base_layer
from training.fold.rules import BatchNormFolder, Concat, Neighbour, layer_kind, qualified_name

_CONCATS = (torch.cat, torch.concat, torch.concatenate)


def _split_pieces(node: fx.Node) -> int | None:
    """How many tensors ``torch.split(x, [sizes...])`` returns: known without running it."""
    is_split = (node.op == "call_function" and node.target is torch.split) or (
        node.op == "call_method" and node.target == "split"
    )
    if not is_split:
        return None
    kwargs = node.kwargs
    sizes = node.args[1] if len(node.args) > 1 else kwargs.get("split_size_or_sections")
    sizes = kwargs.get("split_size") if sizes is None else sizes  # Tensor.split's name
    if isinstance(sizes, list | tuple) and all(isinstance(s, int) for s in sizes):
        return len(sizes)
    return None


class _SplitProxy(fx.Proxy):
    """A split into a known number of pieces, so that ``zip``/``for`` over it trace.

    (Mixed-kernel convolutions split their channels and loop over the pieces.)
    """

    def __init__(self, node: fx.Node, tracer: fx.Tracer, pieces: int) -> None:
        super().__init__(node, tracer)
        self.pieces = pieces

    def __len__(self) -> int:
        return self.pieces

    def __iter__(self) -> Iterator[fx.Proxy]:
        return (self[i] for i in range(self.pieces))  # type: ignore[index]


def _holds_nothing_to_fold(m: nn.Module) -> bool:
    return not any(isinstance(c, _BatchNorm | _ConvNd | nn.Linear) for c in m.modules())


class _Tracer(fx.Tracer):
    """Keeps every BN and weight layer (even user subclasses) a ``call_module`` node.

    So is every module holding neither (an activation, a pooling): folding needs
    nothing from inside it, and its code need not be traceable (TorchScript or
    custom autograd activations are not).
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, _BatchNorm | _ConvNd | nn.Linear)
            or _holds_nothing_to_fold(m)
            or super().is_leaf_module(m, module_qualified_name)
        )

    def proxy(self, node: fx.Node) -> fx.Proxy:
        pieces = _split_pieces(node)
        return super().proxy(node) if pieces is None else _SplitProxy(node, self, pieces)


def trace_for_folding(module: nn.Module) -> fx.Graph:
    """``module``'s graph with BNs and layers as leaves; raises whatever torch.fx raises."""
    return _Tracer().trace(module)


def fold_graph(
    folder: BatchNormFolder, module: nn.Module, graph: fx.Graph, prefix: str
) -> fx.GraphModule:
    """``module`` as a GraphModule of ``graph``, every BN that ``folder`` folds taken out.

    A BN's neighbours are its input node (a layer, or a concat of layers) and
    its single user; a layer whose output feeds anything else, or whose weights
    the graph reads directly, is refused. ``prefix`` is ``module``'s qualified
    name in the whole model.
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

    def preceding(node: fx.Node, bn_node: fx.Node) -> Neighbour | Concat:
        others = [u.name for u in node.users if u != bn_node]
        if node.op != "call_function" or node.target not in _CONCATS:
            return neighbour(node, "preceding", others)
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = (
            node.args[1]
            if len(node.args) > 1
            else node.kwargs.get("dim", node.kwargs.get("axis", 0))
        )
        inputs = list(tensors) if isinstance(tensors, list | tuple) else []
        cat = Concat(
            f"concat '{node.name}' (torch.cat, dim {dim})", dim if isinstance(dim, int) else 0
        )
        if not isinstance(dim, int):
            cat.refusal = "its axis is not a constant"
        elif not inputs or not all(isinstance(n, fx.Node) for n in inputs):
            cat.refusal = "its inputs are not a list of tensors computed in the graph"
        elif others:
            cat.refusal = f"its output has other consumers ({', '.join(others)})"
        elif len(set(inputs)) < len(inputs):
            cat.refusal = "it concatenates one tensor more than once"
        else:
            cat.producers = [
                neighbour(n, "concatenated", [u.name for u in n.users if u != node])
                for n in inputs
                if isinstance(n, fx.Node)
            ]
        return cat

    for node in nodes:
        bn = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(bn, _BatchNorm):
            continue
        name, source = qualified_name(prefix, str(node.target)), node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or len(node.args) > 1 or node.kwargs:
            folder.report.kept.append(
                KeptBatchNorm(bn=name, reason="BN is called with unusual arguments")
            )
            continue
        before = preceding(source, node)
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
