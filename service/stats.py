"""Latency statistics shared by the service and the benchmarks (numpy only).

Folded and unfolded variants are timed interleaved (A B A B ...), so sample
``i`` of each forms a pair that saw the same machine noise; the speedup's
confidence interval is a bootstrap over those pairs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LatencySummary:
    """Per-variant latency in milliseconds and throughput in samples per second."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    samples_per_s: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Speedup:
    """``unfolded p50 / folded p50`` with a bootstrap 95% interval over paired runs."""

    ratio: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "ci95": [self.ci_low, self.ci_high]}


def summarize(seconds: np.ndarray, batch_size: int) -> LatencySummary:
    """Summarize per-call wall times (seconds) of calls processing ``batch_size`` samples."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no latency samples to summarize")
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return LatencySummary(float(p50), float(p90), float(p99), mean, batch_size * 1e3 / mean)


def paired_speedup(
    baseline: np.ndarray, candidate: np.ndarray, *, resamples: int = 2000, seed: int = 0
) -> Speedup:
    """Median-ratio speedup of ``candidate`` over ``baseline`` (>1: candidate faster).

    Both arrays hold per-call times of interleaved runs (same length). The interval
    resamples the pairs with replacement and takes the 2.5/97.5 percentiles.
    """
    a, b = np.asarray(baseline, np.float64), np.asarray(candidate, np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"need two equal-length series of >= 2 runs, got {a.shape}, {b.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return Speedup(float(np.median(a) / np.median(b)), float(low), float(high))
