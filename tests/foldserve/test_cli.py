"""The training CLI: one-line errors for user mistakes, and a real train run; and the
``foldserve`` command that dispatches to it and to the server."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from tests import ROOT
from training import terminal
from training.__main__ import app
from training.cli_support import configure_logging
from training.train import load_run

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
        (["train", "--dtype", "float16"], "unknown dtype 'float16'; choose float32 or float64"),
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


def _csv(path: Path, rows: int = 60, *, index: bool = False, end: str = "\n\n") -> Path:
    """A user's CSV: 3 numeric features, 3 string classes (cat, dog, bird)."""
    rng = np.random.default_rng(0)
    labels = np.array(["cat", "dog", "bird"])[np.arange(rows) % 3]
    X = rng.normal(size=(rows, 3)) + (np.arange(rows) % 3)[:, None]
    head = ([""] if index else []) + ["x1", "x2", "x3", "species"]
    lines = [",".join(head)]
    for i, (row, label) in enumerate(zip(X.round(4), labels, strict=True)):
        lines.append(",".join(([str(i)] if index else []) + [str(v) for v in row] + [label]))
    path.write_text("\n".join(lines) + end)
    return path


def _train(tmp_path: Path, *args: str) -> Any:
    command = ["train", "--model", "mlp", "--epochs", "1", "--width", "8", *args]
    return runner.invoke(app, command, env={"COLUMNS": "300"})


def test_train_on_a_csv_with_index_column_and_blank_lines_records_features(tmp_path: Path):
    data = _csv(tmp_path / "pets.csv", index=True)
    out = tmp_path / "run"
    result = _train(tmp_path, "--data", str(data), "--label-column", "species", "--out", str(out))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["features"] == ["x1", "x2", "x3"]
    assert config["labels"] == ["bird", "cat", "dog"]
    assert config["model"]["input_shape"] == [3]


def test_a_bad_csv_value_is_one_line_naming_file_line_and_column(tmp_path: Path):
    data = _csv(tmp_path / "pets.csv")
    lines = data.read_text().splitlines()
    lines[9] = "1.0,oops,2.0,cat"
    data.write_text("\n".join(lines))
    result = _train(tmp_path, "--data", str(data), "--label-column", "species")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {data}, line 10, column 'x2': 'oops' is not a number "
        "(feature columns must be numeric)"
    ]


