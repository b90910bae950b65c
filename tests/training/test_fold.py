"""fold_batchnorm: exact outputs, the right BNs folded or kept (with reasons), caller untouched."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from foldserve.model_format import FoldedBatchNorm, KeptBatchNorm
from tests.training.fold_cases import CASES, SITE_CASES, Case
from tests.training.fold_modules import SharedConv
from training.batchnorm import randomize_batchnorm
from training.fold import FoldError, FoldReport, fold_batchnorm
from training.fold.weights import round_to_dtype
from training.zoo import NetworkConfig, build_model, count_batchnorms

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(*inputs)
    return out


RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2}


def check_case(case: Case, dtype: torch.dtype) -> None:
    """Folding ``case`` in ``dtype`` gives its outputs to ``RTOL``, and the expected report."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = case.build().to(dtype).eval()
    randomize_batchnorm(model, gen)
    for name in case.train_bns:
        model.get_submodule(name).train()
    inputs = tuple(torch.randn(4, *s, generator=gen, dtype=dtype) for s in case.inputs)
    expected = _run(copy.deepcopy(model), inputs)  # a copy: a training-mode BN updates its stats

    folded, report = fold_batchnorm(model, inputs if len(inputs) > 1 else inputs[0])
    out = _run(folded, inputs)

    scale = max(1.0, expected.abs().max().item())
    assert (out - expected).abs().max().item() <= RTOL[dtype] * scale
    assert {f.bn: (f.into, f.direction) for f in report.folded} == case.folded
    assert {k.bn for k in report.kept} == set(case.kept)
    for k in report.kept:
        assert case.kept[k.bn] in k.reason, k.reason
    assert count_batchnorms(folded) == len(case.kept)
    assert all(p.dtype == dtype for p in folded.parameters())
    assert not folded.training
    in_training = {n for n, m in folded.named_modules() if isinstance(m, _BatchNorm) and m.training}
    assert in_training == set(case.train_bns)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fold_is_exact_and_reports_each_bn(case: Case, dtype: torch.dtype) -> None:
    check_case(case, dtype)


@pytest.mark.parametrize("case", SITE_CASES.values(), ids=SITE_CASES.keys())
def test_fold_sites_in_float16(case: Case) -> None:
    """Same-padding convs and concats fold (or are kept) alike in float16."""
    check_case(case, torch.float16)


def test_caller_model_is_untouched() -> None:
    model = build_model(NetworkConfig("resnet", (3, 8, 8), 3, width=4))
    randomize_batchnorm(model, torch.Generator().manual_seed(1))
    model.eval()
    model[1][1].train()  # one BN in training mode, the rest eval
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    params = dict(model.named_parameters())

    folded, report = fold_batchnorm(model, torch.randn(4, 3, 8, 8))

    reason = "BN is in training mode (uses batch statistics); call model.eval() first"
    assert (
        report.kept == [KeptBatchNorm(bn="1.1", reason=reason, bn_type="BatchNorm2d", bn_shape=[4])]
        and len(report.folded) == 8
    )
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert params == dict(model.named_parameters())
    assert count_batchnorms(model) == 9
    assert not any(p is q for p in folded.parameters() for q in model.parameters())


def test_fp16_folds_in_float64_and_rounds_once() -> None:
    """Each folded fp16 weight is the nearest to the exact one; on outputs that is a
    statistical gain, so output errors are summed over eight seeded models."""
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    worse = 0
    errors = {v: torch.zeros(2, dtype=torch.float64) for v in ("once", "naive")}
    for seed in range(8):
        torch.manual_seed(seed)
        model = build_model(NetworkConfig("resnet", (3, 8, 8), 3, width=4)).eval()
        randomize_batchnorm(model, torch.Generator().manual_seed(2))

        once, _ = fold_batchnorm(model, x, dtype=torch.float16)
        naive, _ = fold_batchnorm(copy.deepcopy(model).half(), x.half())  # rounds, folds, rounds
        exact, _ = fold_batchnorm(copy.deepcopy(model).double(), x.double())

        assert all(p.dtype == torch.float16 for p in once.parameters())
        assert all(b.dtype == torch.float16 for b in once.buffers() if b.is_floating_point())
        w_exact, w_once, w_naive = (dict(m.named_parameters()) for m in (exact, once, naive))
        for name, w in w_exact.items():
            err_once = (w_once[name].double() - w).abs()
            err_naive = (w_naive[name].double() - w).abs()
            # round-to-nearest of the exact value: never further than any other fp16 value
            assert torch.all(err_once <= err_naive), name
            assert torch.all(err_once <= w.abs() * 2**-11 + 2**-25), name
            worse += int((err_naive > err_once).sum())

        reference = _run(model.double(), (x.double(),))
        scale = reference.abs().max().item()
        for name, folded in (("once", once), ("naive", naive)):
            fp16 = (_run(folded, (x.half(),)).double() - reference).abs()
            weights_only = (_run(folded.double(), (x.double(),)) - reference).abs()  # exact compute
            if name == "once":
                assert fp16.max().item() <= 1e-2 * scale  # within fp16 tolerance end to end
            errors[name] += torch.tensor([fp16.mean(), weights_only.mean()]) / scale
    assert worse > 0  # double rounding really does cost something on these models
    assert torch.all(errors["once"] < errors["naive"]), errors  # fp16 compute, exact compute


def test_float64_to_float16_rounds_once_where_torch_rounds_twice() -> None:
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x = torch.cat([x, torch.tensor([-0.020957945967999176, 7e4, -1e-9], dtype=torch.float64)])
    with np.errstate(over="ignore"):  # 7e4 overflows to inf, as it should
        nearest = torch.from_numpy(x.numpy().astype(np.float16))  # numpy rounds once

    assert torch.equal(round_to_dtype(x, torch.float16), nearest)
    assert not torch.equal(x.to(torch.float16), nearest)  # torch's cast goes through float32
    assert torch.equal(round_to_dtype(x, torch.float32), x.to(torch.float32))


