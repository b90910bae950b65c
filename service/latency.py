"""Folded-vs-unfolded latency on the live runtime: two ORT sessions in, a report out.

Both sessions run on the same provider and thread settings, on the same inputs,
interleaved (A B A B ..., with the order alternating each round) after warm-up, so
that machine noise hits both variants alike.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from service.stats import paired_speedup, summarize

# ORT fuses Conv+BatchNormalization itself at its BASIC level, not Gemm+BatchNormalization.
_CASE_DEFAULT = (
    "ONNX Runtime graph optimizations ON ({level}): what a user gets. ORT already fuses "
    "Conv+BatchNormalization itself, so for a CNN the unfolded file is folded by the runtime "
    "and little gain is expected; it does not fuse Gemm+BatchNormalization (Linear followed by "
    "BatchNorm1d), where folding still pays."
)
_CASE_ISOLATED = (
    "ONNX Runtime graph optimizations DISABLED in both sessions: this isolates what folding "
    "itself buys (every BatchNormalization node of the unfolded file really runs)."
)
NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class LatencyParams:
    batch_size: int = 1
    iterations: int = 200
    warmup: int = 20
    isolate: bool = False
    seed: int = 0


def random_feeds(session: ort.InferenceSession, batch_size: int, seed: int) -> dict[str, Any]:
    """Random inputs drawn from the session's input spec; the batch axis set to ``batch_size``."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    for arg in session.get_inputs():
        dims = [batch_size if i == 0 else d for i, d in enumerate(arg.shape)]
        if any(not isinstance(d, int) for d in dims):
            raise ValueError(f"input {arg.name!r} has symbolic non-batch dims {arg.shape}")
        dtype = NP_TYPES.get(arg.type)
        if dtype is None:
            raise ValueError(f"input {arg.name!r} has unsupported type {arg.type}")
        feeds[arg.name] = rng.normal(size=dims).astype(dtype)
    return feeds


def machine_facts(providers: list[str]) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "onnxruntime": ort.__version__,
        "gpu": None,
    }
    if "CUDAExecutionProvider" in providers:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            facts["gpu"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            facts["gpu"] = "unknown CUDA device"
    return facts


def measure(
    folded: ort.InferenceSession, unfolded: ort.InferenceSession, params: LatencyParams
) -> dict[str, Any]:
    """Time both sessions interleaved; return the report body (ms, samples/s, speedup CI)."""
    feeds = random_feeds(folded, params.batch_size, params.seed)
    out_f = folded.run(None, feeds)
    out_u = unfolded.run(None, feeds)
    diff = max(
        float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(out_f, out_u, strict=True)
    )
    for _ in range(params.warmup):
        folded.run(None, feeds)
        unfolded.run(None, feeds)
    tf, tu = np.empty(params.iterations), np.empty(params.iterations)
    clock = time.perf_counter
    for i in range(params.iterations):
        order = ((folded, tf), (unfolded, tu)) if i % 2 == 0 else ((unfolded, tu), (folded, tf))
        for sess, times in order:
            t0 = clock()
            sess.run(None, feeds)
            times[i] = clock() - t0
    level = "ORT_DISABLE_ALL" if params.isolate else "ORT_ENABLE_ALL"
    providers = folded.get_providers()
    return {
        "folded": summarize(tf, params.batch_size).to_dict(),
        "unfolded": summarize(tu, params.batch_size).to_dict(),
        "speedup": paired_speedup(tu, tf).to_dict(),
        "max_abs_diff": diff,
        "provider": providers[0],
        "providers": providers,
        "graph_optimization_level": level,
        "isolate": params.isolate,
        "case": (_CASE_ISOLATED if params.isolate else _CASE_DEFAULT.format(level=level)),
        "batch_size": params.batch_size,
        "iterations": params.iterations,
        "warmup": params.warmup,
        "machine": machine_facts(providers),
    }
