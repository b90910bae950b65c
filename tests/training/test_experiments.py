"""The BN experiments: statistics, measurements with known answers, and a quick suite run
(report, JSON and figures written; every number in the markdown is the JSON's; the JSON's
paired tests and Holm correction follow from its own per-seed numbers)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torch import nn

from tests import ROOT
from training.experiments import EXPERIMENTS, ExperimentError, resolve_names, run_experiments
from training.experiments import report as rep
from training.experiments import stats as st
from training.experiments.affine import identity_distances
from training.experiments.gradients import saturated_share
from training.experiments.hyperparams import blew_up, final_accuracy, largest_usable
from training.experiments.landscape import NoisyShift, add_noise, gradient_shift, input_drift
from training.experiments.runs import RunRecord
from training.experiments.speed import epochs_to_target, late_gain
from training.experiments.stats import ALPHA, POWER, Comparison, apply_holm, claim_verdict, holm
from training.experiments.tasks import hard_digits, small_training_split
from training.zoo import NetworkConfig, build_model

# --- statistics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([0.91, 0.93, 0.95], [0.88, 0.90, 0.86]),
        ([1.0, 2.0, 4.0, 8.0, 3.0], [2.0, 2.5, 2.2, 1.0, 0.0]),
        ([0.5, 0.7, 0.6, 0.65], [1.0, 2.0, 0.4, 0.3]),
    ],
)
def test_paired_test_matches_scipy_ttest_rel(a: list[float], b: list[float]) -> None:
    d = [x - y for x, y in zip(a, b, strict=True)]
    t = st.paired_test(d)
    ref = stats.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert t.test == "paired t"
    assert t.effect == pytest.approx(np.mean(d))
    assert (t.ci_low, t.ci_high) == pytest.approx((ci.low, ci.high))
    assert t.p_value == pytest.approx(ref.pvalue)


@pytest.mark.parametrize(
    ("d", "p"),
    [([1.0] * 10, 2 * 0.5**10), ([-0.5] * 4, 2 * 0.5**4), ([0.0, 0.0, 0.0], 1.0)],
)
def test_zero_spread_uses_the_exact_sign_test(d: list[float], p: float) -> None:
    t = st.paired_test(d)
    assert t.test == "sign test"
    assert (t.ci_low, t.ci_high) == (d[0], d[0])
    assert t.p_value == pytest.approx(p)
    assert t.p_value == pytest.approx(stats.binomtest(len(d), len(d)).pvalue if d[0] else 1.0)


def test_holm_against_hand_computed_values() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(0.06, 1*0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == [0.02]


def test_apply_holm_corrects_primary_and_context_rows_as_separate_families() -> None:
    def comp(shift: float, role: Any) -> Comparison:
        a = [1.0 + shift * i for i in range(5)]
        return Comparison("x", "m", "u", "a - b", "a", "b", a, [0.0, 0.1, 0.0, 0.2, 0.1],
                          direction=1, delta=0.01, role=role)  # fmt: skip

    comps = [comp(0.1, "primary"), comp(0.5, "primary"), comp(0.2, "secondary")]
    apply_holm(comps)
    expected = holm([comps[0].p_value, comps[1].p_value])
    assert [comps[0].p_holm, comps[1].p_holm] == pytest.approx(expected)
    assert comps[2].p_holm == pytest.approx(comps[2].p_value)  # a family of one


def test_detectable_effect_formula_and_power() -> None:
    sd, n, m = 2.0, 10, 5
    alpha = ALPHA / m
    expected = (stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(POWER, n - 1)) * sd / math.sqrt(n)
    mde = st.detectable_effect(sd, n, m)
    assert mde == pytest.approx(expected)
    # the noncentral t confirms roughly 80% power at that effect
    nc = mde / (sd / math.sqrt(n))  # type: ignore[operator]
    power = stats.nct.sf(stats.t.ppf(1 - alpha / 2, n - 1), n - 1, nc)
    assert power == pytest.approx(POWER, abs=0.03)
    assert st.detectable_effect(0.0, n, m) is None


@pytest.mark.parametrize(
    ("low", "high", "effect", "p", "outcome"),
    [
        (-0.5, 0.5, 0.0, 0.9, "negligible"),
        (0.2, 0.5, 0.35, 1e-6, "negligible"),  # beyond noise but smaller than what matters
        (0.2, 3.0, 1.6, 0.01, "positive"),
        (0.2, 3.0, 1.6, 0.2, "inconclusive"),  # CI excludes 0, but not after Holm
        (-3.0, -0.2, -1.6, 0.001, "negative"),
        (-0.5, 3.0, 1.2, 0.3, "inconclusive"),
    ],
)
def test_classify(low: float, high: float, effect: float, p: float, outcome: str) -> None:
    assert st.classify(low, high, 1.0, effect, p) == outcome


@pytest.mark.parametrize(
    ("outcomes", "verdict"),
    [
        (["positive", "positive"], "holds"),
        (["positive", "inconclusive"], "holds partly"),
        (["negative", "inconclusive"], "does not hold"),
        (["negligible", "negligible"], "does not hold"),
        (["inconclusive", "inconclusive"], "not distinguishable from noise"),
    ],
)
def test_claim_verdict(outcomes: list[Any], verdict: str) -> None:
    assert claim_verdict(outcomes) == verdict


def test_comparison_is_paired_and_oriented_by_direction() -> None:
    a, b = [3.0, 4.0, 5.0, 9.0], [6.0, 7.0, 9.0, 10.0]  # e.g. epochs: BN needs fewer
    c = Comparison("x", "epochs", "epochs", "b - a", "BN", "no BN", a, b, direction=-1, delta=1)
    ref = stats.ttest_rel(b, a)
    assert c.effect == pytest.approx(np.mean(b) - np.mean(a))
    assert c.p_value == pytest.approx(ref.pvalue)
    assert (c.ci_low, c.ci_high) == pytest.approx(tuple(ref.confidence_interval(0.95)))


def test_comparison_needs_the_same_seeds_in_both_arms() -> None:
    with pytest.raises(ValueError, match="same seeds"):
        Comparison("x", "m", "%", "a - b", "a", "b", [1.0, 2.0], [1.0, 2.0, 3.0], 1, 0.1)


# --- metrics with known answers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("curve", "target", "expected"),
    [([0.5, 0.8, 0.96, 0.97], 0.95, 3), ([0.96], 0.95, 1), ([0.5, 0.6], 0.95, 11)],
)
def test_epochs_to_target(curve: list[float], target: float, expected: int) -> None:
    assert epochs_to_target(curve, target, budget=10) == expected
    assert late_gain([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9]) == pytest.approx(0.9 - 0.6)


def _record(loss_curve: list[float], test_curve: list[float], diverged: bool = False) -> RunRecord:
    return RunRecord("d", 0, {"num_classes": 10}, {}, 0.9, 0.9, 0.9, 0.1, 0.1, diverged, 1.0,
                     test_curve, test_curve, loss_curve)  # fmt: skip


def test_a_blown_up_run_counts_as_a_uniform_guess_not_its_best_checkpoint() -> None:
    blown = _record([2.0, 1e6, 2.0], [0.8, 0.1, 0.85])  # loss above 2 ln 10 in epoch 2
    assert blew_up(blown) and final_accuracy(blown) == pytest.approx(0.1)
    fine = _record([2.0, 1.0], [0.8, 0.85])
    assert not blew_up(fine) and final_accuracy(fine) == 0.85


def test_largest_usable_rate_on_a_half_decade_grid() -> None:
    logs = [-3.0, -2.5, -2.0, -1.5]
    assert largest_usable([True, True, False, True], logs) == -1.5
    assert largest_usable([False] * 4, logs) == -3.5  # half a decade below the grid


def test_gradient_shift_of_a_linear_net_matches_the_hand_computed_gradients() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    x, y, lr = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]), 0.7
    W1, W2 = net[0].weight.detach().numpy(), net[1].weight.detach().numpy()
    X, Y = x.numpy().astype(np.float64), np.eye(2)[y.numpy()]

    def grads(w1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = X @ w1.T  # (5, 4)
        z = h @ W2.T
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dz = (p - Y) / len(X)  # d mean-CE / d logits
        return dz.T @ h, (dz @ W2).T @ X  # dL/dW2, dL/dW1

    g, g1 = grads(W1)
    g_after, _ = grads(W1 - lr * g1)
    rel, cos = gradient_shift(net, x, y, lr, k=1)
    assert rel == pytest.approx(np.linalg.norm(g - g_after) / np.linalg.norm(g), rel=1e-4)
    expected_cos = (g * g_after).sum() / np.linalg.norm(g) / np.linalg.norm(g_after)
    assert cos == pytest.approx(expected_cos, rel=1e-5)
    assert gradient_shift(net, x, y, 0.0, k=1) == pytest.approx((0.0, 1.0), abs=1e-6)
    assert torch.equal(net[0].weight, torch.from_numpy(W1))  # measured on a copy


def test_input_drift_in_units_of_the_earlier_std() -> None:
    before = [(np.array([0.0, 1.0]), np.array([1.0, 2.0]))]
    after = [(np.array([0.5, 0.0]), np.array([1.0, 2.0]))]
    assert input_drift(before, after) == pytest.approx(np.mean([0.5 / 1.001, 1.0 / 2.001]))


def test_noisy_shift_resamples_in_training_and_is_identity_in_eval() -> None:
    data = hard_digits(0, size=8, copies=1)
    model = build_model(NetworkConfig("mlp", data.input_shape, 10, depth=2, width=8))
    add_noise(model, seed=0)
    assert sum(isinstance(m, NoisyShift) for m in model.modules()) == 2
    x = torch.from_numpy(data.X_train[:16])
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_saturated_share_of_a_known_sigmoid_layer() -> None:
    lin = nn.Linear(1, 1)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.zero_()
    model = nn.Sequential(lin, nn.Sigmoid())
    X = np.array([[-10.0], [-1.0], [0.0], [1.0], [10.0]], dtype=np.float32)
    # sigmoid: ~0, 0.27, 0.5, 0.73, ~1 -> 2 of 5 outside [0.05, 0.95], 4 of 5 outside [0.3, 0.7]
    assert saturated_share(model, X, (0.05, 0.3)) == pytest.approx([0.4, 0.8])


def test_identity_distances_are_zero_when_bn_undoes_its_normalization() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, eps=0.0)
    model = nn.Sequential(nn.Linear(2, 3), bn)
    X = np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32)
    with torch.no_grad():
        h = model[0](torch.from_numpy(X))
        bn.weight.copy_(h.std(0, unbiased=False))
        bn.bias.copy_(h.mean(0))
        bn.running_mean.copy_(h.mean(0))
        bn.running_var.copy_(h.var(0, unbiased=False))
    d = identity_distances(model, X)
    assert (d.gamma, d.beta) == pytest.approx((0.0, 0.0), abs=1e-4)
    h64 = h.double()
    assert d.beta_untrained == pytest.approx(
        float((h64.mean(0).abs() / h64.std(0, False)).median())
    )


def test_hard_task_and_small_subset_shapes() -> None:
    data = hard_digits(1)
    assert data.input_shape == (1, 12, 12) and data.num_classes == 10
    assert len(data.X_train) + len(data.X_val) + len(data.X_test) == 2 * 1797
    small = small_training_split(data, 100, seed=1)
    assert len(small.X_train) == 100 and np.array_equal(small.X_test, data.X_test)
    assert set(np.unique(small.y_train)) == set(range(10))


def test_glorot_init_and_conv_bias_in_after_mode() -> None:
    cfg = NetworkConfig("mlp", (64,), 10, width=50, activation="sigmoid", init="glorot")
    lin = next(m for m in build_model(cfg).modules() if isinstance(m, nn.Linear))
    assert float(lin.weight.detach().abs().max()) <= math.sqrt(6 / (64 + 50)) + 1e-6
    assert float(lin.bias.detach().abs().max()) == 0.0
    after = build_model(NetworkConfig("cnn", (1, 8, 8), 10, bn_position="after"))
    convs = [m for m in after.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)


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
    assert sorted(c["key"] for c in results["claims"]) == sorted(EXPERIMENTS)
    assert [c["number"] for c in results["claims"]] == list(range(1, 11))
    assert results["mode"] == "quick"
    for claim in results["claims"]:
        assert claim["figures"], claim["key"]
        for fig in claim["figures"]:
            path = out / fig
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
        assert f"| {claim['title']} | **{claim['verdict']}** (" in md  # summary row
        for c in claim["comparisons"]:
            u = c["unit"]
            assert f"{c['a_label']}: {rep.format_mean_std(c['mean_a'], c['std_a'], u)}" in section
            ci = rep.format_ci(c["ci_low"], c["ci_high"], u)
            row = (
                f"| {rep.format_effect(c['effect'], u)} | {ci} | "
                f"{rep.format_p(c['p_value'])} ({c['test']}) | {rep.format_p(c['p_holm'])} |"
            )
            assert row in section, (claim["key"], c["label"])
        for t in claim["tables"]:
            for cells in t["rows"]:
                units = t["units"]
                cells_md = [rep.format_cell(v, u).replace("|", "\\|") for v, u in zip(cells, units)]  # noqa: B905
                assert f"| {' | '.join(cells_md)} |" in section, (claim["key"], t["title"])


def test_json_statistics_follow_from_the_per_seed_numbers(quick_run: Any) -> None:
    _, _, results = quick_run
    again: list[Comparison] = []
    for claim in results["claims"]:
        for c in claim["comparisons"]:
            again.append(
                Comparison(
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
                    c["role"],
                )  # fmt: skip
            )
    apply_holm(again)
    stored = [c for claim in results["claims"] for c in claim["comparisons"]]
    for new, old in zip(again, stored, strict=True):
        for key in ("effect", "ci_low", "ci_high", "p_value", "p_holm"):
            assert math.isclose(getattr(new, key), old[key], rel_tol=1e-9, abs_tol=1e-12), key
        assert new.outcome == old["outcome"]
    for claim in results["claims"]:
        prim = [c["outcome"] for c in claim["comparisons"] if c["role"] == "primary"]
        assert claim_verdict(prim) == claim["verdict"]


def test_per_seed_numbers_come_from_the_recorded_runs(quick_run: Any) -> None:
    _, _, results = quick_run
    claims = {c["key"]: c for c in results["claims"]}
    seeds = results["settings"]["seeds"]
    # claim 3: the gap is train accuracy - test accuracy of the same (last-epoch) runs
    reg = claims["regularization"]
    gap = next(c for c in reg["comparisons"] if "gap" in c["label"] and c["role"] == "primary")
    runs = [r for r in reg["runs"] if r["arm"] == "BN"]
    assert sorted(r["seed"] for r in runs) == list(range(seeds))
    assert all(r["train"]["keep"] == "last" for r in runs)
    assert gap["a"] == [r["train_accuracy"] - r["test_accuracy"] for r in runs]
    # claim 2: a run's accuracy is its last epoch's, or 1/K when it blew up
    sweep = claims["lr-sweep"]
    for r in sweep["runs"]:
        assert r["train"]["lr"] in results["settings"]["lr_grid"]
    # claim 4: one gradient norm per Linear layer (hidden + output)
    for r in claims["deep-sigmoid"]["runs"]:
        assert len(r["init_norms"]) == r["depth"] + 1


def test_committed_report_is_rendered_from_the_committed_json() -> None:
    docs = ROOT / "docs"
    results = json.loads((docs / "experiments.json").read_text())
    assert (docs / "experiments.md").read_text() == rep.render_report(results)
    for claim in results["claims"]:
        assert all((docs / fig).is_file() for fig in claim["figures"])
