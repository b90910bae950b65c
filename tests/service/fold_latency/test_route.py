"""GET /v2/models/{name}/fold-latency: the report's values, bounds, auth, cache, one at a time."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest

from tests.polling import poll

KEY = {"X-API-Key": "test-key"}
MLP, CNN = "breast_cancer_mlp", "digits_cnn"


def url(name: str) -> str:
    return f"/v2/models/{name}/fold-latency"


def count_batchnorm(path: Path) -> int:
    return sum(node.op_type == "BatchNormalization" for node in onnx.load(path).graph.node)


def same_file_version(model_dir: Path, source: int, target: int) -> None:
    """A version whose model.unfolded.onnx is a copy of model.onnx (sha256 updated)."""
    tmp = model_dir / f".tmp-{target}"
    shutil.copytree(model_dir / str(source), tmp)
    shutil.copyfile(tmp / "model.onnx", tmp / "model.unfolded.onnx")
    meta = json.loads((tmp / "metadata.json").read_text())
    digest = hashlib.sha256((tmp / "model.onnx").read_bytes()).hexdigest()
    meta["sha256"]["model.unfolded.onnx"] = digest
    meta["version"] = target
    (tmp / "metadata.json").write_text(json.dumps(meta))
    tmp.rename(model_dir / str(target))


def mlp_infer_body(batch: int = 2) -> dict[str, Any]:
    x = np.random.default_rng(0).normal(size=(batch, 30)).astype(np.float32)
    return {
        "inputs": [
            {"name": "input", "shape": [batch, 30], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }


# -- the report ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "bn_after", "isolate"),
    [(MLP, "Gemm", False), (MLP, "Gemm", True), (CNN, "Conv", False), (CNN, "Conv", True)],
)
def test_report_values(
    client: httpx.Client, server: Any, name: str, bn_after: str, isolate: bool
) -> None:
    params: dict[str, str | int] = {
        "batch_size": 4,
        "iterations": 100,
        "warmup": 5,
        "samples": "true",
    }
    response = client.get(
        url(name), params={**params, "isolate": str(isolate).lower()}, headers=KEY
    )
    assert response.status_code == 200, response.text
    r = response.json()
    version_dir = server.repository / name / "1"
    metadata = json.loads((version_dir / "metadata.json").read_text())

    assert (r["model_name"], r["model_version"], r["cached"]) == (name, "1", False)
    assert (r["batch_size"], r["iterations"], r["iterations_completed"], r["warmup"]) == (
        4,
        100,
        100,
        5,
    )
    assert r["time_limited"] is False
    assert r["isolate"] is isolate
    assert r["case"] == ("isolated" if isolate else "ort_default")
    assert r["graph_optimization_level"] == ("ORT_DISABLE_ALL" if isolate else "ORT_ENABLE_ALL")
    assert (r["provider"], r["providers"], r["threads"]) == (
        "CPUExecutionProvider",
        ["CPUExecutionProvider"],
        1,
    )
    assert r["machine"]["cpu_count"] == os.cpu_count() and r["machine"]["gpu"] is None
    datetime.fromisoformat(r["measured_at"])

    # BN nodes are counted in the files themselves; they agree with the export's metadata.
    unfolded_bn = count_batchnorm(version_dir / "model.unfolded.onnx")
    assert unfolded_bn > 0
    assert r["bn_nodes"] == {"folded": 0, "unfolded": unfolded_bn} == metadata["bn_nodes"]
    assert (r["folded"]["bn_nodes"], r["unfolded"]["bn_nodes"]) == (0, unfolded_bn)
    assert r["unfolded_bn_inputs"] == {bn_after: unfolded_bn}
    # ORT folds BN after Conv by itself, never after Gemm; with isolate there is no ORT pass.
    expected_after_ort = None if isolate else (0 if bn_after == "Conv" else unfolded_bn)
    assert r["unfolded_bn_nodes_after_ort"] == expected_after_ort
    assert ("disabled" in r["case_description"]) is isolate
    assert 0.0 <= r["max_abs_diff"] < 1e-4

    samples = {v: np.array(r["samples_ms"][v]) for v in ("folded", "unfolded")}
    for variant, ms in samples.items():
        s = r[variant]
        assert ms.shape == (100,) and (ms > 0).all()
        assert s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"]
        assert s["p50_ms"] == pytest.approx(np.median(ms), abs=1e-5)
        assert s["mean_ms"] == pytest.approx(ms.mean(), abs=1e-5)
        # From the median, like the speedup: one slow run must not reorder the variants.
        assert s["samples_per_s"] == pytest.approx(4 * 1e3 / s["p50_ms"], rel=1e-9)
    speedup = r["speedup"]
    assert speedup["ratio"] == pytest.approx(r["unfolded"]["p50_ms"] / r["folded"]["p50_ms"])
    assert speedup["ci95"][0] <= speedup["ratio"] <= speedup["ci95"][1]
    assert f"{speedup['ratio']:.2f}x" in r["verdict"]
    # The bound: BN kernels' share of the unfolded model's time. With ORT's optimizations on,
    # a CNN's BN nodes are fused into their Convs: nothing left for folding to remove.
    bound = r["bound"]
    if bn_after == "Conv" and not isolate:
        assert bound["bn_share"] == 0.0 and bound["max_speedup"] == 1.0
    else:
        assert 0.0 < bound["bn_share"] < 1.0
        assert bound["max_speedup"] == pytest.approx(1 / (1 - bound["bn_share"]))
    assert f"{bound['max_speedup']:.3f}x" in bound["description"]
    assert r["int8"] is None and r["int8_speedup"] is None and "int8" not in r["samples_ms"]


def test_int8_is_timed_with_the_other_two(client: httpx.Client, server: Any) -> None:
    params: dict[str, str | int] = {"batch_size": 4, "iterations": 60, "warmup": 5}
    params |= {"samples": "true", "int8": "true"}
    response = client.get(url(CNN), params=params, headers=KEY)
    assert response.status_code == 200, response.text
    r = response.json()
    assert r["int8"].keys() == r["folded"].keys()
    assert r["int8"]["file"] == "model.int8.onnx" and r["int8"]["bn_nodes"] == 0
    ms = np.array(r["samples_ms"]["int8"])
    assert ms.shape == (60,) and len(r["samples_ms"]["folded"]) == 60
    assert r["int8"]["p50_ms"] == pytest.approx(np.median(ms), abs=1e-5)
    ratio = r["int8_speedup"]["ratio"]
    assert ratio == pytest.approx(r["folded"]["p50_ms"] / r["int8"]["p50_ms"])
    assert r["int8_speedup"]["ci95"][0] <= ratio <= r["int8_speedup"]["ci95"][1]
    assert f"{ratio:.2f}x" in r["int8_verdict"]
    assert 0.0 < r["int8_max_abs_diff"] < 100.0  # quantized: close to FP32, not equal
    # A version without model.int8.onnx cannot be measured with it: 409, named.
    missing = client.get(url(MLP), params={"int8": "true", "iterations": 10}, headers=KEY)
    assert missing.status_code == 409
    assert "no model.int8.onnx" in missing.json()["error"]


@pytest.mark.parametrize(
    ("param", "value", "bound"),
    [
        ("batch_size", 0, "greater than or equal to 1"),
        ("batch_size", 257, "less than or equal to 256"),
        ("iterations", 9, "greater than or equal to 10"),
        ("iterations", 10_001, "less than or equal to 10000"),
        ("warmup", -1, "greater than or equal to 0"),
        ("warmup", 1_001, "less than or equal to 1000"),
    ],
)
def test_parameters_out_of_bounds_are_422(
    client: httpx.Client, param: str, value: int, bound: str
) -> None:
    response = client.get(url(MLP), params={param: value}, headers=KEY)
    assert response.status_code == 422
    error = response.json()["error"]
    assert f"query.{param}" in error and bound in error


def test_api_key_is_required_when_set(client: httpx.Client) -> None:
    missing = client.get(url(MLP), params={"cached": "true"})
    assert missing.status_code == 401
    assert "API key" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = client.get(url(MLP), params={"iterations": 10}, headers={"X-API-Key": "nope"})
    assert (wrong.status_code, wrong.json()) == (401, {"error": "the API key is wrong"})
    bearer = client.get(
        url("linear"), params={"iterations": 10}, headers={"Authorization": "Bearer test-key"}
    )
    assert bearer.status_code == 200, bearer.text


def test_unknown_model_version_and_missing_report_are_404(client: httpx.Client) -> None:
    unknown = client.get(url("nope"), headers=KEY)
    assert unknown.status_code == 404 and "unknown model 'nope'" in unknown.json()["error"]
    cached_unknown = client.get(url("nope"), params={"cached": "true"}, headers=KEY)
    assert cached_unknown.status_code == 404 and "nope" in cached_unknown.json()["error"]
    version = client.get(url(MLP), params={"version": "7"}, headers=KEY)
    assert version.status_code == 404 and "unknown version '7'" in version.json()["error"]
    # two_io is never measured in this session: no report to return yet.
    none_yet = client.get(url("two_io"), params={"cached": "true"}, headers=KEY)
    assert none_yet.status_code == 404
    assert none_yet.json()["error"].startswith("no fold-latency report for model 'two_io' yet")


def test_cached_returns_the_last_report(client: httpx.Client) -> None:
    first = client.get(url("linear"), params={"iterations": 50}, headers=KEY).json()
    cached = client.get(url("linear"), params={"cached": "true"}, headers=KEY).json()
    assert cached["cached"] is True and cached["samples_ms"] is None
    assert {k: v for k, v in cached.items() if k != "cached"} == {
        k: v for k, v in first.items() if k != "cached"
    }
    for key in ("measured_at", "speedup", "folded", "unfolded", "iterations", "isolate"):
        assert cached[key] == first[key]
    with_samples = client.get(
        url("linear"), params={"cached": "true", "samples": "true"}, headers=KEY
    ).json()
    assert [len(with_samples["samples_ms"][v]) for v in ("folded", "unfolded")] == [50, 50]

    second = client.get(url("linear"), params={"iterations": 20, "isolate": "true"}, headers=KEY)
    assert second.status_code == 200
    latest = client.get(url("linear"), params={"cached": "true"}, headers=KEY).json()
    assert (latest["iterations"], latest["isolate"]) == (20, True)
    assert latest["speedup"] == second.json()["speedup"]


# -- servers of their own --------------------------------------------------------


def test_same_file_as_both_variants_gives_no_speedup(
    fresh_server: Any, model_store: Any, build: Any, tmp_path: Path
) -> None:
    repo = model_store.copy_to(tmp_path / "repo")
    same_file_version(repo / MLP, 1, 2)
    build.write_version(  # an unfolded file that no longer matches its sha256
        repo,
        "linear",
        2,
        build.linear_model(4, 5),
        edit=lambda meta: meta["sha256"].update({"model.unfolded.onnx": "0" * 64}),
    )
    with fresh_server(repo) as live, live.client() as client:
        params = {"version": "2", "batch_size": 32, "iterations": 400, "samples": "true"}
        r = client.get(url(MLP), params=params, headers=KEY).json()
        assert r["model_version"] == "2"
        assert r["bn_nodes"] == {"folded": 0, "unfolded": 0}
        assert r["max_abs_diff"] == 0.0  # the same graph: bit-identical outputs
        assert r["unfolded_bn_inputs"] == {} and r["unfolded_bn_nodes_after_ort"] == 0
        folded, unfolded = (np.array(r["samples_ms"][v]) for v in ("folded", "unfolded"))
        assert folded.shape == unfolded.shape == (400,)
        assert r["folded"]["p50_ms"] == pytest.approx(np.median(folded), abs=1e-5)
        assert r["unfolded"]["p50_ms"] == pytest.approx(np.median(unfolded), abs=1e-5)
        ratio = r["unfolded"]["p50_ms"] / r["folded"]["p50_ms"]
        assert r["speedup"]["ratio"] == pytest.approx(ratio, rel=1e-9)

        broken = client.get(url("linear"), params={"iterations": 10}, headers=KEY)
        assert broken.status_code == 409
        assert "version 2 cannot be measured" in broken.json()["error"]
        assert "sha256 of model.unfolded.onnx" in broken.json()["error"]


def test_one_measurement_at_a_time_and_serving_goes_on(fresh_server: Any, tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    with (
        fresh_server(fold_latency_max_seconds=2.0, runtime_dir=runtime) as live,
        live.client() as client,
    ):
        long: dict[str, httpx.Response] = {}

        def measure_long() -> None:  # far more runs than 2 s allow: stopped by the time limit
            with live.client() as c:
                params = {"batch_size": 256, "iterations": 10_000}
                long["response"] = c.get(url(CNN), params=params, headers=KEY)

        worker = threading.Thread(target=measure_long)
        worker.start()
        # The measurement writes its progress once it holds the server-wide lock.
        poll(lambda: (runtime / "fold-latency.progress.json").exists())
        busy = client.get(url(MLP), params={"iterations": 10}, headers=KEY)
        assert busy.status_code == 429
        assert "already running" in busy.json()["error"]
        assert 1 <= int(busy.headers["retry-after"]) <= 2

        served = client.post(f"/v2/models/{MLP}/infer", json=mlp_infer_body())
        assert served.status_code == 200, served.text
        scores = np.array(served.json()["outputs"][0]["data"]).reshape(2, -1)
        assert scores.shape == (2, 2) and np.isfinite(scores).all()
        assert worker.is_alive(), "answered while the measurement was still running"

        worker.join(30)
        report = long["response"].json()
        assert long["response"].status_code == 200, report
        assert report["time_limited"] is True
        assert 2 <= report["iterations_completed"] < 10_000
        assert report["samples_ms"] is None  # not asked for
        assert report["seconds"] >= 2.0  # stopped by the limit, not before it
        # The lab is free again.
        assert client.get(url(MLP), params={"iterations": 10}, headers=KEY).status_code == 200
