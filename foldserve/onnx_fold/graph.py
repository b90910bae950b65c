"""An ONNX graph as the folder sees it: who produces and consumes each value, which values
are constants, which are graph outputs, and the few edits a fold makes (drop nodes, insert a
node, add an initializer). Pure ``onnx`` + numpy; every edit is on the caller's copy."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from foldserve.model_graph import all_graphs, subgraphs

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


def model_uses(model: onnx.ModelProto) -> Counter[str]:
    """How often each value is read, anywhere in the model: node inputs in every graph
    (an If branch reading an outer value counts) and graph outputs."""
    uses: Counter[str] = Counter()
    for graph in all_graphs(model.graph):
        for node in graph.node:
            uses.update(name for name in node.input if name)
        uses.update(out.name for out in graph.output)
    return uses


def attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    value = attribute(node, name, default)
    return int(value) if isinstance(value, int | float) else default


def float_attribute(node: onnx.NodeProto, name: str, default: float) -> float:
    value = attribute(node, name, default)
    return float(value) if isinstance(value, int | float) else default


def set_attribute(node: onnx.NodeProto, name: str, value: object) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def node_label(node: onnx.NodeProto) -> str:
    """The node's name, or (when the exporter left it empty) its op type and first output."""
    return node.name or f"{node.op_type}->{node.output[0]}"


@dataclass
class Scope:
    """One graph (the model's or a subgraph) with what the rules ask of it. ``parent`` is the
    enclosing graph's scope: a subgraph may read its constants. Rebuilt after every edit."""

    graph: onnx.GraphProto
    parent: Scope | None
    uses: Counter[str]
    ranks: dict[str, int]
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    constant_nodes: dict[str, onnx.NodeProto] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                self.constant_nodes[node.output[0]] = node
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.outputs = {out.name for out in self.graph.output}

    def constant_tensor(self, name: str) -> onnx.TensorProto | None:
        """The value behind ``name`` if it is a constant no caller can override."""
        scope: Scope | None = self
        while scope is not None:
            if name in scope.initializers:
                # An initializer also listed as a graph input (older exporters'
                # keep_initializers_as_inputs) counts with its stored value, as the
                # self-check runs it; the folded model stops reading it.
                return scope.initializers[name]
            if name in scope.constant_nodes:
                node = scope.constant_nodes[name]
                for attr in node.attribute:
                    if attr.name == "value":
                        value: onnx.TensorProto = attr.t
                        return value
                return None  # value_float(s)/value_int(s): not weights
            if name in scope.producer:
                return None
            scope = scope.parent
        return None

    def constant(self, name: str) -> tuple[np.ndarray, int] | None:
        """(value in float64, ONNX element type) of a float constant, else None."""
        tensor = self.constant_tensor(name)
        if tensor is None or tensor.data_type not in FLOAT_TYPES:
            return None
        return numpy_helper.to_array(tensor).astype(np.float64), tensor.data_type

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        """The one node of this graph reading ``name``, if exactly one node anywhere reads it
        and it is not a graph output."""
        readers = self.consumers.get(name, [])
        if self.uses[name] != 1 or len(readers) != 1 or name in self.outputs:
            return None
        return readers[0]

    def rank(self, name: str) -> int | None:
        return self.ranks.get(name)


def value_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every value whose shape ONNX's shape inference can tell (all graphs)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, ValueError):
        inferred = model
    ranks: dict[str, int] = {}
    for graph in all_graphs(inferred.graph):
        for info in [*graph.input, *graph.output, *graph.value_info]:
            t = info.type.tensor_type
            if info.type.HasField("tensor_type") and t.HasField("shape"):
                ranks[info.name] = len(t.shape.dim)
        for init in graph.initializer:
            ranks[init.name] = len(init.dims)
    return ranks


def scopes(model: onnx.ModelProto, ranks: dict[str, int] | None = None) -> list[Scope]:
    """A scope per graph of the model (the main graph first), indexed afresh. ``ranks``: from
    an earlier call (folds keep every value's rank), else inferred."""
    uses = model_uses(model)
    ranks = value_ranks(model) if ranks is None else ranks
    found: list[Scope] = []

    def walk(graph: onnx.GraphProto, parent: Scope | None) -> None:
        scope = Scope(graph, parent, uses, ranks)
        found.append(scope)
        for node in graph.node:
            for sub in subgraphs(node):
                walk(sub, scope)

    walk(model.graph, None)
    return found


def tensor_like(values: np.ndarray, data_type: int, name: str) -> onnx.TensorProto:
    """``values`` (float64) rounded once to ``data_type``, as an initializer named ``name``."""
    np_type = onnx.helper.tensor_dtype_to_np_dtype(data_type)
    return numpy_helper.from_array(np.asarray(values).astype(np_type), name)


def fresh_name(model_names: set[str], base: str) -> str:
    name, k = base, 0
    while name in model_names:
        k += 1
        name = f"{base}_{k}"
    model_names.add(name)
    return name


def all_names(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()
    for graph in all_graphs(model.graph):
        names.update(t.name for t in graph.initializer)
        names.update(i.name for i in graph.input)
        for node in graph.node:
            names.update(node.output)
            names.update(node.input)
    return names


def drop_nodes(graph: onnx.GraphProto, first_outputs: set[str]) -> None:
    """Remove the nodes whose first output is in ``first_outputs``."""
    kept = [n for n in graph.node if n.output[0] not in first_outputs]
    del graph.node[:]
    graph.node.extend(kept)


def insert_after(graph: onnx.GraphProto, anchor_output: str, node: onnx.NodeProto) -> None:
    """Put ``node`` right after the node producing ``anchor_output`` (keeps the order
    topological when ``node`` reads that output)."""
    nodes = list(graph.node)
    at = next(i for i, n in enumerate(nodes) if anchor_output in n.output)
    nodes.insert(at + 1, node)
    del graph.node[:]
    graph.node.extend(nodes)


def drop_unused_constants(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove initializers (with their graph-input entries, if listed there) and Constant
    nodes among ``candidates`` that nothing reads any more. A graph input with no
    initializer is the caller's and stays."""
    uses = model_uses(model)
    dead = {name for name in candidates if uses[name] == 0}
    for graph in all_graphs(model.graph):
        dropped = {t.name for t in graph.initializer if t.name in dead}
        if dropped:
            kept = [t for t in graph.initializer if t.name not in dropped]
            del graph.initializer[:]
            graph.initializer.extend(kept)
            ins = [i for i in graph.input if i.name not in dropped]
            del graph.input[:]
            graph.input.extend(ins)
        drop_nodes(
            graph,
            {n.output[0] for n in graph.node if n.op_type == "Constant" and n.output[0] in dead},
        )
    produced = {o for g in all_graphs(model.graph) for n in g.node for o in n.output}
    for graph in all_graphs(model.graph):  # shapes of values a fold renamed away
        infos = [v for v in graph.value_info if v.name in produced]
        del graph.value_info[:]
        graph.value_info.extend(infos)
