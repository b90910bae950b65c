"""A user's own ONNX file: served from a bare ``model.onnx``, or imported with ``import-onnx``.

The files are built with ``onnx.helper`` as other exporters leave them (BatchNormalization
nodes kept); the truth every served output is compared with is ONNX Runtime on that file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from foldserve.model_format import VersionMetadata, sha256_hex
from foldserve.onnx_fold import derive_version
from service.models.derived import CACHE_DIR, DERIVED_FILE
from service.models.repository import ModelRepository
from service.process.runtime_dir import RuntimeDir
from tests.servers import API_KEY, live_server, server_settings, serving_options
from tests.service.models.user_onnx import (
    CLASSES,
    batchnorm_count,
    bfloat16_input,
    cnn_any_size,
    cnn_with_bn,
    custom_op,
    run_original,
    to_float16,
    write_bare,
)

KEY = {"Authorization": f"Bearer {API_KEY}"}
ATOL = 1e-4


def infer(client: Any, name: str, x: np.ndarray) -> np.ndarray:
    body = {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    r = client.post(f"/v2/models/{name}/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def batch(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)


CAP_DAC_OVERRIDE = 1  # the capability that lets root write whatever the mode bits say
BYPASS_CAPS = "-dac_override,-dac_read_search,-fowner"


def mode_bits_bind_me() -> bool:
    """False for root with CAP_DAC_OVERRIDE (root in CI): it writes through a 0o555 mode."""
    status = Path("/proc/self/status").read_text()
    effective = int(status.split("CapEff:")[1].split()[0], 16)
    return os.geteuid() != 0 or not effective >> CAP_DAC_OVERRIDE & 1


def rerun_bound_by_mode_bits(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Run this one test again in a child pytest without the capabilities that bypass mode
    bits (setpriv, util-linux), and fail unless it passed there."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root may write anywhere, and setpriv (util-linux) is missing to drop that")
    command = [setpriv, "--bounding-set", BYPASS_CAPS, "--", sys.executable, "-m", "pytest"]
    command += ["-p", "no:cacheprovider", "--basetemp", str(tmp_path / "child")]
    command += [request.node.nodeid]
    done = subprocess.run(
        command, cwd=request.config.rootpath, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:]


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` and everything under it cannot be written (mode bits: the caller checked
    that they bind this process, see :func:`mode_bits_bind_me`)."""
    dirs = [path, *(p for p in path.rglob("*") if p.is_dir())]
    for d in dirs:
        d.chmod(0o555)
    try:
        yield
    finally:
        for d in dirs:
            d.chmod(0o755)


@pytest.fixture
def user_repo(build: Any, tmp_path: Path) -> Path:
    """A repository of bare versions: a CNN with BN, a graph without BN, a broken file,
    and an exported model beside them."""
    repo = tmp_path / "models"
    write_bare(repo, "user_cnn", 1, cnn_with_bn().SerializeToString())
    write_bare(repo, "plain", 1, build.linear_model(4, 5).SerializeToString())
    write_bare(repo, "broken", 1, b"this is not an ONNX model")
    write_bare(repo, "bf16", 1, bfloat16_input().SerializeToString())
    write_bare(repo, "batch1", 1, cnn_with_bn(batch=1).SerializeToString())
    write_bare(repo, "custom", 1, custom_op().SerializeToString())
    build.write_version(repo, "linear", 1, build.linear_model(4, 5))
    return repo


