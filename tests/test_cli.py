"""The training CLI: one-line errors for user mistakes, and a real train run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from training.__main__ import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["train", "--model", "vgg99"],
            "unknown model 'vgg99'; choose one of mlp, cnn, resnet, mobilenet",
        ),
        (["train", "--dataset", "mnist"], "unknown dataset 'mnist'; choose one of digits"),
        (["train", "--model", "cnn", "--dataset", "wine"], "needs image inputs"),
        (["train", "--batch-size", "1"], "batch-size >= 2"),
        (
            ["train", "--activation", "swish", "--model", "mlp", "--dataset", "wine"],
            "unknown activation",
        ),
        (["fold", "--run", "/nonexistent/run"], "not a run directory"),
    ],
)
def test_user_errors_are_one_line(args, message, tmp_path: Path):
    result = runner.invoke(
        app, [*args, "--out", str(tmp_path / "r")] if args[0] == "train" else args
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_bad_npz_is_one_line(tmp_path: Path):
    np.savez(tmp_path / "d.npz", features=np.zeros((10, 2)))
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tmp_path / "d.npz"),
            "--model",
            "mlp",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 2
    assert "missing array(s) X, y" in " ".join(result.output.split())


def test_train_writes_run(tmp_path: Path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            "mlp",
            "--dataset",
            "wine",
            "--epochs",
            "2",
            "--width",
            "8",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["name"] == "mlp"
    assert config["model"]["input_shape"] == [13]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    assert 0.0 <= metrics["test_accuracy"] <= 1.0


def test_list_models_shows_parameter_counts():
    result = runner.invoke(app, ["list-models", "--input-shape", "1x8x8"])
    assert result.exit_code == 0
    for name in ("mlp", "cnn", "resnet", "mobilenet"):
        assert name in result.output
    assert "65,834" in result.output  # cnn on 1x8x8, 10 classes