def test_runs_never_overwrite_each_other(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    for expected in ("runs/wine_mlp", "runs/wine_mlp_2"):
        result = _train(tmp_path, "--dataset", "wine")
        assert result.exit_code == 0, result.output
        assert result.output.rstrip().endswith(f"-> {expected}")
        assert (tmp_path / expected / "model.pt").is_file()
    before = (tmp_path / "runs/wine_mlp/model.pt").read_bytes()
    result = _train(tmp_path, "--dataset", "wine", "--seed", "3", "--out", "runs/wine_mlp")
    assert result.exit_code == 2
    assert "runs/wine_mlp holds a run already: pass --force" in result.output
    assert (tmp_path / "runs/wine_mlp/model.pt").read_bytes() == before
    forced = ["--dataset", "wine", "--seed", "3", "--out", "runs/wine_mlp", "--force"]
    assert _train(tmp_path, *forced).exit_code == 0
    assert (tmp_path / "runs/wine_mlp/model.pt").read_bytes() != before


def test_fold_report_shows_types_shapes_directions_and_parity_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "run"
    assert _train(tmp_path, "--dataset", "wine", "--out", str(out)).exit_code == 0
    # Wide enough for a row on one line. The console is made at import; it reads COLUMNS
    # then when COLUMNS is set (as in a pytest-xdist worker), so set its width itself.
    monkeypatch.setattr(terminal.console, "_width", 300)
    result = runner.invoke(app, ["fold", "--run", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    text = result.output
    assert "2.1 (BatchNorm1d [8]) │ folded │ backward into 2.0 (Linear [8, 13])" in text
    assert "3.1 (BatchNorm1d [8]) │ folded │ backward into 3.0 (Linear [8, 8])" in text
    assert "backward: into the layer before the BN; forward: into the layer after it" in text
    # Each folded layer's |W'| spread over output channels, computed here from BN and Linear.
    model = load_run(out).model
    for layer, bn in (("2.0", "2.1"), ("3.0", "3.1")):
        lin, norm = model.get_submodule(layer), model.get_submodule(bn)
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # (C,)
        per_channel = (scale[:, None] * lin.weight).abs().amax(dim=1).detach()  # (C,)
        low, high = float(per_channel.min()), float(per_channel.max())
        row = next(line for line in text.splitlines() if f"backward into {layer} " in line)
        assert row.rstrip(" │").endswith(f"{low:.3g} - {high:.3g} ({high / low:.3g}x)")
    assert "one INT8 scale per tensor spends its 256 steps on the widest channel" in text
    parity = next(line for line in text.splitlines() if line.startswith("parity"))
    assert parity.startswith("parity (PyTorch, folded vs unfolded, 36 samples of the run's test")
    assert parity.endswith("<= tolerance 0.0001: PASS")


def _commands() -> list[tuple[str, Any]]:
    """The CLI group and each of its commands (typer's click objects)."""
    group = typer.main.get_command(app)
    return [("python -m training", group), *group.commands.items()]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("name", "command"), _commands(), ids=lambda v: str(v)[:20])
def test_every_option_has_help_and_shows_its_default(name: str, command: Any):
    assert command.params, name
    for param in command.params:
        if param.name == "help":
            continue
        text = getattr(param, "help", None) or ""
        assert text.strip(), f"{name} {param.opts}: no help text"
        if param.param_type_name != "option":
            continue
        if not param.is_flag and param.default is not None:
            shown = param.show_default is not False or "default:" in text
            assert shown, f"{name} {param.opts}: default {param.default!r} not shown"
        if param.is_flag and not param.secondary_opts:
            assert param.metavar == "", f"{name} {param.opts}: a flag shows a value"


def test_experiment_help_lists_the_experiments():
    from training.experiments import EXPERIMENTS

    result = runner.invoke(app, ["experiment", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert f"Experiments: all, {', '.join(EXPERIMENTS)}." in result.output


def test_verbose_is_a_plain_flag_and_export_is_quiet_without_it(tmp_path: Path):
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "300"})
    verbose = next(line for line in result.output.splitlines() if "--verbose" in line)
    assert "<bool>" not in verbose and "debug logs" in verbose
    run = tmp_path / "run"
    assert _train(tmp_path, "--dataset", "wine", "--out", str(run)).exit_code == 0
    export = ["export", "--run", str(run), "--repository", str(tmp_path / "models")]
    quiet = runner.invoke(app, export, env={"COLUMNS": "300"})
    assert quiet.exit_code == 0, quiet.output
    assert "onnx_ir" not in quiet.output and "onnxscript" not in quiet.output
    parity = "parity (ONNX Runtime, folded vs unfolded, 36 samples of the run's test split)"
    assert parity in quiet.output
    loud = runner.invoke(app, ["--verbose", *export], env={"COLUMNS": "300"})
    configure_logging(False)  # the runner's stream is closed: no INFO from torch at exit
    logging.basicConfig(force=True)
    assert loud.exit_code == 0 and "INFO onnx_ir" in loud.output
    meta = json.loads((tmp_path / "models/run/1/metadata.json").read_text())
    assert meta["fold_report"]["folded"][0] == {
        "bn": "2.1",
        "into": "2.0",
        "direction": "backward",
        "bn_type": "BatchNorm1d",
        "bn_shape": [8],
        "into_type": "Linear",
        "into_shape": [8, 13],
    }
    assert meta["parity"]["inputs"] == "samples of the run's test split"
    assert meta["parity"]["samples"] == 36


# -- the foldserve command ---------------------------------------------------------------

# What the installed `foldserve` script runs, in a fresh interpreter: the checkout's code.
ENTRY = "import sys; from foldserve.cli import main; sys.argv[0] = 'foldserve'; main()"
NO_TORCH = "import sys; sys.modules['torch'] = None; " + ENTRY  # a serving install
ENV = {"COLUMNS": "200", "PATH": "", "PYTHONPATH": str(ROOT)}  # same width for every help
IMPORTED = """
import sys
from foldserve.cli import main
try:
    main(sys.argv[1:])
except SystemExit as done:
    print("exit", done.code)
print(sorted(m for m in ("torch", "training") if m in sys.modules))
"""


def foldserve(*args: str, code: str = ENTRY) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )


def test_the_console_script_is_the_dispatcher() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"foldserve": "foldserve.cli:main"}


