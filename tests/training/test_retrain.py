"""Retrain: the next version is trained with what the latest one recorded, overrides applied,
and a running server with several workers serves it.

A tiny breast-cancer MLP, trained with settings that are none of the defaults,
is exported as version 1; each test retrains a copy of that repository through
the CLI. The server is a real ``python -m service`` process on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from foldserve.model_format import FOLDED_FILE, UNFOLDED_FILE, VersionMetadata, write_version
from training.__main__ import app
from training.data import load_dataset
from training.export import export_run
from training.server_client import LoadError, load_version
from training.train import DatasetSpec, TrainConfig, save_run, train
from training.zoo import NetworkConfig

NAME = "bc"
# Not TrainConfig's defaults, so a retrain that used the defaults would differ.
RECORDED = TrainConfig(epochs=2, batch_size=32, lr=1e-2, weight_decay=0.0, seed=4)
API_KEY = "retrain-key"
WORKERS = 2
REQUESTS = 12  # per check, each on a new connection: both workers answer some

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 1 of ``bc`` (FP32) and of ``bc16`` (FP16), exported as ``export`` does."""
    tmp = tmp_path_factory.mktemp("base")
    spec = DatasetSpec("breast_cancer", seed=RECORDED.seed)
    ds = spec.load()
    cfg = NetworkConfig("mlp", ds.input_shape, ds.num_classes, width=8, depth=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: the one_torch_thread fixture is per test
    try:
        result = train(cfg, ds, RECORDED, progress=False)
    finally:
        torch.set_num_threads(threads)
    save_run(tmp / "run", result, cfg, spec, RECORDED, ds.labels)
    export_run(tmp / "run", tmp / "models", NAME)
    export_run(tmp / "run", tmp / "models", f"{NAME}16", torch.float16)
    return tmp / "models"


@pytest.fixture
def repository(base_repository: Path, tmp_path: Path) -> Path:
    shutil.copytree(base_repository, tmp_path / "models")
    return tmp_path / "models"


def metadata(repository: Path, version: int) -> VersionMetadata:
    return VersionMetadata.read(repository / NAME / str(version))


def retrain(repository: Path, *args: str) -> Any:
    runs = repository.parent / "runs"
    command = ["retrain", "--repository", str(repository), "--name", NAME, "--runs", str(runs)]
    return runner.invoke(app, [*command, *args], env={"COLUMNS": "400"})  # no wrapped paths


def one_line(output: str) -> str:
    return " ".join(output.split())


def test_retrain_without_overrides_reproduces_the_recorded_training(repository: Path) -> None:
    result = retrain(repository)
    assert result.exit_code == 0, result.output
    v1, v2 = metadata(repository, 1), metadata(repository, 2)
    assert v2.version == 2
    assert v2.network == v1.network
    assert v2.training["dataset"] == v1.training["dataset"]
    assert v2.training["config"] == v1.training["config"]
    # Same data, same network, same seeded training: the same weights, so the same outputs
    # on the same reference inputs.
    ref1, ref2 = v1.reference, v2.reference
    np.testing.assert_array_equal(ref2.inputs["input"].array(), ref1.inputs["input"].array())
    np.testing.assert_allclose(
        ref2.outputs["logits"].array(), ref1.outputs["logits"].array(), atol=1e-6
    )
    assert v2.training["test_accuracy"] == v1.training["test_accuracy"]
    assert f"retraining {NAME} v1: mlp on breast_cancer, epochs=2 seed=4" in one_line(result.output)


def test_retrain_applies_epochs_and_seed(repository: Path) -> None:
    result = retrain(repository, "--epochs", "3", "--seed", "11")
    assert result.exit_code == 0, result.output
    v1, v2 = metadata(repository, 1), metadata(repository, 2)
    assert v2.network == v1.network and v2.labels == v1.labels and v2.inputs == v1.inputs
    assert v2.training["config"] == {**v1.training["config"], "epochs": 3, "seed": 11}
    assert v2.training["dataset"] == {**v1.training["dataset"], "seed": 11}
    assert v2.training["epochs"] == 3  # the metrics: epochs actually run
    run = json.loads((repository.parent / "runs" / f"{NAME}-v2" / "config.json").read_text())
    assert run["train"] == v2.training["config"]


def test_retrain_on_a_data_file(repository: Path, tmp_path: Path) -> None:
    ds = load_dataset("breast_cancer", seed=0)
    data = tmp_path / "more.npz"
    X = np.concatenate([ds.X_train, ds.X_val, ds.X_test])
    np.savez(data, X=X, y=np.concatenate([ds.y_train, ds.y_val, ds.y_test]))
    result = retrain(repository, "--data", str(data), "--epochs", "1")
    assert result.exit_code == 0, result.output
    v2 = metadata(repository, 2)
    recorded = metadata(repository, 1).training["dataset"]
    assert v2.training["dataset"] == {**recorded, "name": "file", "path": str(data)}
    assert v2.training["epochs"] == 1


def test_retrain_exports_with_the_datatype_of_the_version_it_replaces(repository: Path) -> None:
    result = retrain(repository, "--name", f"{NAME}16", "--epochs", "1")
    assert result.exit_code == 0, result.output
    v2 = VersionMetadata.read(repository / f"{NAME}16" / "2")
    assert [t.datatype for t in (*v2.inputs, *v2.outputs)] == ["FP16", "FP16"]
    assert v2.parity is not None and v2.parity.atol == 2e-2


def without(record: dict[str, Any], path: str) -> dict[str, Any]:
    """``record`` (metadata.json as a dict) without the dotted key ``path``."""
    record = json.loads(json.dumps(record))
    *parents, last = path.split(".")
    node = record
    for key in parents:
        node = node[key]
    del node[last]
    return record


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda md: without(without(md, "training.dataset"), "training.config"),
            "version 2 of bc cannot be retrained: its metadata.json lacks training.dataset, "
            "training.config (versions exported before retrain support do not record how "
            "they were trained",
        ),
        (
            lambda md: without(md, "training.config.lr"),
            "its metadata.json lacks training.config.lr (",
        ),
        (
            lambda md: without(without(md, "model_config"), "training.dataset.label_column"),
            "lacks model_config, training.dataset.label_column (",
        ),
        (
            lambda md: md | {"training": md["training"] | {"config": {"warmup": 5}}},
            "training.config records warmup, which this trainer does not know",
        ),
    ],
)
def test_retrain_refuses_a_version_that_lacks_its_record(
    repository: Path, edit: Any, message: str
) -> None:
    """Version 2 is version 1's files with its record edited, as an older exporter wrote it."""
    v1 = repository / NAME / "1"
    recorded = json.loads(metadata(repository, 1).to_json())
    files = {f: (v1 / f).read_bytes() for f in (FOLDED_FILE, UNFOLDED_FILE)}
    write_version(repository / NAME, files, VersionMetadata.model_validate(edit(recorded)))
    result = retrain(repository, "--epochs", "1")
    assert result.exit_code == 2, result.output
    assert message in one_line(result.output)
    assert "Traceback" not in result.output
    assert sorted(p.name for p in (repository / NAME).iterdir()) == ["1", "2"]


