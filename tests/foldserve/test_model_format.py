"""The repository contract: names, version directories, metadata round trip, atomic writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from foldserve.model_format import (
    ModelVersionError,
    ReferenceBatch,
    TensorData,
    TensorSpec,
    VersionMetadata,
    commit_version,
    valid_model_name,
    version_numbers,
    write_version,
)


def metadata(**changes: Any) -> VersionMetadata:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    base = VersionMetadata(
        name="m",
        inputs=[TensorSpec(name="x", datatype="FP32", shape=(-1, 3))],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=(-1, 3))],
        network={"kind": "mlp", "width": 8},
        reference=ReferenceBatch(
            inputs={"x": TensorData.of(x)}, outputs={"y": TensorData.of(x * 2)}, atol=1e-5
        ),
    )
    return base.model_copy(update=changes)


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("digits_cnn", True),
        ("resnet-bench.v2", True),
        ("A1", True),
        (".hidden", False),
        ("../evil", False),
        ("a/b", False),
        ("", False),
        ("with space", False),
        ("café", False),
    ],
)
def test_model_names(name: str, valid: bool) -> None:
    assert valid_model_name(name) is valid


def test_only_plain_positive_integers_are_versions(tmp_path: Path) -> None:
    for d in ("1", "2", "10", "01", "0", "-3", ".tmp-x", "notes"):
        (tmp_path / d).mkdir()
    (tmp_path / "7").write_text("a file, not a version")
    assert version_numbers(tmp_path) == [1, 2, 10]
    assert version_numbers(tmp_path / "absent") == []


def test_metadata_round_trips_through_the_file(tmp_path: Path) -> None:
    files = {"model.onnx": b"folded", "model.unfolded.onnx": b"unfolded"}
    number = write_version(tmp_path / "m", files, metadata())
    raw = json.loads((tmp_path / "m" / "1" / "metadata.json").read_text())
    assert number == 1 and raw["version"] == 1
    assert raw["model_config"] == {"kind": "mlp", "width": 8}  # the documented key
    assert raw["sha256"] == {f: hashlib.sha256(b).hexdigest() for f, b in files.items()}
    read = VersionMetadata.read(tmp_path / "m" / "1")
    assert read.network == {"kind": "mlp", "width": 8}
    np.testing.assert_array_equal(read.reference.outputs["y"].array(), [[0, 2, 4], [6, 8, 10]])
    assert read.inputs[0].accepts((5, 3)) and not read.inputs[0].accepts((5, 4))


def test_unknown_keys_survive_a_round_trip() -> None:
    raw = json.loads(metadata().to_json())
    raw["written_by_a_newer_exporter"] = {"x": 1}
    parsed = VersionMetadata.parse(json.dumps(raw).encode())
    assert json.loads(parsed.to_json())["written_by_a_newer_exporter"] == {"x": 1}


def test_versions_increase_and_temp_dirs_are_ignored(tmp_path: Path) -> None:
    model_dir = tmp_path / "bc"
    (model_dir / ".tmp-stale").mkdir(parents=True)
    (model_dir / "notes").mkdir()
    for expected in (1, 2, 3):
        assert write_version(model_dir, {"model.onnx": b"x"}, metadata()) == expected
    assert sorted(p.name for p in model_dir.iterdir()) == [".tmp-stale", "1", "2", "3", "notes"]


def test_a_claimed_version_that_exists_is_refused(tmp_path: Path) -> None:
    write_version(tmp_path / "m", {"model.onnx": b"x"}, metadata(), version=4)
    with pytest.raises(ModelVersionError, match="version 4 .* exists"):
        write_version(tmp_path / "m", {"model.onnx": b"y"}, metadata(), version=4)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["4"]
    assert (tmp_path / "m" / "4" / "model.onnx").read_bytes() == b"x"


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    def broken(number: int) -> bytes:
        raise RuntimeError("rendering failed")

    with pytest.raises(RuntimeError):
        commit_version(tmp_path / "m", {"model.onnx": b"x"}, broken)
    assert list((tmp_path / "m").iterdir()) == []


def test_a_bad_model_name_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ModelVersionError, match="bad model name"):
        write_version(tmp_path / ".evil", {"model.onnx": b"x"}, metadata())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format="other/2"), "metadata format 'other/2' is not"),
        (lambda m: m.pop("inputs"), "metadata.json is malformed: inputs: Field required"),
        (lambda m: m["inputs"][0].update(datatype="FP8"), "malformed: inputs.0.datatype"),
        (lambda m: m["inputs"][0].update(shape=[-2, 3]), "shape must be integers >= -1"),
        (lambda m: m["reference"].update(atol=-1), "malformed: reference.atol"),
        (lambda m: m["reference"]["inputs"].pop("x"), "reference inputs lack 'x'"),
        (
            lambda m: m["reference"]["outputs"]["y"].update(shape=[7]),
            "shape [7] and 6 values disagree",
        ),
    ],
)
def test_malformed_metadata_says_what_is_wrong(edit: Any, message: str) -> None:
    raw = json.loads(metadata().to_json())
    edit(raw)
    with pytest.raises(ModelVersionError) as err:
        VersionMetadata.parse(json.dumps(raw).encode())
    assert message in str(err.value)
