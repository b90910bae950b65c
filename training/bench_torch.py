"""Eager PyTorch folded-vs-unfolded latency, interleaved so noise hits both alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from service.stats import LatencySummary, Speedup, paired_speedup, summarize
from training.fold import fold_batchnorm


@dataclass
class TorchBench:
    device: str
    batch_size: int
    iterations: int
    unfolded: LatencySummary
    folded: LatencySummary
    speedup: Speedup
    max_abs_diff: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "batch_size": self.batch_size,
            "iterations": self.iterations,
            "unfolded": self.unfolded.to_dict(),
            "folded": self.folded.to_dict(),
            "speedup": self.speedup.to_dict(),
            "max_abs_diff": self.max_abs_diff,
        }


def _timer(fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], float]:
    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return run


@torch.inference_mode()
def bench_folding(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 8,
    iterations: int = 200,
    warmup: int = 20,
    device: str = "cpu",
    seed: int = 0,
) -> TorchBench:
    """Time ``model`` and its folded copy, alternating calls, on the same random batch."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *input_shape), generator=gen)
    folded, _ = fold_batchnorm(model, x[:2])
    unfolded = model.eval()
    folded, unfolded = folded.to(dev).eval(), unfolded.to(dev)
    x = x.to(dev)
    diff = float((folded(x) - unfolded(x)).abs().max())
    run_u, run_f = _timer(lambda: unfolded(x), dev), _timer(lambda: folded(x), dev)
    for _ in range(warmup):
        run_u(), run_f()
    tu, tf = np.empty(iterations), np.empty(iterations)
    for i in range(iterations):
        # Alternate which variant goes first so neither always follows the other.
        if i % 2 == 0:
            tu[i], tf[i] = run_u(), run_f()
        else:
            tf[i], tu[i] = run_f(), run_u()
    unfolded.cpu()
    return TorchBench(
        device,
        batch_size,
        iterations,
        summarize(tu, batch_size),
        summarize(tf, batch_size),
        paired_speedup(tu, tf),
        diff,
    )