def test_foldserve_serve_is_python_m_service_and_imports_no_torch() -> None:
    served = foldserve("serve", "--help")
    direct = subprocess.run(
        [sys.executable, "-m", "service", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert served.returncode == 0, served.stderr
    assert served.stdout.startswith("usage: foldserve serve ")
    assert direct.stdout.startswith("usage: python -m service ")
    # The same flags and help after the usage block, which names each command.
    assert served.stdout.split("\n\n", 1)[1] == direct.stdout.split("\n\n", 1)[1]
    assert "--repository REPOSITORY" in served.stdout
    loaded = foldserve("serve", "--help", code=IMPORTED)
    assert loaded.stdout.splitlines()[-2:] == ["exit 0", "[]"], loaded.stdout[-500:]


@pytest.mark.parametrize(
    ("flag", "refusal"), [("--port", "cannot listen on"), ("--grpc-port", "cannot serve gRPC on")]
)
def test_foldserve_serve_names_itself_when_its_port_is_taken(
    tmp_path: Path, unused_port: int, flag: str, refusal: str
) -> None:
    """A port another process listens on stops the start at once, in one line that names
    the command the user typed and the port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": unused_port, "--grpc-port": 0, flag: port}  # the taken one at flag
        flags = [f"{name}={value}" for name, value in ports.items()]
        served = foldserve(
            "serve",
            f"--repository={tmp_path}",
            "--workers=2",
            f"--runtime-dir={tmp_path}/rt",
            *flags,
        )
    assert served.returncode == 1, served.stderr[-2000:]
    line = f"foldserve serve: {refusal} 127.0.0.1:{port}: [Errno 98] Address already in use"
    assert any(out.startswith(line) for out in served.stderr.splitlines()), served.stderr[-2000:]


def test_foldserve_serve_works_without_torch() -> None:
    """The serving image has no torch: serve must not need it."""
    served = foldserve("serve", "--help", code=NO_TORCH)
    assert served.returncode == 0 and "--repository REPOSITORY" in served.stdout, served.stderr


def test_foldserve_train_is_python_m_training() -> None:
    """``foldserve train --help`` and the command list answer without importing torch
    (the commands import it when they run)."""
    trained = foldserve("train", "--help", code=IMPORTED)
    assert trained.returncode == 0, trained.stderr
    assert "Usage: foldserve train [OPTIONS]" in trained.stdout
    assert "--dataset" in trained.stdout and "--epochs" in trained.stdout
    assert trained.stdout.splitlines()[-2:] == ["exit 0", "['training']"], trained.stdout[-300:]
    listed = foldserve("--help-training")
    assert listed.returncode == 0, listed.stderr
    for command in ("train", "export", "fold", "retrain", "fold-onnx", "import-onnx"):
        assert f" {command} " in listed.stdout


def test_foldserve_train_without_torch_says_what_to_install() -> None:
    refused = foldserve("train", "--epochs", "1", code=NO_TORCH)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "foldserve train: this is a serving install, without torch; training commands need "
        "the training install: pip install 'foldserve[train]' (foldserve serve works here)"
    )


@pytest.mark.parametrize(("args", "status"), [([], 2), (["--help"], 0)])
def test_foldserve_alone_lists_its_commands(args: list[str], status: int) -> None:
    shown = foldserve(*args)
    assert shown.returncode == status
    assert shown.stdout.startswith("usage: foldserve COMMAND [ARGS]...")
    assert "  serve " in shown.stdout and "python -m training COMMAND" in shown.stdout
