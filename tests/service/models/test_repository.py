"""ModelRepository and the runtime on hand-built ONNX models: validation, versions, providers."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import shutil
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from foldserve.model_format import ModelVersionError
from service.errors import ModelNotFound, ModelNotReady, ModelUnavailable
from service.models.repository import ModelRepository
from service.models.sessions import CPU
from tests.polling import poll
from tests.servers import serving_options


def repository(root: Path, io_binding: str = "off", providers: str = "cpu") -> ModelRepository:
    repo = ModelRepository(root, serving_options(providers=providers, io_binding=io_binding))
    repo.load_all()
    return repo


def states(repo: ModelRepository, name: str) -> dict[int, tuple[str, str]]:
    return {v: (s.state, s.reason) for v, s in repo.entry(name).versions.items()}


def _break_sha(meta: dict[str, Any]) -> None:
    meta["sha256"]["model.onnx"] = "0" * 64


def _break_reference(meta: dict[str, Any]) -> None:
    data = meta["reference"]["outputs"]["scores"]["data"]
    data[0] += 0.5


def _break_format(meta: dict[str, Any]) -> None:
    meta["format"] = "other/2"


def _break_input_name(meta: dict[str, Any]) -> None:
    meta["inputs"][0]["name"] = "pixels"
    meta["reference"]["inputs"]["pixels"] = meta["reference"]["inputs"].pop("x")


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_break_sha, "sha256 of model.onnx is"),
        (_break_reference, "reference batch: output 'scores' differs from metadata by 0.5"),
        (_break_format, "metadata format 'other/2' is not 'foldserve-model/1'"),
        (_break_input_name, "metadata input 'pixels' is not in model.onnx"),
    ],
)
def test_failing_version_is_skipped_with_its_reason(
    build: Any, tmp_path: Path, edit: Any, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    build.write_version(tmp_path, "m", 1, build.linear_model(4, 3))
    build.write_version(tmp_path, "m", 2, build.linear_model(4, 3, seed=1), edit=edit)
    with caplog.at_level(logging.WARNING, logger="service.models.repository"):
        repo = repository(tmp_path)
    assert states(repo, "m")[1] == ("READY", "")
    state, why = states(repo, "m")[2]
    assert state == "UNAVAILABLE" and reason in why
    assert repo.get("m").version == 1  # the highest *complete* version serves
    assert any(reason in r.getMessage() for r in caplog.records)
    with pytest.raises(ModelUnavailable, match=f"version 2 is not ready: {reason}"):
        repo.get("m", "2")


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: (d / "metadata.json").unlink(), "metadata.json is missing"),
        (lambda d: (d / "metadata.json").write_text("{oops"), "metadata.json is unreadable"),
        (lambda d: (d / "metadata.json").write_text("[]"), "metadata.json is not a JSON object"),
        (lambda d: (d / "model.onnx").unlink(), "model.onnx is missing"),
    ],
)
def test_broken_files_never_crash_the_scan(
    build: Any, tmp_path: Path, mutate: Any, reason: str
) -> None:
    version_dir = build.write_version(tmp_path, "m", 1, build.linear_model(4, 3))
    mutate(version_dir)
    repo = repository(tmp_path)
    assert repo.ready
    [(version, (state, why))] = states(repo, "m").items()
    assert (version, state) == (1, "UNAVAILABLE") and why.startswith(reason)
    with pytest.raises(ModelUnavailable, match="has no ready version: version 1: " + reason):
        repo.get("m")


def test_corrupt_onnx_with_matching_sha_is_an_onnxruntime_reason(
    build: Any, tmp_path: Path
) -> None:
    def garbage(meta: dict[str, Any]) -> None:
        meta["sha256"]["model.onnx"] = hashlib.sha256(b"not onnx").hexdigest()

    version_dir = build.write_version(tmp_path, "m", 1, build.linear_model(4, 3), edit=garbage)
    (version_dir / "model.onnx").write_bytes(b"not onnx")
    state, reason = states(repository(tmp_path), "m")[1]
    assert state == "UNAVAILABLE" and reason.startswith("onnxruntime: ")


def test_only_positive_integer_directories_are_versions(build: Any, tmp_path: Path) -> None:
    build.write_version(tmp_path, "m", 1, build.linear_model(4, 3))
    for name in (".tmp-2", "latest", "0", "01", "-3"):
        (tmp_path / "m" / name).mkdir()
    (tmp_path / "m" / "7").write_text("a file, not a directory")
    (tmp_path / ".hidden").mkdir()
    repo = repository(tmp_path)
    assert [e.name for e in repo.entries()] == ["m"]
    assert list(repo.entry("m").versions) == [1]


def test_versions_are_addressable_and_unknown_ones_are_404(build: Any, tmp_path: Path) -> None:
    for v in (1, 2, 3):
        build.write_version(tmp_path, "m", v, build.linear_model(4, 3, seed=v))
    repo = repository(tmp_path)
    assert repo.get("m").version == 3
    assert [repo.get("m", str(v)).version for v in (1, 2, 3)] == [1, 2, 3]
    for bad in ("4", "abc", "01", "-1"):
        with pytest.raises(
            ModelNotFound, match=f"unknown version '{bad}' of model 'm'; versions: 1, 2, 3"
        ):
            repo.get("m", bad)
    with pytest.raises(ModelNotFound, match="unknown model 'n'; models: m"):
        repo.get("n")


def test_latest_policy_skips_a_failing_newest_version(build: Any, tmp_path: Path) -> None:
    for v in (1, 2):
        build.write_version(tmp_path, "m", v, build.linear_model(4, 3, seed=v))
    build.write_version(tmp_path, "m", 3, build.linear_model(4, 3), edit=_break_sha)
    policy = {"version_policy": {"latest": {"num_versions": 1}}}
    (tmp_path / "m" / "config.json").write_text(json.dumps(policy))
    found = states(repository(tmp_path), "m")
    assert found[3][0] == "UNAVAILABLE" and "sha256" in found[3][1]
    assert found[2] == ("READY", "")
    assert found[1] == ("UNAVAILABLE", "not selected by version policy latest 1")


def test_rescan_loads_new_versions_and_reuses_unchanged_ones(build: Any, tmp_path: Path) -> None:
    build.write_version(tmp_path, "m", 1, build.linear_model(4, 3))
    repo = repository(tmp_path)
    first = repo.get("m")
    build.write_version(tmp_path, "m", 2, build.linear_model(4, 3, seed=2))
    repo.refresh()
    assert repo.get("m").version == 2
    assert repo.get("m", "1") is first  # not re-validated, not reloaded
    build.write_version(tmp_path, "m", 3, build.linear_model(4, 3), edit=_break_sha)
    entry = repo.load("m")
    assert entry.default() is not None and entry.default().version == 2  # type: ignore[union-attr]
    assert repo.get("m").version == 2


def test_unload_then_load(build: Any, tmp_path: Path) -> None:
    build.write_version(tmp_path, "m", 1, build.linear_model(4, 3))
    repo = repository(tmp_path)
    repo.unload("m")
    assert states(repo, "m") == {1: ("UNAVAILABLE", "unloaded")}
    with pytest.raises(ModelUnavailable, match="model 'm' has no ready version: unloaded"):
        repo.get("m")
    repo.refresh()  # polling does not bring back what was explicitly unloaded
    assert repo.entry("m").default() is None
    repo.load("m")
    assert repo.get("m").version == 1


@pytest.mark.parametrize("name", ["..", ".", "missing", ".tmp-1", "a/b"])
def test_load_of_anything_but_a_model_directory_is_404(
    build: Any, tmp_path: Path, name: str
) -> None:
    build.write_version(tmp_path / "models", "m", 1, build.linear_model(4, 3))
    repo = repository(tmp_path / "models")
    with pytest.raises(ModelNotFound):
        repo.load(name)


def test_not_ready_before_the_first_scan(build: Any, tmp_path: Path) -> None:
    build.write_version(tmp_path, "m", 1, build.linear_model(4, 3))
    repo = ModelRepository(tmp_path, serving_options())
    assert not repo.ready
    with pytest.raises(ModelNotReady, match="still loading"):
        repo.get("m")


def test_io_binding_path_gives_the_same_outputs(build: Any, tmp_path: Path) -> None:
    model = build.linear_model(16, 7)
    build.write_version(tmp_path, "m", 1, model)
    bound = repository(tmp_path, io_binding="on").get("m")
    plain = repository(tmp_path, io_binding="off").get("m")
    assert bound.io_binding and not plain.io_binding
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    direct = ort.InferenceSession(model.SerializeToString(), providers=[CPU]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(bound.run({"x": x})["scores"], plain.run({"x": x})["scores"])
    np.testing.assert_allclose(bound.run({"x": x})["scores"], direct, atol=1e-6)


def test_cuda_requested_without_a_gpu_falls_back_and_says_so(
    build: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build.write_version(tmp_path, "m", 1, build.linear_model(4, 3))
    with caplog.at_level(logging.INFO, logger="service"):
        model = repository(tmp_path, providers="cuda").get("m")
    if "CUDAExecutionProvider" in model.session().get_providers():
        pytest.skip("a working CUDA device is present")
    assert model.provider == CPU
    assert any(r.levelno == logging.WARNING and "cuda" in r.getMessage() for r in caplog.records)
    assert any("provider CPUExecutionProvider" in r.getMessage() for r in caplog.records)


def test_unfolded_session_is_lazy_and_verified(build: Any, tmp_path: Path) -> None:
    version_dir = build.write_version(tmp_path, "m", 1, build.linear_model(4, 3))
    model = repository(tmp_path).get("m")
    assert ("unfolded", True) not in model._sessions
    session = model.session("unfolded")
    assert model.session("unfolded") is session  # created once
    assert session.get_providers()[0] == model.provider
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(
        session.run(None, {"x": x})[0], model.run({"x": x})["scores"], atol=1e-6
    )
    (version_dir / "model.unfolded.onnx").write_bytes(b"changed")
    with pytest.raises(ModelVersionError, match="sha256 of model.unfolded.onnx"):
        model.session("unfolded", optimized=False)


def test_io_binding_failure_falls_back_to_plain_runs(
    build: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build.write_version(tmp_path, "m", 1, build.linear_model(4, 3))
    model = repository(tmp_path, io_binding="on").get("m")
    x = np.ones((2, 4), np.float32)
    expected = model.run({"x": x})["scores"]

    def broken(*_: Any) -> None:
        raise RuntimeError("no such device")

    monkeypatch.setattr(model, "_run_bound", broken)
    np.testing.assert_array_equal(model.run({"x": x})["scores"], expected)
    assert not model.io_binding


def test_a_vanished_repository_keeps_serving_but_a_removed_model_stops(
    build: Any, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    for name in ("m", "n"):
        build.write_version(root, name, 1, build.linear_model(4, 3))
    repo = repository(root)
    root.rename(tmp_path / "elsewhere")  # the whole volume gone for a moment
    repo.refresh()
    assert [e.name for e in repo.entries()] == ["m", "n"] and repo.get("m").version == 1
    (tmp_path / "elsewhere").rename(root)
    shutil.rmtree(root / "n")  # one model deleted on purpose
    repo.refresh()
    assert [e.name for e in repo.entries()] == ["m"]
    with pytest.raises(ModelNotFound):
        repo.get("n")


def test_missing_repository_is_ready_and_empty(tmp_path: Path) -> None:
    repo = repository(tmp_path / "nothing-here")
    assert repo.ready and repo.entries() == []


def _infer_once(model: Any) -> dict[str, np.ndarray]:
    x = {"x": np.ones((1, 4), np.float32)}
    return asyncio.run(model.batcher.run(x, ["scores"]))


def test_a_version_that_leaves_service_is_closed(build: Any, tmp_path: Path) -> None:
    version_dir = build.write_version(tmp_path, "m", 1, build.linear_model(4, 3))
    repo = repository(tmp_path)
    first = repo.get("m")
    assert _infer_once(first)["scores"].shape == (1, 3)
    repo.unload("m")
    with pytest.raises(ModelNotReady, match="model 'm' version 1 was unloaded or replaced"):
        _infer_once(first)
    second = repo.load("m").default()
    assert second is not None and second.model is not None  # (for the type checker)
    assert second.model is not first and second.model.version == 1
    assert _infer_once(second.model)["scores"].shape == (1, 3)
    # New files under the same version number: a new served version, the old one closed.
    shutil.rmtree(version_dir)
    build.write_version(tmp_path, "m", 1, build.linear_model(4, 3, seed=5))
    repo.refresh()
    third = repo.get("m")
    assert third is not second.model
    with pytest.raises(ModelNotReady, match="unloaded or replaced"):
        _infer_once(second.model)
    expected = build.linear_model(4, 3, seed=5)
    direct = ort.InferenceSession(expected.SerializeToString(), providers=[CPU])
    np.testing.assert_allclose(
        _infer_once(third)["scores"],
        direct.run(None, {"x": np.ones((1, 4), np.float32)})[0],
        atol=1e-6,
    )


@pytest.mark.parametrize("served", [False, True], ids=["idle", "after-requests"])
@pytest.mark.parametrize("leave", ["unload", "new files"])
def test_a_version_that_leaves_service_is_freed_at_once(
    build: Any, tmp_path: Path, leave: str, served: bool
) -> None:
    """Its sessions go when its last reference does, not at the next cyclic collection
    (which never came for long: worker RSS grew 80% over 100 unload/load cycles)."""
    version_dir = build.write_version(tmp_path, "m", 1, build.linear_model(4, 3))
    repo = repository(tmp_path)
    model = repo.get("m")
    if served:
        assert _infer_once(model)["scores"].shape == (1, 3)
    gone = weakref.ref(model)
    del model
    gc.collect()
    gc.disable()  # only reference counting may free it now
    try:
        if leave == "unload":
            repo.unload("m")
        else:
            shutil.rmtree(version_dir)
            build.write_version(tmp_path, "m", 1, build.linear_model(4, 3, seed=5))
            repo.refresh()
            assert repo.get("m").version == 1
        # The model's thread drops its last work item (which holds the version) just after
        # it hands the result over: poll for that, with the collector still off.
        poll(lambda: gone() is None, limit=10)
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("config", "sizes"),
    [
        ({}, [1, 2, 4, 8, 16, 32]),  # the server's max_batch_size, 32
        ({"max_batch_size": 6}, [1, 2, 4, 6]),
        ({"max_batch_size": 1}, [1]),
        ({"dynamic_batching": False}, []),  # the reference batch was its run
    ],
)
def test_a_version_is_warmed_at_every_batch_size_before_it_serves(
    build: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    config: dict[str, Any],
    sizes: list[int],
) -> None:
    """Each size the batcher may form runs twice, on the reference rows repeated, before
    the version is published; nothing is published before its warm-up ends."""
    from service.models.served_version import ServedVersion

    build.write_version(tmp_path, "linear", 1, build.linear_model(4, 3))
    (tmp_path / "linear" / "config.json").write_text(json.dumps(config))
    runs: list[tuple[int, bool, str]] = []  # (rows, was the model published then, thread)
    repo = ModelRepository(tmp_path, serving_options())
    original = ServedVersion.run

    def recording(self: ServedVersion, feeds: Any, names: Any = None) -> Any:
        published = "linear" in {e.name for e in repo.entries()}
        runs.append((len(feeds["x"]), published, threading.current_thread().name))
        return original(self, feeds, names)

    monkeypatch.setattr(ServedVersion, "run", recording)
    repo.load_all()
    reference_rows = runs[0][0]
    assert [rows for rows, _, _ in runs[1:]] == [n for n in sizes for _ in range(2)]
    assert not any(published for _, published, _ in runs), runs
    assert reference_rows >= 1 and repo.get("linear").version == 1
    # In the batcher's own ONNX Runtime thread, which so starts before the first request.
    assert all(thread.startswith("foldserve-ort") for _, _, thread in runs[1:]), runs