def test_epochs_alone_do_not_make_up_for_a_missing_record(repository: Path) -> None:
    """An override fills its own key, never the rest of a missing section."""
    v1 = repository / NAME / "1"
    recorded = without(json.loads(metadata(repository, 1).to_json()), "training.config")
    files = {f: (v1 / f).read_bytes() for f in (FOLDED_FILE, UNFOLDED_FILE)}
    write_version(repository / NAME, files, VersionMetadata.model_validate(recorded))
    result = retrain(repository, "--epochs", "1", "--seed", "2")
    assert result.exit_code == 2
    assert "lacks training.config (" in one_line(result.output)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "absent"], "has no version to retrain: export one first"),
        (["--data", "{tmp}/small.npz"], "the data has input shape [5] and 2 classes; version 1 of"),
        (["--data", "{tmp}/missing.npz"], "/missing.npz: no such file"),
    ],
)
def test_retrain_user_errors_are_one_line(
    repository: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "small.npz", X=rng.normal(size=(40, 5)), y=np.arange(40) % 2)
    result = retrain(repository, *(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == 2, result.output
    assert message in one_line(result.output)
    assert "Traceback" not in result.output
    assert not (repository / NAME / "2").exists()


# -- with a running server ------------------------------------------------------------


def served(client: httpx.Client) -> list[tuple[str, list[str]] | int]:
    """What ``REQUESTS`` unversioned metadata requests answer: (version, versions) or status."""
    seen: list[tuple[str, list[str]] | int] = []
    for _ in range(REQUESTS):
        r = client.get(f"/v2/models/{NAME}")
        seen.append((r.json()["version"], r.json()["versions"]) if r.is_success else r.status_code)
    return seen


def test_retrain_while_it_serves(repository: Path, serve_process: Any) -> None:
    """Retrain, load, every worker serves the new version; refusals exit 2 with the reason."""
    with serve_process(repository, WORKERS, FOLDSERVE_API_KEY=API_KEY) as server:
        url, client = server.url, server.client
        assert served(client) == [("1", ["1"])] * REQUESTS
        result = retrain(repository, "--epochs", "1", "--load", url, "--api-key", API_KEY)
        assert result.exit_code == 0, result.output
        assert f"{url} serves bc version 2 on all {WORKERS} workers (ready: 1, 2)" in one_line(
            result.output
        )
        assert served(client) == [("2", ["1", "2"])] * REQUESTS

        # The wrong key: version 3 is exported, the server refuses to load it.
        result = retrain(repository, "--epochs", "1", "--load", url, "--api-key", "wrong")
        assert result.exit_code == 2, result.output
        assert f"{url} refused to load bc (HTTP 401): the API key is wrong" in one_line(
            result.output
        )
        assert "Traceback" not in result.output
        assert (repository / NAME / "3" / FOLDED_FILE).is_file()
        assert served(client) == [("2", ["1", "2"])] * REQUESTS

        # Version 3 corrupted on disk: the next retrain's load is refused with the reason.
        (repository / NAME / "3" / FOLDED_FILE).write_bytes(b"not an onnx model")
        result = retrain(repository, "--epochs", "1", "--load", url, "--api-key", API_KEY)
        assert result.exit_code == 2, result.output
        assert (
            f"{url} refused to load bc (HTTP 400): model 'bc' did not load cleanly: "
            "version 3: sha256 of model.onnx"
        ) in one_line(result.output)
        assert (repository / NAME / "4" / FOLDED_FILE).is_file()

        # A 200 that leaves the version out (the policy does not select it) is no success.
        (repository / NAME / "config.json").write_text(
            json.dumps({"version_policy": {"specific": {"versions": [1, 2]}}})
        )
        with pytest.raises(LoadError) as refused:
            load_version(url, NAME, 4, API_KEY)
        assert str(refused.value) == (
            f"{url} loaded bc but does not serve version 4 "
            "(UNAVAILABLE: not selected by version policy specific [1, 2])"
        )
        assert served(client) == [("2", ["1", "2"])] * REQUESTS


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:{port}", "cannot reach http://127.0.0.1:{port}: [Errno 111]"),
        ("127.0.0.1:{port}", "the server URL must start with http:// or https://"),
    ],
)
def test_an_unreachable_server_fails_before_training(
    repository: Path, url: str, message: str
) -> None:
    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = retrain(repository, "--load", url.format(port=port))
    assert result.exit_code == 2, result.output
    assert message.format(port=port) in one_line(result.output)
    assert "Traceback" not in result.output and "retraining" not in result.output
    assert not (repository / NAME / "2").exists()
