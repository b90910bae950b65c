"""The markdown report of the BN experiments, rendered from the results JSON alone.

:func:`render_report` reads nothing but the dictionary that is also written to
``experiments.json``, so every number in the report can be traced to (and is
tested against) that file. The number formats live here too, for the tests.
"""

from __future__ import annotations

from typing import Any

CAVEATS = """\
- The datasets are small (digits: 1,167 training images of 8x8 pixels; breast cancer:
  369 training rows), the models are small and training is short, all on one CPU thread.
  Effects at ImageNet scale can differ in size and even in sign.
- Few seeds per arm: the Welch intervals are wide by design, and *inconclusive* means
  "this many seeds cannot tell", not "no effect".
- Each claim makes several comparisons at 95% each, without a multiple-comparison
  correction: across the whole report about one in twenty comparisons of a true
  null effect can come out positive or negative by chance.
- Hyperparameters (learning rates, budgets, targets) were fixed once for both arms, not
  tuned per arm; the learning-rate sweep shows how much that choice matters.
- Test accuracies are those of the checkpoint `train()` keeps (best validation accuracy).
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
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _comparison_rows(comparisons: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for c in comparisons:
        u = c["unit"]
        what = f"{c['label']}<br>*effect = {c['effect_definition']}*"
        if c["note"]:
            what += f"<br>{c['note']}"
        d = "n/a" if c["cohens_d"] is None else f"{c['cohens_d']:+.2f}"
        rows.append(
            [
                what,
                "primary" if c["primary"] else "secondary",
                f"{c['a_label']}: {format_mean_std(c['mean_a'], c['std_a'], u)}",
                f"{c['b_label']}: {format_mean_std(c['mean_b'], c['std_b'], u)}",
                format_effect(c["effect"], u),
                format_ci(c["ci_low"], c["ci_high"], u),
                d,
                format_delta(c["delta"], u),
                f"**{c['outcome']}**",
            ]
        )
    return rows


def _primary_summary(claim: dict[str, Any]) -> str:
    prim = [c for c in claim["comparisons"] if c["primary"]]
    return "; ".join(
        f"{c['label']}: {format_effect(c['effect'], c['unit'])} "
        f"{format_ci(c['ci_low'], c['ci_high'], c['unit'])} ({c['outcome']})"
        for c in prim
    )


def _verdict_line(claim: dict[str, Any]) -> str:
    prim = [c["outcome"] for c in claim["comparisons"] if c["primary"]]
    counts = ", ".join(
        f"{prim.count(o)} {o}"
        for o in ("positive", "negative", "negligible", "inconclusive")
        if o in prim
    )
    return (
        f"**Verdict: {claim['verdict']}.** Primary comparisons ({len(prim)}): {counts}. "
        f"The verdict follows from these outcomes by the rules above."
    )


def _claim_section(i: int, claim: dict[str, Any]) -> list[str]:
    out = [
        f"## {i}. {claim['title']}",
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
            "d",
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
    claims = results["claims"]
    out = [
        "# What Batch Normalization does and does not do: FoldServe's own evidence",
        "",
        f"Generated by `python -m training experiment {' '.join(results['names'])}"
        f"{' --quick' if results['mode'] == 'quick' else ''}` ({results['mode']} mode) on "
        f"{results['generated_utc']} UTC with torch {results['torch']} on CPU, "
        f"{results['threads']} thread; {results['runs_trained']} training runs in "
        f"{results['total_seconds']:.0f} s. Every number below is read from "
        f"`{results['json_name']}`, written by the same run; do not edit by hand, regenerate.",
        "",
        "Each experiment trains a zoo model with BN and its no-BN twin (`norm=False`, same "
        "architecture otherwise) on the bundled datasets, over several seeds (a seed fixes "
        "both the data split and the initialization).",
        "",
        "## Summary",
        "",
    ]
    out += _table(
        ["#", "claim", "verdict", "primary effects (effect [95% CI], outcome)"],
        [
            [str(i), c["title"], f"**{c['verdict']}**", _primary_summary(c)]
            for i, c in enumerate(claims, 1)
        ],
    )
    out += ["", "## How verdicts are computed", "", results["rules"], ""]
    for i, claim in enumerate(claims, 1):
        out += _claim_section(i, claim)
    out += ["## Caveats", "", CAVEATS]
    return "\n".join(out)
