"""Eager PyTorch folded-vs-unfolded latency, interleaved so noise hits both alike.

The speedup's interval is scipy's paired percentile bootstrap of the ratio of
medians: the definition the service's fold-latency report uses
(``service/stats.py``, numpy only because the serving image has no scipy),
computed here by the library rather than imported across the
training/service boundary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.table import Table
from scipy import stats
from torch import nn

from training.fold import fold_batchnorm


@dataclass(frozen=True)
class Speedup:
    """``unfolded p50 / folded p50`` with a 95% interval over the paired runs."""

    ratio: float
    ci_low: float
    ci_high: float


def _ratio_of_medians(a: np.ndarray, b: np.ndarray, axis: int = -1) -> Any:
    return np.median(a, axis=axis) / np.median(b, axis=axis)


def paired_speedup(baseline: np.ndarray, candidate: np.ndarray, seed: int = 0) -> Speedup:
    """Median-ratio speedup of ``candidate`` over ``baseline`` (>1: candidate faster), with
    a percentile bootstrap that resamples the interleaved pairs together."""
    ci = stats.bootstrap(
        (baseline, candidate),
        _ratio_of_medians,
        paired=True,
        vectorized=True,
        n_resamples=2000,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    ratio = float(_ratio_of_medians(baseline, candidate))
    return Speedup(ratio, float(ci.low), float(ci.high))


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
        return paired_speedup(self.unfolded_s, self.folded_s, seed)


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
