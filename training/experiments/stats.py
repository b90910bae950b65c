"""Statistics and verdict rules for the BN experiments (pure functions, no torch).

Every claim is tested by :class:`Comparison` objects: per-seed values of a
metric for two arms (``a``, usually the BN model, and ``b``, its no-BN twin)
that share each seed's data split and initialization, so the analysis is
*paired*: it works on the per-seed differences. The effect is oriented so that
a positive effect is what the claim predicts. p-values are Holm-corrected over
every comparison of the report (:func:`apply_holm`), and the outcome and
verdict follow the fixed rules in :data:`RULES`, which the report quotes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import stats

Outcome = Literal["positive", "negative", "negligible", "inconclusive"]
Verdict = Literal["holds", "holds partly", "does not hold", "not distinguishable from noise"]
Role = Literal["primary", "secondary", "sensitivity"]

CONFIDENCE = 0.95
ALPHA = 0.05  # family-wise error rate of the whole report, after Holm's correction
POWER = 0.8  # power at which the smallest detectable effect is computed

RULES = f"""\
Every comparison is *paired by seed*: seed `i` fixes the data split and the initial weights of
both arms, so the analysis works on the per-seed differences `d_i = direction * (a_i - b_i)`,
oriented so that a positive effect is what the claim predicts. `effect` is their mean; `CI` is
the {CONFIDENCE:.0%} paired-t confidence interval (Student t with n - 1 degrees of freedom); `p`
is the two-sided paired t-test's p-value. When all seeds give the same difference the t-test is
undefined: the CI is then the point and `p` is the exact two-sided sign test's
(`2 * 0.5^n` when all n differences share a sign, 1 when they are all zero).
`p (Holm)` is `p` after Holm's step-down correction over a family: **all primary comparisons
of the report** (every verdict rests on them), which keeps the chance of any false positive
among the verdicts' comparisons at or below {ALPHA:g}; the secondary and sensitivity rows form
a second family, corrected the same way. `MDE` is the smallest true effect the comparison
would detect with {POWER:.0%} power at the Bonferroni level {ALPHA:g}/m (m: the size of its
family; Holm's first step), from the observed spread of the differences:
`(t(1 - alpha/2m, n-1) + t({POWER:g}, n-1)) * sd(d) / sqrt(n)`.
`delta` is the smallest effect that matters, fixed per metric before the run.

Outcome of one comparison, first rule that applies:
1. **negligible**: the whole CI lies inside (-delta, +delta);
2. **positive**: `p (Holm)` < {ALPHA:g} and the effect is > 0 (the claimed direction);
3. **negative**: `p (Holm)` < {ALPHA:g} and the effect is < 0 (the opposite direction);
4. **inconclusive**: otherwise.

Verdict of a claim, from its *primary* comparisons only (secondary and sensitivity rows are
context; a sensitivity row re-reads the same runs at another threshold):
- **holds**: every primary comparison is positive;
- **holds partly**: at least one primary comparison is positive, but not all;
- **does not hold**: none is positive, and at least one is negative or negligible;
- **not distinguishable from noise**: otherwise (every primary comparison is inconclusive).
"""


@dataclass
class PairedTest:
    """The paired analysis of per-seed differences ``d`` (already oriented)."""

    effect: float
    ci_low: float
    ci_high: float
    sd: float
    p_value: float
    test: str  # "paired t" or "sign test"


def paired_test(d: Sequence[float], confidence: float = CONFIDENCE) -> PairedTest:
    """Mean, paired-t CI and two-sided p of differences ``d`` (>= 2 values).

    Without any spread the CI is the point and p is the exact sign test's.
    """
    x = np.asarray(d, dtype=np.float64)
    n, mean = len(x), float(x.mean())
    sd = float(x.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(mean)):
        nonzero = int(np.count_nonzero(x))
        p = 1.0 if nonzero == 0 else min(1.0, 2.0 * 0.5**nonzero)
        return PairedTest(mean, mean, mean, 0.0, p, "sign test")
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    p = float(2.0 * stats.t.sf(abs(mean) / se, n - 1))
    return PairedTest(mean, mean - half, mean + half, sd, p, "paired t")


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def detectable_effect(sd: float, n: int, family: int) -> float | None:
    """Smallest effect found with :data:`POWER` at level ALPHA/family (None: no spread)."""
    if sd <= 0.0 or n < 2:
        return None
    alpha = ALPHA / max(family, 1)
    t_alpha = float(stats.t.ppf(1 - alpha / 2, n - 1))
    t_power = float(stats.t.ppf(POWER, n - 1))
    return (t_alpha + t_power) * sd / math.sqrt(n)


@dataclass
class Comparison:
    """Two arms of one metric, paired by seed; :func:`evaluate_comparison` fills the statistics."""

    label: str
    metric: str
    unit: str  # "%" (a fraction shown in percent), "pp", "epochs", "s", "decades", ...
    effect_definition: str
    a_label: str
    b_label: str
    a: list[float]
    b: list[float]
    direction: int  # +1: claim predicts a > b; -1: claim predicts a < b
    delta: float
    role: Role = "primary"
    note: str = ""
    mean_a: float = field(default=math.nan, init=False)
    std_a: float = field(default=math.nan, init=False)
    mean_b: float = field(default=math.nan, init=False)
    std_b: float = field(default=math.nan, init=False)
    effect: float = field(default=math.nan, init=False)
    ci_low: float = field(default=math.nan, init=False)
    ci_high: float = field(default=math.nan, init=False)
    sd_diff: float = field(default=math.nan, init=False)
    p_value: float = field(default=1.0, init=False)
    test: str = field(default="", init=False)
    p_holm: float = field(default=1.0, init=False)
    mde: float | None = field(default=None, init=False)
    outcome: Outcome = field(default="inconclusive", init=False)

    @property
    def primary(self) -> bool:
        return self.role == "primary"

    def __post_init__(self) -> None:
        if self.direction not in (1, -1):
            raise ValueError(f"direction must be +1 or -1, got {self.direction}")
        if not all(math.isfinite(v) for v in [*self.a, *self.b]):
            raise ValueError(
                f"{self.label}: per-seed values must be finite, got a={self.a}, b={self.b}"
            )
        if len(self.a) != len(self.b) or len(self.a) < 2:
            raise ValueError(
                f"{self.label}: need the same seeds (at least 2) in both arms, "
                f"got {len(self.a)} and {len(self.b)}"
            )
        evaluate_comparison(self)


def classify(ci_low: float, ci_high: float, delta: float, effect: float, p_holm: float) -> Outcome:
    """Outcome of one comparison (rules 1-4 of :data:`RULES`)."""
    if -delta < ci_low and ci_high < delta:
        return "negligible"
    if p_holm < ALPHA and effect > 0:
        return "positive"
    if p_holm < ALPHA and effect < 0:
        return "negative"
    return "inconclusive"


def evaluate_comparison(c: Comparison, family: int = 1) -> None:
    """Fill ``c``'s means, spreads, paired effect, CI, p and outcome (as a family of one)."""
    c.mean_a, c.mean_b = float(np.mean(c.a)), float(np.mean(c.b))
    c.std_a, c.std_b = float(np.std(c.a, ddof=1)), float(np.std(c.b, ddof=1))
    d = [c.direction * (x - y) + 0.0 for x, y in zip(c.a, c.b, strict=True)]
    t = paired_test(d)
    c.effect, c.ci_low, c.ci_high = t.effect, t.ci_low, t.ci_high
    c.sd_diff, c.p_value, c.test = t.sd, t.p_value, t.test
    set_holm(c, c.p_value, family)


def set_holm(c: Comparison, p_holm: float, family: int) -> None:
    """Record the corrected p-value and the detectable effect, and re-classify."""
    c.p_holm = p_holm
    c.mde = detectable_effect(c.sd_diff, len(c.a), family)
    c.outcome = classify(c.ci_low, c.ci_high, c.delta, c.effect, p_holm)


def apply_holm(comparisons: Sequence[Comparison]) -> None:
    """Holm-correct p over two families and re-classify: the primary comparisons (the
    verdicts' family) and all other rows (secondary and sensitivity: the context family)."""
    for family in (
        [c for c in comparisons if c.primary],
        [c for c in comparisons if not c.primary],
    ):
        adjusted = holm([c.p_value for c in family])
        for c, p in zip(family, adjusted, strict=True):
            set_holm(c, p, len(family))


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