def test_torch_fx_fuser_corrupts_a_shared_conv_but_fold_batchnorm_stays_exact() -> None:
    model = SharedConv().eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(4))
    x = torch.randn(2, 3, 6, 6)
    expected = _run(model, (x,))

    folded, report = fold_batchnorm(model, x)

    assert torch.allclose(_run(folded, (x,)), expected, atol=1e-6)
    assert [k.bn for k in report.kept] == ["bn"] and count_batchnorms(folded) == 1
    fused_error = (_run(fx_fuse(copy.deepcopy(model)), (x,)) - expected).abs().max().item()
    assert fused_error > 1e-2  # torch's fuser folds BN into the conv for both calls


def _torch_util_result(fuse: Callable[[], nn.Module], x: torch.Tensor) -> torch.Tensor | None:
    """torch's fused module's output, or None where torch's util raises on this input."""
    try:
        return _run(fuse(), (x,))
    except (RuntimeError, TypeError):
        return None


def test_grouped_convtranspose_fold_is_exact_where_torch_fusion_fails() -> None:
    conv, bn = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2).eval(), nn.BatchNorm2d(6).eval()
    randomize_batchnorm(bn, torch.Generator().manual_seed(5))
    x = torch.randn(2, 4, 5, 5)
    expected = _run(nn.Sequential(conv, bn), (x,))

    folded, report = fold_batchnorm(nn.Sequential(conv, bn), x)

    assert report.folded == [
        FoldedBatchNorm(
            bn="1",
            into="0",
            direction="backward",
            bn_type="BatchNorm2d",
            bn_shape=[6],
            into_type="ConvTranspose2d",
            into_shape=[4, 3, 3, 3],
        )
    ]
    assert torch.allclose(_run(folded, (x,)), expected, atol=1e-5)
    torch_out = _torch_util_result(lambda: fuse_conv_bn_eval(conv, bn, transpose=True), x)
    assert torch_out is None or not torch.allclose(torch_out, expected, atol=1e-5)


def test_linear_bn_affine_false_fold_is_exact_where_torch_fusion_fails() -> None:
    linear, bn = nn.Linear(5, 7).eval(), nn.BatchNorm1d(7, affine=False).eval()
    randomize_batchnorm(bn, torch.Generator().manual_seed(6))
    x = torch.randn(3, 5)
    expected = _run(nn.Sequential(linear, bn), (x,))

    folded, _ = fold_batchnorm(nn.Sequential(linear, bn), x)

    assert torch.allclose(_run(folded, (x,)), expected, atol=1e-5)
    torch_out = _torch_util_result(lambda: fuse_linear_bn_eval(linear, bn), x)
    assert torch_out is None or not torch.allclose(torch_out, expected, atol=1e-5)


def test_failing_example_inputs_raise_fold_error_naming_the_module() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(5, 2))
    with pytest.raises(FoldError, match="in module '2'"):
        fold_batchnorm(model, torch.randn(2, 4))


def test_report_renders_as_dict_text_and_rich_table() -> None:
    report = FoldReport(
        folded=[FoldedBatchNorm(bn="1.1", into="1.0", direction="backward")],
        kept=[KeptBatchNorm(bn="3", reason="preceding conv '2' output has other consumers (add)")],
    )
    assert report.to_dict() == {
        "folded": [
            {
                "bn": "1.1",
                "into": "1.0",
                "direction": "backward",
                "bn_type": "",
                "bn_shape": [],
                "into_type": "",
                "into_shape": [],
            }
        ],
        "kept": [
            {
                "bn": "3",
                "reason": "preceding conv '2' output has other consumers (add)",
                "bn_type": "",
                "bn_shape": [],
            }
        ],
    }
    lines = str(report).splitlines()
    assert lines[1].split() == ["1.1", "folded", "backward", "into", "1.0"]
    assert lines[2].startswith("3    kept    preceding conv '2'")
    console = Console(file=io.StringIO(), record=True, width=200)
    console.print(report.table())
    rendered = console.export_text()
    assert "1 folded, 1 kept" in rendered and "other consumers (add)" in rendered


@pytest.mark.parametrize(
    ("model", "folded", "kept"),
    [
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
            [("1", "BatchNorm2d", [4], "backward", "0", "Conv2d", [4, 3, 3, 3])],
            [],
        ),
        (
            nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 2)),
            [("0", "BatchNorm1d", [5], "forward", "1", "Linear", [2, 5])],
            [],
        ),
        (
            nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.BatchNorm1d(3), nn.ReLU()),
            [],
            [("2", "BatchNorm1d", [3])],
        ),
    ],
)
def test_report_names_layer_types_and_shapes(model: nn.Module, folded, kept) -> None:
    example = torch.randn(2, 3, 6, 6) if isinstance(model[0], nn.Conv2d) else torch.randn(2, 5)
    _, report = fold_batchnorm(model.eval(), example)
    assert [
        (f.bn, f.bn_type, f.bn_shape, f.direction, f.into, f.into_type, f.into_shape)
        for f in report.folded
    ] == folded
    assert [(k.bn, k.bn_type, k.bn_shape) for k in report.kept] == kept
    console = Console(file=io.StringIO(), record=True, width=200)
    console.print(report.table())
    rendered = console.export_text()
    for f in report.folded:
        assert f"{f.direction} into {f.into} ({f.into_type} {f.into_shape})" in rendered
