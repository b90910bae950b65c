"""The markdown report of the BN experiments, rendered from the results JSON alone.

:func:`render_report` reads nothing but the dictionary that is also written to
``experiments.json``, so every number in the report can be traced to (and is
tested against) that file. The number formats live here too, for the tests.
"""

from __future__ import annotations

from typing import Any

from training.experiments.stats import classify

CAVEATS = """\
- The datasets are small (digits: 1,167 training images of 8x8 pixels; the harder task: 2,335
  distorted 12x12 digits; breast cancer: 369 training rows), the models are small and
  training is short, on CPU threads. Effects at ImageNet scale can differ in size and sign.
- *Inconclusive* means "these seeds cannot tell" (see each comparison's MDE), not "no effect".
- Holm's correction over every comparison of the report is conservative: a real but small
  effect can come out inconclusive; the uncorrected `p` is given next to it.
- Learning rates were chosen per arm on a half-decade grid (three points for the costlier
  image models) on 2 tuning seeds; a finer grid or longer tuning could move small effects.
"""


def _percent(unit: str) -> bool:
    """``%``: a fraction shown in percent; ``pp``: a difference of fractions, in points."""
    return unit in ("%", "pp")


def format_value(x: float, unit: str) -> str:
    if unit == "%":
        return f"{100 * x:.1f}%"
    if unit == "pp":
        return f"{100 * x:.1f} pp"
    if unit == "lr":
        return f"{x:g}"
    if unit == "g":
        return f"{x:.3g}"
    if unit == "":
        return str(x)
    return f"{x:.2f} {unit}"


def format_mean_std(mean: float, std: float, unit: str) -> str:
    if unit == "%":
        return f"{100 * mean:.1f} ± {100 * std:.1f}%"
    if unit == "pp":
        return f"{100 * mean:+.1f} ± {100 * std:.1f} pp"
    if unit == "g":
        return f"{mean:.3g} ± {std:.2g}"
    return f"{mean:.2f} ± {std:.2f} {unit}".rstrip()


def format_effect(x: float, unit: str) -> str:
    return f"{100 * x:+.1f} pp" if _percent(unit) else f"{x:+.2f} {unit}"


def format_delta(x: float, unit: str) -> str:
    return f"{100 * x:.1f} pp" if _percent(unit) else f"{x:.2f} {unit}"


def format_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def format_mde(mde: float | None, unit: str) -> str:
    return "n/a" if mde is None else format_delta(mde, unit)


def format_ci(low: float, high: float, unit: str) -> str:
    if _percent(unit):
        return f"[{100 * low:+.1f}, {100 * high:+.1f}] pp"
    return f"[{low:+.2f}, {high:+.2f}] {unit}"


def format_cell(cell: Any, unit: str) -> str:
    """A table cell: text as is, a number in its unit, ``[mean, std]`` as mean ± std."""
    if isinstance(cell, list) and len(cell) == 2:
        return format_mean_std(float(cell[0]), float(cell[1]), unit)
    if isinstance(cell, int | float) and not isinstance(cell, bool) and unit:
        return format_value(float(cell), unit)
    return str(cell)


