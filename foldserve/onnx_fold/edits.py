"""The edits a fold makes, shared by the backward and forward rules: a layer input replaced
by a new initializer (never the old one changed in place: another node may read it), a node
rewired, the affine site's nodes dropped."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from foldserve.onnx_fold.graph import Scope, fresh_name, node_label, tensor_like
from foldserve.onnx_fold.sites import Site


@dataclass
class Fold:
    """What a rule did: the layer that absorbed the site, and in which direction."""

    into: str
    into_type: str
    into_shape: list[int]
    direction: str  # "backward": into the layer before; "forward": into the layer after
    channels: int


@dataclass
class Editor:
    """Makes fresh value names and remembers the constants a fold stopped reading (they are
    dropped at the end if nothing else reads them)."""

    names: set[str]
    released: set[str]
    legacy_inputs: bool  # IR < 4: every main-graph initializer is listed as a graph input
    dropped: set[int] = field(default_factory=set)  # node positions, applied by commit()
    inserted: list[tuple[str, onnx.NodeProto]] = field(default_factory=list)

    def set_input(
        self,
        scope: Scope,
        node: onnx.NodeProto,
        index: int,
        values: np.ndarray,
        data_type: int,
        base: str,
    ) -> None:
        """``node.input[index]`` := a new initializer holding ``values`` rounded once."""
        name = fresh_name(self.names, f"{base.split('_folded')[0]}_folded")
        scope.graph.initializer.append(tensor_like(values, data_type, name))
        if self.legacy_inputs and scope.parent is None:
            scope.graph.input.append(
                onnx.helper.make_tensor_value_info(name, data_type, list(values.shape))
            )
        while len(node.input) <= index:
            node.input.append("")
        if node.input[index]:
            self.released.add(node.input[index])
        node.input[index] = name

    def set_weight_and_bias(
        self,
        scope: Scope,
        layer: onnx.NodeProto,
        weight: np.ndarray,
        bias: np.ndarray,
        data_type: int,
    ) -> None:
        """A Conv's, ConvTranspose's or Gemm's weight (input 1) and bias (input 2, added when
        the layer has none) := new initializers, as :meth:`set_input`."""
        self.set_input(scope, layer, 1, weight, data_type, layer.input[1])
        has_bias = len(layer.input) > 2 and layer.input[2]
        # Read after input 1 is replaced: a bias the layer lacked is named after the new weight.
        base = layer.input[2] if has_bias else f"{layer.input[1]}_bias"
        self.set_input(scope, layer, 2, bias, data_type, base)

    def fresh(self, base: str, scope: Scope, like: str) -> str:
        """A new value name with the rank of ``like``."""
        name = fresh_name(self.names, base)
        if like in scope.ranks:
            scope.ranks[name] = scope.ranks[like]
        return name

    def drop_site(self, scope: Scope, site: Site) -> None:
        """Mark the site's nodes for removal; call before renaming any output to theirs."""
        outputs = {n.output[0] for n in site.nodes}
        for node in site.nodes:
            self.released.update(node.input)
        self.dropped |= {i for i, n in enumerate(scope.graph.node) if n.output[0] in outputs}

    def insert_after(self, anchor_output: str, node: onnx.NodeProto) -> None:
        """Add ``node`` right after the node producing ``anchor_output`` (at commit())."""
        self.inserted.append((anchor_output, node))

    def commit(self, graph: onnx.GraphProto) -> None:
        """Apply the marked removals and insertions. Rebuilding ``graph.node`` copies the
        nodes, so a rule makes every other edit through its node references first."""
        nodes: list[onnx.NodeProto] = []
        for i, node in enumerate(graph.node):
            if i in self.dropped:
                continue
            nodes.append(node)
            nodes += [new for anchor, new in self.inserted if anchor in node.output]
        del graph.node[:]
        graph.node.extend(nodes)
        self.dropped, self.inserted = set(), []


def fold(layer: onnx.NodeProto, weight: np.ndarray, direction: str, channels: int) -> Fold:
    return Fold(node_label(layer), layer.op_type, list(weight.shape), direction, channels)


def readers(scope: Scope, name: str) -> str:
    """Why ``name`` cannot be rewired: who else reads it."""
    if name in scope.outputs:
        return f"'{name}' is a graph output"
    return f"'{name}' is read by {scope.uses[name]} nodes"


def same(a: onnx.NodeProto | None, b: onnx.NodeProto) -> bool:
    """Whether ``a`` is the node ``b`` (nodes are told apart by their first output)."""
    return a is not None and a.output[0] == b.output[0]
