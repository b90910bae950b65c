"""``export --int8``: a checked INT8 (QDQ) model of the folded network, its accuracy beside
FP32's, refused past the tolerance; ``retrain`` keeps it; ``import-onnx --calibration``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from foldserve.model_format import VersionMetadata
from training import export as export_mod
from training.__main__ import app
from training.data import load_dataset
from training.retrain import plan_retrain
from training.train import DatasetSpec, TrainConfig, save_run, train
from training.zoo import NetworkConfig

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def one_line(output: str) -> str:
    return " ".join(output.split())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small digits CNN, saved as `train` saves it (4 epochs: a 1-epoch one sits so close
    to its decision boundaries that INT8 flips several points of its test accuracy)."""
    tmp = tmp_path_factory.mktemp("int8")
    ds = load_dataset("digits", seed=0)
    cfg = NetworkConfig("cnn", ds.input_shape, ds.num_classes, width=8)
    tcfg = TrainConfig(epochs=4, seed=0)
    result = train(cfg, ds, tcfg, progress=False)
    save_run(tmp / "run", result, cfg, DatasetSpec("digits"), tcfg, ds.labels)
    return tmp / "run"


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> Path:
    """``export --int8`` of the run (MinMax only: the choice among methods is tested below)."""
    repository = run_dir.parent / "models"
    result = runner.invoke(
        app,
        ["export", "--run", str(run_dir), "--repository", str(repository), "--name", "d"]
        + ["--int8", "--calibration-method", "MinMax,Entropy", "--calibration-samples", "256"],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 0, result.output
    assert "int8 calibration: " in result.output
    return repository / "d" / "1"


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": x})[0].argmax(axis=1) == y).mean())


def test_export_int8_writes_a_checked_qdq_model(exported: Path) -> None:
    md = VersionMetadata.read(exported)  # sha256 and structure through the contract
    raw = json.loads((exported / "metadata.json").read_text())
    assert raw["files"]["int8"] == "model.int8.onnx"
    assert md.int8 is not None and md.sha256["model.int8.onnx"]
    graph = onnx.load(exported / "model.int8.onnx").graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count(
        "QuantizeLinear"
    )  # weights are DequantizeLinear of INT8 initializers
    assert md.int8.qdq_nodes == {
        "QuantizeLinear": ops.count("QuantizeLinear"),
        "DequantizeLinear": ops.count("DequantizeLinear"),
    }
    assert "BatchNormalization" not in ops
    assert any(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer)
    # Accuracy on the test split, recomputed here, beside the folded FP32 model's.
    ds = load_dataset("digits", seed=0)
    assert md.int8.accuracy == pytest.approx(
        _accuracy(exported / "model.int8.onnx", ds.X_test, ds.y_test)
    )
    assert md.int8.reference_accuracy == pytest.approx(
        _accuracy(exported / "model.onnx", ds.X_test, ds.y_test)
    )
    assert md.int8.accuracy_samples == len(ds.X_test)
    assert md.int8.reference_accuracy - md.int8.accuracy <= md.int8.tolerance == 0.01
    assert 0.9 <= md.int8.agreement <= 1.0
    cal = md.int8.calibration
    assert cal.samples == 256 and "training split" in cal.inputs
    assert set(cal.candidates) == {"MinMax", "Entropy"} and cal.method in cal.candidates
    assert cal.candidates[cal.method] == max(cal.candidates.values())
    # Its own reference outputs reproduce; FP32's differ by the recorded max abs diff.
    x = md.reference.inputs["input"].array()
    session = ort.InferenceSession(
        str(exported / "model.int8.onnx"), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, md.int8.reference_outputs["logits"].array(), atol=1e-6)
    fp32 = md.reference.outputs["logits"].array()
    assert float(np.abs(got - fp32).max()) == pytest.approx(md.int8.max_abs_diff, rel=1e-5)
    assert md.int8.reference_atol >= 1e-4


def test_int8_past_the_tolerance_writes_nothing(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Calibrated on a training split of zeros, the activation ranges clip every real input.
    real = export_mod.run_dataset

    def zero_training_split(run: Any) -> Any:
        ds = real(run)
        ds.X_train = np.zeros_like(ds.X_train)
        return ds

    monkeypatch.setattr(export_mod, "run_dataset", zero_training_split)
    result = runner.invoke(
        app,
        ["export", "--run", str(run_dir), "--repository", str(tmp_path), "--name", "d"]
        + ["--int8", "--int8-tolerance", "5", "--calibration-method", "MinMax"],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 2, result.output
    text = one_line(result.output)
    assert re.search(r"INT8 loses \d+\.\d\d points of accuracy \(0\.\d{4} against FP32's", text)
    assert "the tolerance is 5 point(s), missed by" in text
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_unknown_calibration_method_is_refused(run_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["export", "--run", str(run_dir), "--repository", str(tmp_path)]
        + ["--int8", "--calibration-method", "Median"],
    )
    assert result.exit_code == 2 and "Median" in result.output


def test_retrain_keeps_int8(exported: Path) -> None:
    plan = plan_retrain(exported.parent.parent, "d")
    assert plan.int8 is not None
    assert plan.int8.calibration_samples == 256 and plan.int8.tolerance == 0.01
    assert plan.int8.methods == ("MinMax", "Entropy")


def test_import_onnx_int8_needs_calibration_data(exported: Path, tmp_path: Path) -> None:
    source = exported / "model.unfolded.onnx"
    ds = load_dataset("digits", seed=0)
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, X=ds.X_test[:128], y=ds.y_test[:128])
    repo = tmp_path / "models"
    base = [
        "import-onnx",
        str(source),
        "--repository",
        str(repo),
        "--int8",
        "--int8-tolerance",
        "5",
    ]
    without = runner.invoke(app, [*base, "--name", "plain"], env={"COLUMNS": "300"})
    assert without.exit_code == 0, without.output
    assert "no INT8 file: a model without a run needs samples" in one_line(without.output)
    assert VersionMetadata.read(repo / "plain" / "1").int8 is None
    assert not (repo / "plain" / "1" / "model.int8.onnx").exists()
    args = [*base, "--name", "q", "--calibration", str(calibration), "--calibration-method"]
    done = runner.invoke(app, [*args, "MinMax"], env={"COLUMNS": "300"})
    assert done.exit_code == 0, done.output
    md = VersionMetadata.read(repo / "q" / "1")
    assert md.int8 is not None and md.files.int8 == "model.int8.onnx"
    assert md.int8.accuracy_samples == 128 and "cal.npz" in md.int8.accuracy_inputs
    assert md.int8.accuracy == pytest.approx(
        _accuracy(repo / "q" / "1" / "model.int8.onnx", ds.X_test[:128], ds.y_test[:128])
    )
