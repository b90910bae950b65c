"""Hot reload while serving: new versions swap in, broken ones never replace a serving one."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.settings import Settings
from tests.polling import poll

KEY = {"Authorization": "Bearer test-key"}
MLP = "breast_cancer_mlp"


def mlp_request(seed: int = 0) -> dict[str, Any]:
    x = np.random.default_rng(seed).normal(size=(2, 30)).astype(np.float32)
    return {
        "inputs": [
            {"name": "input", "shape": [2, 30], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }


def corrupt_copy(model_dir: Path, source: int, target: int) -> None:
    """A new version whose model.onnx no longer matches its sha256 (written atomically)."""
    tmp = model_dir / f".tmp-{target}"
    shutil.copytree(model_dir / str(source), tmp)
    data = bytearray((tmp / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (tmp / "model.onnx").write_bytes(bytes(data))
    tmp.rename(model_dir / str(target))


def test_export_load_swap_and_a_corrupt_version_keeps_the_old_one(
    fresh_server: Any, model_store: Any
) -> None:
    from training.export import export_run

    with fresh_server() as live, live.client() as client:
        assert client.get(f"/v2/models/{MLP}").json()["versions"] == ["1"]
        export_run(model_store.runs[MLP], live.repository, MLP)  # version 2 on disk
        assert client.get(f"/v2/models/{MLP}").json()["version"] == "1"  # polling is off

        served: list[int] = []
        stop = threading.Event()

        def keep_serving() -> None:  # traffic during the swap: every request must succeed
            with live.client() as c:
                while not stop.is_set():
                    served.append(c.post(f"/v2/models/{MLP}/infer", json=mlp_request()).status_code)

        worker = threading.Thread(target=keep_serving)
        worker.start()
        try:
            poll(lambda: len(served) >= 5)  # traffic before the swap,
            loaded = client.post(f"/v2/repository/models/{MLP}/load", headers=KEY)
            after = len(served)
            poll(lambda: len(served) >= after + 5)  # and after it
        finally:
            stop.set()
            worker.join(10)
        assert loaded.status_code == 200, loaded.text
        assert [(v["version"], v["state"]) for v in loaded.json()["versions"]] == [
            ("1", "READY"),
            ("2", "READY"),
        ]
        assert served and set(served) == {200}
        meta = client.get(f"/v2/models/{MLP}").json()
        assert (meta["version"], meta["versions"]) == ("2", ["1", "2"])
        assert (
            client.post(f"/v2/models/{MLP}/infer", json=mlp_request()).json()["model_version"]
            == "2"
        )

        corrupt_copy(live.repository / MLP, 2, 3)
        reloaded = client.post(
            f"/v2/repository/models/{MLP}/load", headers={"X-API-Key": "test-key"}
        )
        assert reloaded.status_code == 400  # a failed version is an error, as in Triton
        assert "version 3: sha256 of model.onnx" in reloaded.json()["error"]
        v3 = reloaded.json()["versions"][-1]
        assert (v3["version"], v3["state"]) == ("3", "UNAVAILABLE")
        assert "sha256 of model.onnx" in v3["reason"]
        assert client.get(f"/v2/models/{MLP}").json()["version"] == "2"
        answer = client.post(f"/v2/models/{MLP}/infer", json=mlp_request())
        assert (answer.status_code, answer.json()["model_version"]) == (200, "2")
        pinned = client.post(f"/v2/models/{MLP}/versions/3/infer", json=mlp_request())
        assert (
            pinned.status_code == 400 and "version 3 is not ready: sha256" in pinned.json()["error"]
        )
        index = client.get("/v2/repository/index").json()
        assert {
            "name": MLP,
            "version": "3",
            "state": "UNAVAILABLE",
            "reason": v3["reason"],
        } in index
        ready_only = client.get("/v2/repository/index", params={"ready": True}).json()
        assert {(e["name"], e["version"]) for e in ready_only if e["name"] == MLP} == {
            (MLP, "1"),
            (MLP, "2"),
        }


def test_unload_and_load_with_tritonclient(fresh_server: Any) -> None:
    with fresh_server() as live, live.client() as client:
        triton_client = triton.InferenceServerClient(
            url=f"127.0.0.1:{live.port}", network_timeout=10.0
        )
        with pytest.raises(InferenceServerException, match="needs the API key"):
            triton_client.unload_model(MLP)
        triton_client.unload_model(MLP, headers=KEY)
        assert not triton_client.is_model_ready(MLP)
        ready = client.get(f"/v2/models/{MLP}/ready")
        assert ready.status_code == 400 and ready.json()["reason"] == "unloaded"
        gone = client.post(f"/v2/models/{MLP}/infer", json=mlp_request())
        assert gone.status_code == 400 and "has no ready version: unloaded" in gone.json()["error"]
        assert client.get("/v2/health/ready").json() == {"ready": True}  # the server still is
        index = {
            (e["name"], e["state"], e["reason"]) for e in triton_client.get_model_repository_index()
        }
        assert (MLP, "UNAVAILABLE", "unloaded") in index
        triton_client.load_model(MLP, headers=KEY)
        assert triton_client.is_model_ready(MLP)
        assert client.post(f"/v2/models/{MLP}/infer", json=mlp_request()).status_code == 200
        triton_client.close()


def test_load_errors(fresh_server: Any, tmp_path: Path) -> None:
    with fresh_server() as live, live.client(headers=KEY) as client:
        missing = client.post("/v2/repository/models/nope/load")
        assert missing.status_code == 404 and "no model directory 'nope'" in missing.json()["error"]
        bad = live.repository / "broken"
        bad.mkdir()
        shutil.copytree(live.repository / MLP / "1", bad / ".tmp")
        (bad / ".tmp" / "metadata.json").write_text("{}")
        (bad / ".tmp").rename(bad / "1")
        failed = client.post("/v2/repository/models/broken/load")
        assert failed.status_code == 400
        assert (
            "model 'broken' did not load cleanly: version 1: metadata format None"
            in failed.json()["error"]
        )
        assert [(v["version"], v["state"]) for v in failed.json()["versions"]] == [
            ("1", "UNAVAILABLE")
        ]


def test_without_api_key_repository_routes_are_open(fresh_server: Any) -> None:
    with fresh_server(api_key=None) as live, live.client() as client:
        assert client.post(f"/v2/repository/models/{MLP}/unload").status_code == 200
        assert client.post(f"/v2/repository/models/{MLP}/load").status_code == 200


def test_polling_picks_up_a_new_version(fresh_server: Any, build: Any) -> None:
    with fresh_server(poll_interval=0.1) as live, live.client() as client:
        build.write_version(live.repository, "linear", 2, build.linear_model(4, 5, seed=9))
        poll(lambda: client.get("/v2/models/linear").json()["version"] == "2", limit=10)
        body = {
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
        }
        assert client.post("/v2/models/linear/infer", json=body).json()["model_version"] == "2"


def test_settings_field_for_polling_defaults_off() -> None:
    assert Settings(_env_file=None).poll_interval == 0.0  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("host", "open_management", "status"),
    [("0.0.0.0", False, 403), ("0.0.0.0", True, 200), ("127.0.0.1", False, 200)],
)
def test_management_without_a_key_is_off_beyond_loopback(
    fresh_server: Any, host: str, open_management: bool, status: int
) -> None:
    with (
        fresh_server(api_key=None, host=host, open_management=open_management) as live,
        live.client() as client,
    ):
        for action in ("unload", "load"):
            r = client.post(f"/v2/repository/models/{MLP}/{action}")
            assert r.status_code == status, r.text
        if status == 403:
            assert "FOLDSERVE_API_KEY" in r.json()["error"] and host in r.json()["error"]
            assert client.post(f"/v2/models/{MLP}/infer", json=mlp_request()).status_code == 200
        repository = live.repository
    # A key opens management wherever the server listens, and only for its holder.
    with fresh_server(repository, host=host) as live, live.client() as client:
        assert client.post(f"/v2/repository/models/{MLP}/load").status_code == 401
        assert client.post(f"/v2/repository/models/{MLP}/load", headers=KEY).status_code == 200


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        ({"api_key": "k"}, "needs the API key"),
        ({"host": "0.0.0.0"}, "repository management is off: the server listens on 0.0.0.0"),
        ({"host": "0.0.0.0", "open_management": True}, "open to anyone"),
        ({}, "open on the loopback listener 127.0.0.1"),
    ],
)
def test_start_up_says_how_management_is_guarded(overrides: dict[str, Any], line: str) -> None:
    from service.settings import describe_management

    assert line in describe_management(Settings(_env_file=None, **overrides))  # type: ignore[call-arg]
