"""BatchNormalization facts of an ONNX graph: how many, fed by what, left after ORT's passes."""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnxruntime as ort

log = logging.getLogger(__name__)

BATCHNORM = "BatchNormalization"


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


def batchnorm_nodes(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the graph, its subgraphs and its local functions."""
    nodes = [*_nodes(model.graph), *(n for f in model.functions for n in f.node)]
    return sum(1 for node in nodes if node.op_type == BATCHNORM)


def batchnorm_inputs(model: onnx.ModelProto) -> dict[str, int]:
    """What feeds each top-level BatchNormalization node: ``{"Conv": 9}``, ``{"Gemm": 2}``;
    ``graph input`` when it reads a graph input or an initializer."""
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    found = Counter(
        producer.get(node.input[0], "graph input")
        for node in model.graph.node
        if node.op_type == BATCHNORM
    )
    return dict(sorted(found.items()))


def batchnorm_after_ort(model_bytes: bytes, provider: str) -> int | None:
    """BatchNormalization nodes left once ONNX Runtime (ORT_ENABLE_ALL, ``provider``) has
    optimized the graph: read from the optimized model ORT writes out. None if ORT
    cannot write it (some providers compile the graph away)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the "optimized model is hardware-specific" warning
    with tempfile.TemporaryDirectory(prefix="foldserve-ort-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        options.optimized_model_filepath = str(path)
        try:
            ort.InferenceSession(model_bytes, sess_options=options, providers=[provider])
            return batchnorm_nodes(onnx.load_model(str(path), load_external_data=False))
        except Exception as err:  # ORT's or onnx's own errors: report the fact as unknown
            log.info("cannot read ORT's optimized graph (%s): %s", provider, err)
            return None