def test_bare_model_onnx_serves_folded(user_repo: Path) -> None:
    original = cnn_with_bn().SerializeToString()
    with live_server(server_settings(user_repo)) as live, live.client() as client:
        meta = client.get("/v2/models/user_cnn").json()
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 8, 8]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, CLASSES]}]
        assert meta["bn_nodes"] == {"folded": 0, "unfolded": 2}
        assert meta["fold_report"] == {"folded": 2, "kept": []}
        derived = meta["derived_from"]
        assert (derived["file"], derived["sha256"]) == ("model.onnx", sha256_hex(original))
        assert derived["unchanged"] is False
        assert (derived["batchnorm_before"], derived["batchnorm_after"]) == (2, 0)
        assert 0.0 <= derived["max_abs_diff"] <= derived["tolerance"]

        x = batch(1)
        np.testing.assert_allclose(
            infer(client, "user_cnn", x), run_original(original, {"x": x})[0], atol=ATOL
        )

        # The folded twin is cached beside the user's file, keyed by its sha256.
        entry = user_repo / "user_cnn" / "1" / CACHE_DIR / sha256_hex(original)
        assert batchnorm_count(entry / DERIVED_FILE) == 0
        cached = VersionMetadata.read(entry)
        assert cached.sha256["model.onnx"] == sha256_hex(original)

        # The fold-latency report: unfolded is the user's file, folded the derived one.
        r = client.get(
            "/v2/models/user_cnn/fold-latency",
            params={"iterations": 10, "warmup": 1, "isolate": "true"},
            headers=KEY,
        )
        assert r.status_code == 200, r.text
        report = r.json()
        assert (report["folded"]["file"], report["unfolded"]["file"]) == (
            DERIVED_FILE,
            "model.onnx",
        )
        assert report["bn_nodes"] == {"folded": 0, "unfolded": 2}
        assert report["unfolded_bn_inputs"] == {"Conv": 1, "Gemm": 1}
        assert report["max_abs_diff"] < ATOL

        # Exported for batch size 1: served so (no batching), measured so, 409 otherwise.
        fixed = client.get("/v2/models/batch1").json()
        assert fixed["inputs"][0]["shape"] == [1, 3, 8, 8]
        assert fixed["bn_nodes"] == {"folded": 0, "unfolded": 2}
        x1 = batch(7, n=1)
        np.testing.assert_allclose(
            infer(client, "batch1", x1), run_original(original, {"x": x1})[0], atol=ATOL
        )
        latency = "/v2/models/batch1/fold-latency"
        params = {"iterations": 10, "warmup": 0}
        assert client.get(latency, params=params, headers=KEY).status_code == 200
        r = client.get(latency, params={**params, "batch_size": 2}, headers=KEY)
        assert r.status_code == 409
        assert "input 'x' has a fixed batch axis of 1" in r.json()["error"]

        # No BN: served as it is, and the metadata says nothing was folded.
        plain = client.get("/v2/models/plain").json()
        assert plain["derived_from"]["unchanged"] is True
        assert plain["bn_nodes"] == {"folded": 0, "unfolded": 0}
        plain_dir = user_repo / "plain" / "1"
        (plain_entry,) = [p for p in (plain_dir / CACHE_DIR).iterdir() if p.is_dir()]
        assert (plain_entry / DERIVED_FILE).read_bytes() == (plain_dir / "model.onnx").read_bytes()

        # A file that is not ONNX: that version fails to load, with the reason; no 500.
        ready = client.get("/v2/models/broken/ready")
        assert ready.status_code == 400
        assert "model.onnx is not an ONNX model" in ready.json()["reason"]
        r = client.post("/v2/models/broken/infer", json={"inputs": []})
        assert r.status_code == 400 and "not an ONNX model" in r.json()["error"]
        custom = client.get("/v2/models/custom/ready").json()["reason"]
        assert custom.startswith("version 1: model.onnx: the folded graph failed its check: ")
        assert "com.example:Frobnicate" in custom
        bf16 = client.get("/v2/models/bf16/ready").json()["reason"]
        assert "input 'x' has element type BFLOAT16, which the V2 protocol cannot carry" in bf16
        states = {e["name"]: e["state"] for e in client.get("/v2/repository/index").json()}
        assert states == {
            "bf16": "UNAVAILABLE",
            "batch1": "READY",
            "broken": "UNAVAILABLE",
            "custom": "UNAVAILABLE",
            "linear": "READY",
            "plain": "READY",
            "user_cnn": "READY",
        }
        # An exported model beside them is not one: no derived_from.
        assert client.get("/v2/models/linear").json()["derived_from"] is None


def test_float16_file_serves_with_float16_specs(tmp_path: Path) -> None:
    data = to_float16(cnn_with_bn()).SerializeToString()
    write_bare(tmp_path / "models", "half", 1, data)
    repository = ModelRepository(
        tmp_path / "models", serving_options(), RuntimeDir(tmp_path / "runtime")
    )
    repository.load_all()
    model = repository.get("half")
    meta = model.metadata
    assert [(s.name, s.datatype, s.shape) for s in meta.inputs] == [("x", "FP16", (-1, 3, 8, 8))]
    assert [(s.datatype, s.shape) for s in meta.outputs] == [("FP16", (-1, CLASSES))]
    assert meta.bn_nodes == {"folded": 0, "unfolded": 2}
    assert meta.parity is not None and meta.parity.max_abs_diff <= meta.parity.atol <= 2e-2
    x = batch(8).astype(np.float16)
    got = model.run({"x": x})["logits"]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, run_original(data, {"x": x})[0], atol=meta.parity.atol)
    model.close()


