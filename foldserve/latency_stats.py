"""Latency statistics shared by the service, the torch benchmark and bench/ (numpy only).

Folded and unfolded variants are timed interleaved (A B A B ...), so sample
``i`` of each forms a pair that saw the same machine noise; the speedup's
confidence interval is a bootstrap over those pairs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# Bootstrap resamples are drawn in blocks so memory stays ~ _BLOCK_ELEMENTS * 8 bytes
# whatever the number of runs (2000 resamples x 5000 runs at once would be 80 MB per array).
_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class LatencySummary:
    """Per-variant latency in milliseconds and throughput in samples per second (at p50)."""

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

    @property
    def significant(self) -> bool:
        """True when the interval excludes 1 (a real difference, either way)."""
        return self.ci_low > 1.0 or self.ci_high < 1.0


def summarize(seconds: np.ndarray, batch_size: int) -> LatencySummary:
    """Summarize per-call wall times (seconds) of calls processing ``batch_size`` samples.

    Throughput is ``batch_size / p50``, like the speedup: from the mean, one slow
    outlier run can make the faster variant look slower beside a verdict that says
    it is faster.
    """
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no latency samples to summarize")
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return LatencySummary(float(p50), float(p90), float(p99), mean, batch_size * 1e3 / float(p50))


def paired_speedup(
    baseline: np.ndarray, candidate: np.ndarray, *, resamples: int = 2000, seed: int = 0
) -> Speedup:
    """Median-ratio speedup of ``candidate`` over ``baseline`` (>1: candidate faster).

    Both arrays hold per-call times of interleaved runs (same length). The interval
    resamples the pairs with replacement (the same indices for both series, so a
    noisy moment stays paired) and takes the 2.5/97.5 percentiles of the ratio of
    medians. Deterministic for a given ``seed``.
    """
    a, b = np.asarray(baseline, np.float64), np.asarray(candidate, np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size < 2:
        raise ValueError(f"need two equal-length series of >= 2 runs, got {a.shape}, {b.shape}")
    if resamples < 1:
        raise ValueError("resamples must be >= 1")
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // a.size)
    ratios = np.empty(resamples)
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        idx = rng.integers(0, a.size, size=(rows, a.size))  # (rows, n) paired indices
        ratios[start : start + rows] = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return Speedup(float(np.median(a) / np.median(b)), float(low), float(high))


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a Prometheus histogram, as ``histogram_quantile()`` estimates it.

    ``buckets`` are cumulative ``(upper bound, count)`` pairs, ``+Inf`` last; the value
    is interpolated linearly inside the bucket that holds the quantile (the highest
    finite bound when it falls in ``+Inf``). None when the histogram is empty.
    """
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower
