"""Eager PyTorch folded-vs-unfolded latency, interleaved so noise hits both alike.

The speedup and its interval are the service's fold-latency statistic
(:func:`foldserve.latency_stats.paired_speedup`: a paired percentile bootstrap of
the ratio of medians), so eager PyTorch and ONNX Runtime numbers compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from rich.table import Table
from torch import nn

from foldserve.latency_stats import Speedup, paired_speedup
from training.fold import fold_batchnorm


@dataclass(frozen=True)
class TorchBench:
    """Per-call wall times (seconds) of interleaved runs: pair ``i`` ran back to back."""

    device: str
    batch_size: int
    unfolded_s: np.ndarray
    folded_s: np.ndarray
    max_abs_diff: float

    @property
    def iterations(self) -> int:
        return int(self.folded_s.size)

    def p50_ms(self) -> tuple[float, float]:
        """(unfolded, folded) median milliseconds per call."""
        return float(np.median(self.unfolded_s)) * 1e3, float(np.median(self.folded_s)) * 1e3

    def speedup(self, seed: int = 0) -> Speedup:
        return paired_speedup(self.unfolded_s, self.folded_s, seed=seed)


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
    return TorchBench(device, batch_size, tu, tf, diff)


def bench_table(
    model: nn.Module,
    input_shape: tuple[int, ...],
    devices: list[str],
    batch_size: int,
    iterations: int,
    warmup: int,
) -> Table:
    """``bench_folding`` on each device, as a rich table for the ``bench-torch`` command."""
    table = Table(title=f"eager PyTorch, batch {batch_size}, {iterations} interleaved runs")
    for col in ("device", "unfolded p50 ms", "folded p50 ms", "speedup (95% CI)", "max abs diff"):
        table.add_column(col)
    for device in devices:
        b = bench_folding(
            model,
            input_shape,
            batch_size=batch_size,
            iterations=iterations,
            warmup=warmup,
            device=device,
        )
        s = b.speedup()
        unfolded_ms, folded_ms = b.p50_ms()
        table.add_row(
            device,
            f"{unfolded_ms:.3f}",
            f"{folded_ms:.3f}",
            f"{s.ratio:.3f}x [{s.ci_low:.3f}, {s.ci_high:.3f}]",
            f"{b.max_abs_diff:.2g}",
        )
    return table
