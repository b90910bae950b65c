"""Counting ops in an ONNX graph: BatchNormalization nodes, QuantizeLinear/DequantizeLinear.

The exporter records these counts in ``metadata.json`` and the service counts again.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

BATCHNORM = "BatchNormalization"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _nodes(sub)


def op_counts(model: onnx.ModelProto, ops: tuple[str, ...]) -> dict[str, int]:
    """How many nodes of each op in ``ops`` the graph, its subgraphs and its local
    functions hold (``{op: 0}`` for an absent one)."""
    nodes = [*_nodes(model.graph), *(n for f in model.functions for n in f.node)]
    return {op: sum(1 for node in nodes if node.op_type == op) for op in ops}


def batchnorm_nodes(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the graph, its subgraphs and its local functions."""
    return op_counts(model, (BATCHNORM,))[BATCHNORM]