def _row(cells: list[str]) -> str:
    """A markdown table row; a "|" inside a cell is escaped so it stays one cell."""
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _comparison_rows(comparisons: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for c in comparisons:
        u = c["unit"]
        what = f"{c['label']}<br>*effect = {c['effect_definition']}*"
        if c["note"]:
            what += f"<br>{c['note']}"
        rows.append(
            [
                what,
                c["role"],
                f"{c['a_label']}: {format_mean_std(c['mean_a'], c['std_a'], u)}",
                f"{c['b_label']}: {format_mean_std(c['mean_b'], c['std_b'], u)}",
                format_effect(c["effect"], u),
                format_ci(c["ci_low"], c["ci_high"], u),
                f"{format_p(c['p_value'])} ({c['test']})",
                format_p(c["p_holm"]),
                format_mde(c["mde"], u),
                format_delta(c["delta"], u),
                f"**{c['outcome']}**",
            ]
        )
    return rows


def _primary_summary(claim: dict[str, Any]) -> str:
    prim = [c for c in claim["comparisons"] if c["role"] == "primary"]
    return "; ".join(
        f"{c['label']}: {format_effect(c['effect'], c['unit'])} "
        f"{format_ci(c['ci_low'], c['ci_high'], c['unit'])}, p (Holm) {format_p(c['p_holm'])} "
        f"({c['outcome']})"
        for c in prim
    )


def _outcome_counts(claim: dict[str, Any]) -> str:
    """``3 of 5 positive, 2 inconclusive``: the primary outcomes behind a verdict."""
    prim = [c["outcome"] for c in claim["comparisons"] if c["role"] == "primary"]
    kinds = [o for o in ("positive", "negative", "negligible", "inconclusive") if o in prim]
    return f"{prim.count(kinds[0])} of {len(prim)} {kinds[0]}" + "".join(
        f", {prim.count(o)} {o}" for o in kinds[1:]
    )


def sensitivity_pairs(claim: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(primary, sensitivity row) pairs: each sensitivity row re-reads the primary comparison
    listed last before it at another threshold."""
    pairs, primary = [], None
    for c in claim["comparisons"]:
        if c["role"] == "primary":
            primary = c
        elif c["role"] == "sensitivity" and primary is not None:
            pairs.append((primary, c))
    return pairs


def _sensitivity(claim: dict[str, Any]) -> str:
    """Which threshold rows agree with their primary outcome, and what a *negligible*
    primary outcome becomes at half its delta (the threshold that outcome rests on)."""
    pairs = sensitivity_pairs(claim)
    differ = [(p, c) for p, c in pairs if c["outcome"] != p["outcome"]]
    parts = [f"{len(pairs) - len(differ)} of {len(pairs)} rows agree"] if pairs else []
    parts += [f"**{c['label']}: {c['outcome']}** (primary: {p['outcome']})" for p, c in differ]
    for c in claim["comparisons"]:
        if c["role"] == "primary" and c["outcome"] == "negligible":
            half = classify(c["ci_low"], c["ci_high"], c["delta"] / 2, c["effect"], c["p_holm"])
            half_delta = format_delta(c["delta"] / 2, c["unit"])
            parts.append(f"{c['label']}: {half} at half the delta ({half_delta})")
    return "; ".join(parts) or "none"


def _verdict_line(claim: dict[str, Any]) -> str:
    prim = [c["outcome"] for c in claim["comparisons"] if c["role"] == "primary"]
    counts = ", ".join(
        f"{prim.count(o)} {o}"
        for o in ("positive", "negative", "negligible", "inconclusive")
        if o in prim
    )
    return (
        f"**Verdict: {claim['verdict']}.** Primary comparisons ({len(prim)}): {counts}. "
        f"The verdict follows from these outcomes by the rules above. "
        f"Sensitivity rows: {_sensitivity(claim)}."
    )


def _claim_section(claim: dict[str, Any]) -> list[str]:
    out = [
        f"## {claim['number']}. {claim['title']}",
        "",
        f"**Claim.** {claim['claim']}",
        "",
        f"**Setup.** {claim['setup']}",
        "",
    ]
    out += [f"![{claim['title']}]({fig})" for fig in claim["figures"]]
    out += ["", "**Numbers.**", ""]
    out += _table(
        [
            "comparison",
            "role",
            "arm a (mean ± std)",
            "arm b (mean ± std)",
            "effect",
            "95% CI",
            "p",
            "p (Holm)",
            "MDE",
            "delta",
            "outcome",
        ],
        _comparison_rows(claim["comparisons"]),
    )
    for t in claim["tables"]:
        out += ["", f"*{t['title']}*", ""]
        out += _table(
            t["header"],
            [
                [format_cell(cell, u) for cell, u in zip(row, t["units"], strict=True)]
                for row in t["rows"]
            ],
        )
    out += ["", _verdict_line(claim), ""]
    for n in claim["notes"]:
        out += [f"Note: {n}", ""]
    out += [f"({claim['seconds']:.0f} s for this experiment.)", ""]
    return out


def render_report(results: dict[str, Any]) -> str:
    """The whole markdown report from the results dictionary (see ``run_experiments``)."""
    claims = sorted(results["claims"], key=lambda c: c["number"])
    n_comp = sum(len(c["comparisons"]) for c in claims)
    n_primary = sum(c["role"] == "primary" for claim in claims for c in claim["comparisons"])
    out = [
        "# What Batch Normalization does and does not do: FoldServe's own evidence",
        "",
        f"Generated by `python -m training experiment {' '.join(results['names'])}"
        f"{' --quick' if results['mode'] == 'quick' else ''}` ({results['mode']} mode) on "
        f"{results['generated_utc']} UTC with torch {results['torch']} on CPU, "
        f"{results['workers']} worker process(es) of 1 thread each; {results['runs_trained']} "
        f"training runs in {results['total_seconds']:.0f} s of wall time. Every number below is "
        f"read from `{results['json_name']}`, written by the same run; do not edit by hand, "
        f"regenerate.",
        "",
        "Each experiment compares a zoo model with BN and its no-BN twin (`norm=False`, same "
        "architecture otherwise) or another variant, on the same seeds (a seed fixes both the "
        "data split and the initialization). Claims 1-9 are stated as popular BN write-ups "
        "state them; claim 10 is the report's own.",
        "",
        "## Summary",
        "",
    ]
    out += _table(
        ["#", "claim", "verdict", "what was measured", "primary effects", "thresholds", "caveats"],
        [
            [
                str(c["number"]),
                c["title"],
                f"**{c['verdict']}** ({_outcome_counts(c)})",
                c["reading"],
                _primary_summary(c),
                _sensitivity(c),
                "; ".join(c["caveats"]),
            ]
            for c in claims
        ],
    )
    out += [
        "",
        "*negligible*: the 95% CI of the effect lies within ±delta, the smallest effect that "
        "matters (e.g. 1 point of accuracy); *inconclusive*: neither that nor significant after "
        "Holm's correction (each comparison's MDE says how large an effect it could have "
        "found).",
        "",
        "## Statistics and verdict rules",
        "",
        f"The report makes {n_comp} comparisons, {n_primary} of them primary: Holm's correction "
        f"runs over those {n_primary}, and separately over the other {n_comp - n_primary}.",
        "",
        results["rules"],
        "",
    ]
    for claim in claims:
        out += _claim_section(claim)
    out += ["## Caveats", "", CAVEATS]
    return "\n".join(out)
