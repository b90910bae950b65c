"""The torch-free ONNX folder: every pattern folds (fp32, fp16, bf16), every refusal keeps
the graph and says why, the outputs match the original in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from foldserve.onnx_fold import FoldCheckFailed, OnnxFoldReport, fold_model
from foldserve.onnx_fold.check import widened
from tests.foldserve.onnx_graphs import (
    PATTERNS,
    REFUSALS,
    SHARED_WEIGHT,
    Builder,
    build,
    build_refusal,
    op_count,
)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return [np.asarray(o, np.float64) for o in session.run(None, feeds)]


def feeds_for(model: onnx.ModelProto, np_type: type, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    inits = {t.name for t in model.graph.initializer}
    for info in model.graph.input:
        if info.name in inits:
            continue
        if info.type.tensor_type.elem_type == TensorProto.BOOL:
            feeds[info.name] = np.array(True)
            continue
        dims = [d.dim_value or 3 for d in info.type.tensor_type.shape.dim]
        feeds[info.name] = rng.standard_normal(dims).astype(np_type)
    return feeds


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_pattern_folds_exactly(pattern: str, dtype: str) -> None:
    model = build(pattern, dtype)
    before = model.SerializeToString()
    outcome = fold_model(model)
    report, folded = outcome.report, outcome.model
    assert model.SerializeToString() == before  # the input is never mutated
    assert report.batchnorm_before == op_count(model, "BatchNormalization")
    assert report.batchnorm_after == op_count(folded, "BatchNormalization") == 0
    assert op_count(folded, "Mul") == 0
    # what is left of Add is a MatMul's bias, one per MatMul at most
    assert op_count(folded, "Add") <= op_count(folded, "MatMul")
    assert report.kept == [] and len(report.folded) >= 1 and report.passed
    onnx.checker.check_model(folded, full_check=True)
    feeds = feeds_for(model, np.float32 if dtype == "float32" else np.float16)
    expected, got = run(model, feeds), run(folded, feeds)
    assert max_diff(expected, got) <= report.tolerance
    if dtype == "float32":
        assert report.max_abs_diff < 1e-4 * max(1.0, float(np.max(np.abs(expected[0]))))


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_float16_fold_costs_at_most_one_rounding(pattern: str) -> None:
    """Against the float32 run of the same fp16 weights (exact widening), the folded fp16
    graph is off by no more than the original fp16 graph plus one fp16 rounding of the
    output's magnitude."""
    model = build(pattern, "float16")
    folded = fold_model(model).model
    feeds = feeds_for(model, np.float16)
    wide = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feeds.items()}
    reference = run(widened(model), wide)
    err_original = max_diff(run(model, feeds), reference)
    err_folded = max_diff(run(folded, feeds), reference)
    scale = max(float(np.max(np.abs(r))) for r in reference)
    one_rounding = float(np.finfo(np.float16).eps) * scale
    assert err_folded <= err_original + one_rounding


@pytest.mark.parametrize("pattern", ["conv_bn", "gemm_transb_c_bn", "bn_matmul", "concat_bn"])
def test_bfloat16_folds(pattern: str) -> None:
    model = build(pattern, "bfloat16")
    outcome = fold_model(model)
    assert outcome.report.batchnorm_after == 0 and outcome.report.passed
    assert "float32 copies" in outcome.report.check_inputs
    weights = [t for t in outcome.model.graph.initializer if t.data_type != TensorProto.BFLOAT16]
    assert weights == []  # still bfloat16: rounded once, not widened


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusal_keeps_the_graph_and_says_why(name: str, dtype: str) -> None:
    model = build_refusal(name, dtype)
    outcome = fold_model(model)
    report = outcome.report
    assert report.folded == []
    assert report.batchnorm_after == report.batchnorm_before == 1
    assert [k.bn_type for k in report.kept] == ["BatchNormalization"]
    assert REFUSALS[name][1] in report.kept[0].reason
    assert report.max_abs_diff == 0.0  # nothing changed, so exactly the same outputs


