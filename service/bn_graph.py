"""BatchNormalization facts of an ONNX graph: how many, fed by what, left after ORT's passes."""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

from service.model_format import BATCHNORM, batchnorm_nodes

log = logging.getLogger(__name__)


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
