"""Walking an ONNX graph with its subgraphs, and counting ops in it: BatchNormalization
nodes, QuantizeLinear/DequantizeLinear.

The exporter records these counts in ``metadata.json`` and the service counts again.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

BATCHNORM = "BatchNormalization"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The bodies of an If/Loop/Scan node (any graph-valued attribute)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in it, outermost first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from all_graphs(sub)


def op_counts(model: onnx.ModelProto, ops: tuple[str, ...]) -> dict[str, int]:
    """How many nodes of each op in ``ops`` the graph, its subgraphs and its local
    functions hold (``{op: 0}`` for an absent one)."""
    nodes = [n for g in all_graphs(model.graph) for n in g.node]
    nodes += [n for f in model.functions for n in f.node]
    return {op: sum(1 for node in nodes if node.op_type == op) for op in ops}


def batchnorm_nodes(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the graph, its subgraphs and its local functions."""
    return op_counts(model, (BATCHNORM,))[BATCHNORM]
