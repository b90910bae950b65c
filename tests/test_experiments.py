"""The BN experiments: statistics and verdict rules, and a quick-mode run of the whole suite.

The quick run checks that the report, the results JSON and the figures are
written, that every number and verdict in the markdown is the one in the JSON,
and that the JSON's statistics follow from its own per-seed numbers and runs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from training.experiments import EXPERIMENTS, ExperimentError, resolve_names, run_experiments
from training.experiments.claims import epochs_to_target
from training.experiments.report import format_cell, format_ci, format_effect, format_mean_std
from training.experiments.stats import Comparison, claim_verdict, classify, welch_ci

# --- statistics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([0.91, 0.93, 0.95], [0.88, 0.90, 0.86]),
        ([1.0, 2.0, 4.0, 8.0, 3.0], [2.0, 2.5, 2.2]),
        ([0.5, 0.7, 0.6, 0.65], [1.0, 2.0]),
    ],
)
def test_welch_ci_matches_scipy(a: list[float], b: list[float]) -> None:
    diff, low, high = welch_ci(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert diff == pytest.approx(np.mean(a) - np.mean(b))
    assert (low, high) == pytest.approx((ci.low, ci.high))


def test_welch_ci_without_any_spread_is_the_point() -> None:
    assert welch_ci([3.0, 3.0, 3.0], [1.0, 1.0]) == (2.0, 2.0, 2.0)


@pytest.mark.parametrize(
    ("low", "high", "delta", "outcome"),
    [
        (-0.5, 0.5, 1.0, "negligible"),
        (0.2, 0.5, 1.0, "negligible"),  # beyond noise but smaller than what matters
        (0.2, 3.0, 1.0, "positive"),
        (-3.0, -0.2, 1.0, "negative"),
        (-0.5, 3.0, 1.0, "inconclusive"),
        (1.0, 1.0, 1.0, "positive"),  # a point at +delta is not inside (-delta, +delta)
    ],
)
def test_classify(low: float, high: float, delta: float, outcome: str) -> None:
    assert classify(low, high, delta) == outcome


@pytest.mark.parametrize(
    ("outcomes", "verdict"),
    [
        (["positive", "positive"], "holds"),
        (["positive", "inconclusive"], "holds partly"),
        (["positive", "negative"], "holds partly"),
        (["negative", "inconclusive"], "does not hold"),
        (["negligible", "negligible"], "does not hold"),
        (["negligible", "inconclusive"], "does not hold"),
        (["inconclusive"], "not distinguishable from noise"),
        (["inconclusive", "inconclusive"], "not distinguishable from noise"),
    ],
)
def test_claim_verdict(outcomes: list[Any], verdict: str) -> None:
    assert claim_verdict(outcomes) == verdict


def test_comparison_orients_effect_and_ci_by_direction() -> None:
    a, b = [3.0, 4.0, 5.0], [6.0, 7.0, 9.0]  # e.g. epochs: BN needs fewer
    diff, low, high = welch_ci(a, b)
    c = Comparison("x", "epochs", "epochs", "b - a", "BN", "no BN", a, b, direction=-1, delta=1)
    assert (c.effect, c.ci_low, c.ci_high) == pytest.approx((-diff, -high, -low))
    assert c.effect > 0 and c.cohens_d is not None and c.cohens_d > 0
    assert c.outcome == classify(c.ci_low, c.ci_high, 1.0)


def test_comparison_needs_two_seeds() -> None:
    with pytest.raises(ValueError, match="at least 2 seeds"):
        Comparison("x", "m", "%", "a - b", "a", "b", [1.0], [1.0, 2.0], direction=1, delta=0.1)


@pytest.mark.parametrize(
    ("curve", "target", "expected"),
    [([0.5, 0.8, 0.96, 0.97], 0.95, 3), ([0.96], 0.95, 1), ([0.5, 0.6], 0.95, 11)],
)
def test_epochs_to_target(curve: list[float], target: float, expected: int) -> None:
    assert epochs_to_target(curve, target, budget=10) == expected


# --- names ----------------------------------------------------------------------------------


def test_all_expands_to_every_experiment_in_suite_order() -> None:
    assert resolve_names(["all"]) == list(EXPERIMENTS)
    assert resolve_names(["placement", "epochs", "epochs"]) == ["epochs", "placement"]


@pytest.mark.parametrize("names", [["nope"], []])
def test_unknown_experiment_names_the_choices(names: list[str]) -> None:
    with pytest.raises(ExperimentError, match="choose from all, epochs"):
        resolve_names(names)


def test_seeds_below_two_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match="at least 2"):
        run_experiments(["epochs"], quick=True, out_dir=tmp_path, seeds=1)


# --- a quick run of the whole suite -----------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("docs")
    report = run_experiments(["all"], quick=True, out_dir=out)
    return out, report.read_text(), json.loads((out / "experiments.json").read_text())


def _sections(md: str) -> dict[str, str]:
    """Claim title -> its section of the report."""
    parts = re.split(r"^## \d+\. ", md, flags=re.MULTILINE)[1:]
    return {p.splitlines()[0]: p for p in parts}


def test_quick_run_writes_report_json_and_figures(quick_run: Any) -> None:
    out, md, results = quick_run
    assert (out / "experiments.md").is_file()
    assert [c["key"] for c in results["claims"]] == list(EXPERIMENTS)
    assert results["mode"] == "quick"
    for claim in results["claims"]:
        assert claim["figures"], claim["key"]
        for fig in claim["figures"]:
            path = out / fig
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(path) as img:
                img.verify()
            with Image.open(path) as img:
                assert img.format == "PNG" and min(img.size) >= 200
            assert f"]({fig})" in md


def test_report_numbers_and_verdicts_are_the_json_ones(quick_run: Any) -> None:
    _, md, results = quick_run
    sections = _sections(md)
    assert len(sections) == len(results["claims"])
    for claim in results["claims"]:
        section = sections[claim["title"]]
        assert f"**Verdict: {claim['verdict']}.**" in section
        assert f"| {claim['title']} | **{claim['verdict']}** |" in md  # summary row
        for c in claim["comparisons"]:
            u = c["unit"]
            assert f"{c['a_label']}: {format_mean_std(c['mean_a'], c['std_a'], u)}" in section
            assert f"{c['b_label']}: {format_mean_std(c['mean_b'], c['std_b'], u)}" in section
            row = f"| {format_effect(c['effect'], u)} | {format_ci(c['ci_low'], c['ci_high'], u)} |"
            assert row in section, (claim["key"], c["label"])
        for t in claim["tables"]:
            for cells in t["rows"]:
                text = " | ".join(format_cell(v, u) for v, u in zip(cells, t["units"], strict=True))
                assert f"| {text} |" in section, (claim["key"], t["title"])


def test_json_statistics_follow_from_the_per_seed_numbers(quick_run: Any) -> None:
    _, _, results = quick_run
    for claim in results["claims"]:
        outcomes = []
        for c in claim["comparisons"]:
            again = Comparison(
                c["label"],
                c["metric"],
                c["unit"],
                c["effect_definition"],
                c["a_label"],
                c["b_label"],
                c["a"],
                c["b"],
                c["direction"],
                c["delta"],
                c["primary"],
            )
            for key in ("mean_a", "std_a", "mean_b", "std_b", "effect", "ci_low", "ci_high"):
                assert math.isclose(getattr(again, key), c[key], abs_tol=1e-12), key
            assert again.outcome == c["outcome"]
            if c["primary"]:
                outcomes.append(again.outcome)
        assert claim_verdict(outcomes) == claim["verdict"]


def test_per_seed_numbers_come_from_the_recorded_runs(quick_run: Any) -> None:
    _, _, results = quick_run
    claims = {c["key"]: c for c in results["claims"]}
    # claim 1: epochs to target recomputed from each run's validation curve
    speed = claims["epochs"]
    target, budget = 0.9, 3  # SuiteSettings.quick(): digits mlp
    first = speed["comparisons"][0]
    for arm, values in (("BN", first["a"]), ("no BN", first["b"])):
        runs = [
            r for r in speed["runs"] if r["variant"] == "digits mlp (adamw)" and r["arm"] == arm
        ]
        assert sorted(r["seed"] for r in runs) == list(range(results["settings"]["seeds"]))
        assert values == [epochs_to_target(r["val_curve"], target, budget) for r in runs]
    # claim 3: the gap is train accuracy - test accuracy of the same runs
    reg = claims["regularization"]
    gap = next(c for c in reg["comparisons"] if c["primary"])
    runs = [r for r in reg["runs"] if r["setting"] == "digits mlp" and r["arm"] == "BN"]
    assert gap["a"] == [r["train_accuracy"] - r["test_accuracy"] for r in runs]
    # claim 4: the gradient runs recorded one norm per Linear layer (hidden + output)
    sig = claims["deep-sigmoid"]
    for r in sig["runs"]:
        assert len(r["init_norms"]) == r["depth"] + 1
        assert all(len(e) == r["depth"] + 1 for e in r["epoch_norms"])
