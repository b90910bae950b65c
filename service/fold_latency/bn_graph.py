"""BatchNormalization facts of an ONNX graph: how many, fed by what, left after ORT's passes."""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from foldserve.model_graph import BATCHNORM, batchnorm_nodes
from service.models.sessions import session_options

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


PROFILED_RUNS = 20


def batchnorm_share(
    model_bytes: bytes,
    provider: str,
    threads: int,
    optimized: bool,
    feeds: dict[str, np.ndarray],
    runs: int = PROFILED_RUNS,
) -> float | None:
    """The share of ``model_bytes``' kernel time spent in BatchNormalization kernels, over
    ``runs`` profiled runs on ``feeds`` (ONNX Runtime's own profiler, a session of its own
    with the given provider, threads and optimization level). With ORT's optimizations on,
    a BN that ORT fused into its Conv costs nothing here, as in serving. None when the
    profile has no kernel times (a provider that does not report them)."""
    options = session_options(threads, optimized=optimized)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="foldserve-profile-") as tmp:
        options.profile_file_prefix = str(Path(tmp) / "bn")
        session = ort.InferenceSession(model_bytes, sess_options=options, providers=[provider])
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [
        e
        for e in events
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
    ]
    total = sum(float(e.get("dur", 0)) for e in kernels)
    if total <= 0:
        return None
    bn = sum(
        float(e.get("dur", 0)) for e in kernels if e.get("args", {}).get("op_name") == BATCHNORM
    )
    return bn / total