def test_shared_weight_is_copied_never_changed() -> None:
    """The BN folds into a private copy of the weight; the other Conv still reads the
    original, unchanged."""
    model = SHARED_WEIGHT(Builder())
    original = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
    outcome = fold_model(model)
    folded = outcome.model
    assert outcome.report.batchnorm_after == 0
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != "w" and convs[1].input[1] == "w"
    kept_w = next(t for t in folded.graph.initializer if t.name == "w")
    assert np.array_equal(numpy_helper.to_array(kept_w), original)
    feeds = feeds_for(model, np.float32)
    assert max_diff(run(model, feeds), run(folded, feeds)) < 1e-4


def test_folded_initializers_leave_the_graph_inputs() -> None:
    """With keep_initializers_as_inputs, folded weights stop being (optional) inputs."""
    model = build("initializers_as_inputs")
    assert len(model.graph.input) == 7  # x, w, b, and the 4 BN parameters
    folded = fold_model(model).model
    assert [i.name for i in folded.graph.input] == ["x"]
    assert {t.name for t in folded.graph.initializer} == set(folded.graph.node[0].input[1:])


def test_dynamic_height_and_width_are_sized_so_the_graph_runs() -> None:
    """A 3x3 unpadded Conv cannot run on 2x2: the check sizes H and W up until it does."""
    b = Builder()
    y = b.bn(b.conv(b.input("x", ["N", 3, "H", "W"]), 3, 4, pad=0), 4)
    report = fold_model(b.model([y])).report
    assert report.batchnorm_after == 0
    assert report.check_inputs == "4 random batches, symbolic dims set to 2 (leading), 32"


@pytest.mark.parametrize("shape", [[], [4, 1, 1]])
def test_kept_mul_add_is_reported_only_when_per_channel(shape: list[int]) -> None:
    """Conv output read twice (as hard-swish's x * relu6(x + 3) does): the Add cannot fold.
    A scalar Add is arithmetic, not a BN, and not reported; a per-channel one is."""
    b = Builder()
    y = b.conv(b.input("x", ["N", 3, 8, 8]), 3, 4)
    shifted = b.node("Add", [y, b.const("three", shape)])
    model = b.model([b.node("Mul", [y, b.node("Relu", [shifted])])])
    report = fold_model(model).report
    assert report.folded == []
    if shape:
        assert [(k.bn, k.bn_type, k.bn_shape) for k in report.kept] == [("add2", "Add", shape)]
        assert report.kept[0].reason.startswith("before it: 'conv1' is read by 2 nodes")
    else:
        assert report.kept == []


def test_batchnorm_in_a_loop_body_folds() -> None:
    """A Loop applies Conv+BN to its carried value; the body reads the outer weights."""
    outer = Builder()
    x = outer.input("x", ["N", 3, 8, 8])
    body = Builder()
    body.count = 100
    y = body.bn(body.node("Conv", ["carried", outer.const("w", [3, 3, 3, 3])], pads=[1] * 4), 3)
    body.nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    graph = helper.make_graph(
        body.nodes,
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carried", TensorProto.FLOAT, ["N", 3, 8, 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 3, 8, 8]),
        ],
        body.inits,
    )
    outer.inits.append(numpy_helper.from_array(np.array(2, np.int64), "trips"))
    out = outer.node("Loop", ["trips", "", x], body=graph)
    model = outer.model([out])
    model.graph.output[0].CopyFrom(
        helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 3, 8, 8])
    )
    outcome = fold_model(model)
    assert outcome.report.batchnorm_before == 1 and outcome.report.batchnorm_after == 0
    assert outcome.report.folded[0].into == "conv101" and outcome.report.passed
    feeds = feeds_for(model, np.float32)
    assert max_diff(run(model, feeds), run(outcome.model, feeds)) < 1e-4


