"""Export: both ONNX files, exact BN node counts, parity, metadata, atomic versions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from training import export as export_mod
from training.data import load_dataset
from training.export import ExportError, export_run
from training.train import DatasetSpec, TrainConfig, load_run, save_run, train
from training.zoo import NetworkConfig


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bn_nodes(model: onnx.ModelProto) -> int:
    """Counted here, independently of the code under test (zoo graphs have no subgraphs)."""
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)


def _run(tmp: Path, name: str, model: str, dataset: str, **options) -> Path:
    spec = (
        DatasetSpec(dataset, shape=[3, 12, 12], num_classes=3, n_samples=120)
        if dataset == "synthetic"
        else DatasetSpec(dataset)
    )
    ds = load_dataset(dataset, shape=(3, 12, 12), num_classes=3, n_samples=120)
    cfg = NetworkConfig(model, ds.input_shape, ds.num_classes, **options)
    tcfg = TrainConfig(epochs=1, batch_size=32)
    save_run(tmp / name, train(cfg, ds, tcfg, progress=False), cfg, spec, tcfg, ds.labels)
    return tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("runs")
    return {
        "digits_cnn": _run(tmp, "digits_cnn", "cnn", "digits", width=8),
        "bc_mlp": _run(tmp, "bc_mlp", "mlp", "breast_cancer", width=16),
        "resnet": _run(tmp, "resnet", "resnet", "synthetic", width=8, depth=2),
        "mobilenet": _run(tmp, "mobilenet", "mobilenet", "synthetic", width=8, depth=2),
        "mlp_after": _run(tmp, "mlp_after", "mlp", "wine", width=16, bn_position="after"),
    }


@pytest.mark.parametrize(
    ("run", "bn_layers", "folded_bn"),
    [
        ("digits_cnn", 4, 0),
        ("bc_mlp", 2, 0),
        ("resnet", 6, 0),
        ("mobilenet", 5, 0),
        # BN after the activation: the first folds forward into the next Linear, the last
        # folds forward into the head; nothing is left.
        ("mlp_after", 2, 0),
    ],
)
def test_export_writes_both_variants(runs, tmp_path: Path, run, bn_layers, folded_bn):
    result = export_run(runs[run], tmp_path, run)
    assert result.version == 1
    vdir = tmp_path / run / "1"
    assert sorted(p.name for p in vdir.iterdir()) == [
        "metadata.json",
        "model.onnx",
        "model.unfolded.onnx",
    ]
    folded, unfolded = onnx.load(vdir / "model.onnx"), onnx.load(vdir / "model.unfolded.onnx")
    assert _bn_nodes(folded) == folded_bn
    assert _bn_nodes(unfolded) == bn_layers
    md = json.loads((vdir / "metadata.json").read_text())
    assert md["bn_nodes"] == {"folded": folded_bn, "unfolded": bn_layers}
    assert md["sha256"]["model.onnx"] == sha256_file(vdir / "model.onnx")
    assert md["sha256"]["model.unfolded.onnx"] == sha256_file(vdir / "model.unfolded.onnx")
    assert md["inputs"][0]["shape"][0] == -1
    assert md["parity"]["max_abs_diff"] < 1e-4
    # How the run was made, for `retrain`: the run's own dataset spec and training config.
    config = json.loads((runs[run] / "config.json").read_text())
    assert md["training"]["dataset"] == config["dataset"]
    assert md["training"]["config"] == config["train"]
    assert md["training"]["config"]["epochs"] == 1 and md["training"]["epochs"] == 1
    assert len(md["fold_report"]["folded"]) == bn_layers - folded_bn
    # The reference batch reproduces through ONNX Runtime, at a batch size other than export's.
    ref_in = md["reference"]["inputs"]["input"]
    x = np.array(ref_in["data"], np.float32).reshape(ref_in["shape"])
    expected = np.array(md["reference"]["outputs"]["logits"]["data"], np.float32)
    for f in ("model.onnx", "model.unfolded.onnx"):
        sess = ort.InferenceSession(str(vdir / f), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": x})[0].reshape(-1)
        np.testing.assert_allclose(got, expected, atol=1e-4)
        one = sess.run(None, {"input": x[:1]})[0]
        np.testing.assert_allclose(one.reshape(-1), expected[: one.size], atol=1e-4)
    # ...and equals PyTorch on the same inputs.
    with torch.no_grad():
        torch_out = load_run(runs[run]).model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(torch_out.reshape(-1), expected, atol=1e-4)


def test_failed_check_leaves_no_version(runs, tmp_path: Path, monkeypatch):
    def bad_outputs(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
        sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        return sess.run(None, {"input": x})[0] + 1e-2  # a wrong runtime

    monkeypatch.setattr(export_mod, "ort_outputs", bad_outputs)
    with pytest.raises(ExportError, match="parity failed"):
        export_run(runs["bc_mlp"], tmp_path, "bc")
    assert not (tmp_path / "bc").exists() or not any((tmp_path / "bc").iterdir())


def test_bad_model_name(runs, tmp_path: Path):
    with pytest.raises(ExportError, match="bad model name"):
        export_run(runs["bc_mlp"], tmp_path, "../evil")


def test_fp16_export_folds_once_in_high_precision(runs, tmp_path: Path):
    result = export_run(runs["bc_mlp"], tmp_path, "bc16", dtype=torch.float16)
    md = result.metadata
    assert md.inputs[0].datatype == "FP16"
    assert md.bn_nodes == {"folded": 0, "unfolded": 2}
    assert md.parity is not None and md.parity.max_abs_diff_vs_torch["folded"] < 2e-2


def test_each_export_gets_its_own_copy_of_the_registry_built_once() -> None:
    """training.onnx_graph builds torch.onnx's torchlib registry once per process; an op
    registered on one export's copy (a custom_translation_table) never reaches another's,
    and an export through the shared one is the export without it, byte for byte."""
    from torch.onnx._internal.exporter import _registration

    from training.onnx_graph import export_onnx
    from training.zoo import build_model

    first = _registration.ONNXRegistry.from_torchlib()
    second = _registration.ONNXRegistry.from_torchlib()
    assert first is not second and first.functions == second.functions
    op = "aten::relu"
    before = list(second.functions[op])
    first.register_op(torch.ops.aten.relu.default, lambda x: x)
    assert len(first.functions[op]) == len(before) + 1
    assert second.functions[op] == before
    assert _registration.ONNXRegistry.from_torchlib().functions[op] == before

    torch.manual_seed(0)
    net = build_model(NetworkConfig("cnn", (1, 8, 8), 10), np.zeros(1), np.ones(1))
    exported = [export_onnx(net, torch.zeros(2, 1, 8, 8)).SerializeToString() for _ in range(2)]
    assert exported[0] == exported[1]
