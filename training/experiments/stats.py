"""Statistics and verdict rules for the BN experiments (pure functions, no torch).

Every claim is tested by one or more :class:`Comparison` objects: per-seed values
of a metric for two arms (``a``, usually the BN model, and ``b``, its no-BN
twin). The effect is oriented so that a *positive* effect is what the claim
predicts. Its 95% confidence interval is Welch's (unequal variances), and the
outcome and the claim's verdict follow the fixed rules in :data:`RULES`, which
the report quotes verbatim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import stats

Outcome = Literal["positive", "negative", "negligible", "inconclusive"]
Verdict = Literal["holds", "holds partly", "does not hold", "not distinguishable from noise"]

CONFIDENCE = 0.95

RULES = f"""\
For each comparison, `effect = direction * (mean(a) - mean(b))` over seeds, oriented so that
a positive effect is what the claim predicts. `CI` is the {CONFIDENCE:.0%} Welch confidence
interval of that difference of means (unequal variances, Welch-Satterthwaite degrees of
freedom, Student t quantile; when both arms have zero spread the CI is the point itself).
`delta` is the smallest effect that matters, fixed per metric before the run. Spread is the
sample standard deviation over seeds; `d` is Cohen's d (difference of means over the pooled
standard deviation).

Outcome of one comparison, first rule that applies:
1. **negligible**: the whole CI lies inside (-delta, +delta);
2. **positive**: CI lower bound > 0 (the claimed direction, beyond noise);
3. **negative**: CI upper bound < 0 (the opposite direction, beyond noise);
4. **inconclusive**: otherwise (the CI spans 0 and reaches beyond delta).

Verdict of a claim, from its *primary* comparisons only (secondary ones are context):
- **holds**: every primary comparison is positive;
- **holds partly**: at least one primary comparison is positive, but not all;
- **does not hold**: none is positive, and at least one is negative or negligible;
- **not distinguishable from noise**: otherwise (every primary comparison is inconclusive).
"""


@dataclass
class Comparison:
    """Two arms of one metric over seeds; :func:`evaluate_comparison` fills the statistics."""

    label: str
    metric: str
    unit: str  # "%" (a fraction shown in percent), "epochs", "s", "decades", ...
    effect_definition: str
    a_label: str
    b_label: str
    a: list[float]
    b: list[float]
    direction: int  # +1: claim predicts a > b; -1: claim predicts a < b
    delta: float
    primary: bool = True
    note: str = ""
    mean_a: float = field(default=math.nan, init=False)
    std_a: float = field(default=math.nan, init=False)
    mean_b: float = field(default=math.nan, init=False)
    std_b: float = field(default=math.nan, init=False)
    effect: float = field(default=math.nan, init=False)
    ci_low: float = field(default=math.nan, init=False)
    ci_high: float = field(default=math.nan, init=False)
    cohens_d: float | None = field(default=None, init=False)
    outcome: Outcome = field(default="inconclusive", init=False)

    def __post_init__(self) -> None:
        if self.direction not in (1, -1):
            raise ValueError(f"direction must be +1 or -1, got {self.direction}")
        if not all(math.isfinite(v) for v in [*self.a, *self.b]):
            raise ValueError(
                f"{self.label}: per-seed values must be finite, got a={self.a}, b={self.b}"
            )
        if len(self.a) < 2 or len(self.b) < 2:
            raise ValueError(
                f"{self.label}: need at least 2 seeds per arm for a spread, "
                f"got {len(self.a)} and {len(self.b)}"
            )
        evaluate_comparison(self)


def welch_ci(
    a: list[float], b: list[float], confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """``(mean(a) - mean(b), low, high)``: Welch's CI for a difference of means.

    Needs at least 2 values per arm. With zero spread in both arms the interval is
    the point difference (every seed agreed).
    """
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = float(xa.mean() - xb.mean())
    va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return diff, diff - half, diff + half


def cohens_d(a: list[float], b: list[float]) -> float | None:
    """Difference of means over the pooled sample std; ``None`` when that std is 0."""
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    pooled = math.sqrt(
        ((len(xa) - 1) * xa.var(ddof=1) + (len(xb) - 1) * xb.var(ddof=1)) / (len(xa) + len(xb) - 2)
    )
    return None if pooled == 0.0 else float(xa.mean() - xb.mean()) / pooled


def classify(ci_low: float, ci_high: float, delta: float) -> Outcome:
    """Outcome of one comparison from its oriented CI (rules 1-4 of :data:`RULES`)."""
    if -delta < ci_low and ci_high < delta:
        return "negligible"
    if ci_low > 0:
        return "positive"
    if ci_high < 0:
        return "negative"
    return "inconclusive"


def evaluate_comparison(c: Comparison) -> None:
    """Fill ``c``'s means, spreads, oriented effect, CI, Cohen's d and outcome."""
    c.mean_a, c.mean_b = float(np.mean(c.a)), float(np.mean(c.b))
    c.std_a, c.std_b = float(np.std(c.a, ddof=1)), float(np.std(c.b, ddof=1))
    diff, low, high = welch_ci(c.a, c.b)
    if c.direction == 1:
        c.effect, c.ci_low, c.ci_high = diff, low, high
    else:  # "+ 0.0" turns -0.0 into 0.0
        c.effect, c.ci_low, c.ci_high = -diff + 0.0, -high + 0.0, -low + 0.0
    d = cohens_d(c.a, c.b)
    c.cohens_d = None if d is None else c.direction * d
    c.outcome = classify(c.ci_low, c.ci_high, c.delta)


def claim_verdict(outcomes: list[Outcome]) -> Verdict:
    """Verdict of a claim from its primary comparisons' outcomes (see :data:`RULES`)."""
    if not outcomes:
        raise ValueError("a claim needs at least one primary comparison")
    positive = sum(o == "positive" for o in outcomes)
    if positive == len(outcomes):
        return "holds"
    if positive > 0:
        return "holds partly"
    if any(o in ("negative", "negligible") for o in outcomes):
        return "does not hold"
    return "not distinguishable from noise"