def test_mul_that_is_not_per_channel_says_so() -> None:
    """A Mul by a (W,) vector after a Conv scales columns, not channels: kept, with why."""
    b = Builder()
    y = b.conv(b.input("x", ["N", 3, 8, 8]), 3, 4)
    model = b.model([b.node("Add", [b.node("Mul", [y, b.const("s", [8])]), b.const("t", [8])])])
    report = fold_model(model).report
    assert report.folded == [] and [k.bn_type for k in report.kept] == ["Mul+Add"]
    assert "its constant (shape [8]) is not per-channel on axis 1" in report.kept[0].reason


def test_ir3_model_lists_its_new_initializers_as_inputs() -> None:
    """Before IR 4 every initializer must also be a graph input (the checker enforces it)."""
    model = build("conv_bn_opset7")
    model.ir_version = 3
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in model.graph.initializer
    )
    folded = fold_model(model).model  # passes onnx.checker (full) or raises
    assert op_count(folded, "BatchNormalization") == 0
    inputs = {i.name for i in folded.graph.input}
    assert {t.name for t in folded.graph.initializer} | {"x"} == inputs


def test_batchnorm_in_a_local_function_is_reported_kept() -> None:
    b = Builder()
    x = b.input("x", ["N", 3, 8, 8])
    params = [b.const(n, [3], 0.5) for n in ("g", "beta", "mean", "var")]
    bn = helper.make_node("BatchNormalization", ["x", "g", "beta", "mean", "var"], ["y"])
    function = helper.make_function(
        "local",
        "norm",
        ["x", "g", "beta", "mean", "var"],
        ["y"],
        [bn],
        [helper.make_opsetid("", 17)],
    )
    b.nodes.append(helper.make_node("norm", [x, *params], ["out"], domain="local"))
    graph = helper.make_graph(
        b.nodes,
        "g",
        b.inputs,
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, 8, 8])],
        b.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[function],
    )
    model.ir_version = 10
    report = fold_model(model).report
    assert report.batchnorm_before == report.batchnorm_after == 1
    assert [k.bn for k in report.kept] == ["norm/BatchNormalization->y"]
    assert "inside the model-local function 'norm'" in report.kept[0].reason


def test_cli_folds_a_file_and_writes_the_report(tmp_path: Path) -> None:
    from training.__main__ import app

    src, dst, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(build("concat_bn"), src)
    result = CliRunner().invoke(app, ["fold-onnx", str(src), str(dst), "--report", str(report)])
    assert result.exit_code == 0, result.output
    line = "folded BatchNormalization 'batchnormalization5' backward into Concat(Conv, Conv, Conv)"
    assert f"{line} 'conv1, conv2, conv3'" in result.output
    assert "BatchNormalization nodes 1 -> 0" in result.output and "PASS" in result.output
    assert op_count(onnx.load(dst), "BatchNormalization") == 0
    written = OnnxFoldReport.model_validate_json(report.read_text())
    assert written.passed and written.batchnorm_after == 0 and written.max_abs_diff < 1e-4


def test_cli_refuses_to_write_a_fold_beyond_tolerance(tmp_path: Path) -> None:
    from training.__main__ import app

    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(build("conv_bn"), src)
    result = CliRunner().invoke(app, ["fold-onnx", str(src), str(dst), "--tolerance", "1e-12"])
    assert result.exit_code == 2
    assert "FAIL" in result.output and "error: folded outputs differ by" in result.output
    assert "Traceback" not in result.output and not dst.exists()
    assert list(tmp_path.iterdir()) == [src]  # no temporary file left behind either
    result = CliRunner().invoke(app, ["fold-onnx", str(tmp_path / "missing.onnx"), str(dst)])
    assert result.exit_code == 2 and result.output.startswith("error: cannot read")


def test_fold_check_failed_carries_the_report() -> None:
    with pytest.raises(FoldCheckFailed) as caught:
        fold_model(build("gemm_bn"), tolerance=0.0 - 1.0)
    assert caught.value.report.folded[0].into_type == "Gemm"
    assert not caught.value.report.passed