def test_symbolic_height_and_width_take_a_size_the_file_runs_with() -> None:
    data = cnn_any_size().SerializeToString()
    meta = derive_version(data, "any_size").metadata
    assert [s.shape for s in meta.inputs] == [(-1, 3, -1, -1)]
    x = meta.reference.inputs["x"].array()
    assert x.shape == (4, 3, 32, 32)  # 8x8 cannot pass a 16x16 pool; 32x32 is the next size
    np.testing.assert_array_equal(
        meta.reference.outputs["y"].array(), run_original(data, {"x": x})[0]
    )
    assert meta.bn_nodes == {"folded": 0, "unfolded": 1}


def test_cache_is_reused_and_a_replaced_file_is_derived_again(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    version_dir = write_bare(repo, "user_cnn", 1, cnn_with_bn(0).SerializeToString())
    first = ModelRepository(repo, serving_options(), RuntimeDir(tmp_path / "runtime"))
    first.load_all()
    (entry,) = [p for p in (version_dir / CACHE_DIR).iterdir() if p.is_dir()]
    stamp = (entry / DERIVED_FILE).stat().st_mtime_ns, (entry / "metadata.json").stat().st_ino

    # A second server (or a rescan) reads the cache: nothing is derived or written again.
    second = ModelRepository(repo, serving_options(), RuntimeDir(tmp_path / "runtime"))
    second.load_all()
    again = (entry / DERIVED_FILE).stat().st_mtime_ns, (entry / "metadata.json").stat().st_ino
    assert again == stamp
    served = second.get("user_cnn")
    second.refresh()
    assert second.get("user_cnn") is served  # the cache beside the file changes no fingerprint

    # The user replaces model.onnx: a new sha256, derived again; the stale entry goes.
    replaced = cnn_with_bn(1).SerializeToString()
    (version_dir / "model.onnx").write_bytes(replaced)
    second.refresh()
    entries = sorted(p.name for p in (version_dir / CACHE_DIR).iterdir() if p.is_dir())
    assert entries == [sha256_hex(replaced)]
    x = batch(2)
    got = second.get("user_cnn").run({"x": x})["logits"]
    np.testing.assert_allclose(got, run_original(replaced, {"x": x})[0], atol=ATOL)
    for r in (first, second):
        for e in r.entries():
            for s in e.versions.values():
                if s.model is not None:
                    s.model.close()


def test_read_only_repository_caches_in_the_runtime_directory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if not mode_bits_bind_me():  # root in CI: the same test, without root's bypass
        rerun_bound_by_mode_bits(request, tmp_path)
        return
    repo = tmp_path / "models"
    data = cnn_with_bn().SerializeToString()
    version_dir = write_bare(repo, "user_cnn", 1, data)
    runtime = tmp_path / "runtime"
    with read_only(repo):
        with pytest.raises(PermissionError):  # it really is read-only, for this process too
            (version_dir / "probe").write_bytes(b"")
        repository = ModelRepository(repo, serving_options(), RuntimeDir(runtime))
        repository.load_all()
        model = repository.get("user_cnn")
        assert not (version_dir / CACHE_DIR).exists()
        entry = runtime / "derived" / sha256_hex(data)  # the documented layout
        assert model.folded_dir == entry
        assert batchnorm_count(entry / DERIVED_FILE) == 0
        x = batch(3)
        np.testing.assert_allclose(
            model.run({"x": x})["logits"], run_original(data, {"x": x})[0], atol=ATOL
        )
        model.close()
        # Without a runtime directory there is nowhere to cache: a load failure that says so.
        bare = ModelRepository(repo, serving_options())
        bare.load_all()
        (status,) = bare.entry("user_cnn").versions.values()
        assert status.state == "UNAVAILABLE"
        assert "its folded variant cannot be cached: " in status.reason
        assert status.reason.endswith("; the server has no runtime directory")


def test_workers_derive_once_and_serve_alike(tmp_path: Path, serve_process: Any) -> None:
    repo = tmp_path / "models"
    data, second = cnn_with_bn(0).SerializeToString(), cnn_with_bn(1).SerializeToString()
    version_dir = write_bare(repo, "user_cnn", 1, data)
    x = batch(4)
    expected = run_original(data, {"x": x})[0]
    with serve_process(repo, 2, "--log-level", "info") as server:
        client = server.client
        for _ in range(12):  # new connection each: every worker answers some
            meta = client.get("/v2/models/user_cnn").json()
            assert meta["derived_from"]["sha256"] == sha256_hex(data)
            np.testing.assert_allclose(infer(client, "user_cnn", x), expected, atol=ATOL)
        # A second user file dropped in while serving: every worker loads it.
        write_bare(repo, "user_cnn", 2, second)
        r = client.post("/v2/repository/models/user_cnn/load", headers=KEY)
        assert r.status_code == 200, r.text
        assert r.json()["workers"] == 2
        assert [v["state"] for v in r.json()["versions"]] == ["READY", "READY"]
        for _ in range(12):
            got = infer(client, "user_cnn", x)
            np.testing.assert_allclose(got, run_original(second, {"x": x})[0], atol=ATOL)
        port = server.url.rsplit(":", 1)[1]
        log = (repo.parent / f"server-{port}.log").read_text()
    # The lock made one worker derive each; the other read its entry. No temporary is left.
    assert log.count("derived the folded variant") == 2, log
    names = sorted(p.name for p in (version_dir / CACHE_DIR).iterdir())
    assert names == [sha256_hex(data), f"{sha256_hex(data)}.lock"]
    assert batchnorm_count(version_dir / CACHE_DIR / sha256_hex(data) / DERIVED_FILE) == 0


def test_import_onnx_writes_a_version_that_serves(tmp_path: Path) -> None:
    from training.__main__ import app

    data = cnn_with_bn(5).SerializeToString()
    user_file = tmp_path / "resnet_from_keras.onnx"
    user_file.write_bytes(data)
    repo = tmp_path / "models"
    args = ["import-onnx", str(user_file), "--repository", str(repo), "--name", "imported"]
    result = CliRunner().invoke(app, [*args, "--version", "3"])
    assert result.exit_code == 0, result.output
    assert "BN nodes 2 -> 0" in result.output

    version_dir = repo / "imported" / "3"
    meta = VersionMetadata.read(version_dir)
    assert (version_dir / "model.unfolded.onnx").read_bytes() == data
    assert batchnorm_count(version_dir / "model.onnx") == 0
    assert meta.bn_nodes == {"folded": 0, "unfolded": 2}
    assert meta.sha256 == {
        "model.onnx": sha256_hex((version_dir / "model.onnx").read_bytes()),
        "model.unfolded.onnx": sha256_hex(data),
    }
    assert [f.bn for f in meta.fold_report.folded] == ["bn1", "bn2"]
    assert meta.parity is not None and meta.parity.max_abs_diff <= meta.parity.atol
    assert (meta.model_extra or {})["derived_from"]["file"] == "resnet_from_keras.onnx"
    # The reference batch: random inputs of the declared shapes, the user's file's outputs.
    ref_x = meta.reference.inputs["x"].array()
    assert ref_x.shape[1:] == (3, 8, 8)
    np.testing.assert_array_equal(
        meta.reference.outputs["logits"].array(), run_original(data, {"x": ref_x})[0]
    )

    # Taken again: the next number; a broken file: exit 2, a reason, nothing written.
    assert CliRunner().invoke(app, args).exit_code == 0
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00garbage")
    failed = CliRunner().invoke(
        app, ["import-onnx", str(broken), "--repository", str(repo), "--name", "imported"]
    )
    assert failed.exit_code == 2 and "not an ONNX model" in failed.output
    assert sorted(p.name for p in (repo / "imported").iterdir()) == ["3", "4"]

    with live_server(server_settings(repo)) as live, live.client() as client:
        assert client.get("/v2/models/imported").json()["versions"] == ["3", "4"]
        x = batch(6)
        np.testing.assert_allclose(
            infer(client, "imported", x), run_original(data, {"x": x})[0], atol=ATOL
        )
        info = json.loads((version_dir / "metadata.json").read_text())
        assert info["derived_from"]["sha256"] == sha256_hex(data)
