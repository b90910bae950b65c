"""``config.json`` ``{"variant": "int8"}``: every worker serves ``model.int8.onnx``, checked
at load against its own recorded outputs; a version without one keeps what it served.

A real ``python -m service --workers 2`` over the session's trained models (digits_cnn
has an INT8 file, breast_cancer_mlp has none), a new connection per request.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from foldserve.model_format import ModelVersionError, VersionMetadata
from service.models.config import read_model_config

WORKERS = 2
REQUESTS = 16  # per check: both workers answer some
CNN, MLP = "digits_cnn", "breast_cancer_mlp"


def set_variant(repo: Path, name: str, variant: str) -> None:
    (repo / name / "config.json").write_text(json.dumps({"variant": variant}))


def variants(client: Any, name: str) -> set[str]:
    return {client.get(f"/v2/models/{name}").json()["variant"] for _ in range(REQUESTS)}


def logits(client: Any, name: str, md: VersionMetadata) -> list[np.ndarray]:
    """What every worker answers for the version's reference inputs."""
    x = md.reference.inputs["input"]
    body = {"inputs": [{"name": "input", **x.model_dump()}]}
    outs = []
    for _ in range(REQUESTS):
        r = client.post(f"/v2/models/{name}/infer", json=body)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        outs.append(np.asarray(out["data"], np.float32).reshape(out["shape"]))
    return outs


def test_every_worker_serves_the_variant_config_json_asks_for(
    model_store: Any, tmp_path: Path, serve_process: Any
) -> None:
    """One server (starting several costs seconds each): INT8 served, switched back; a
    version without an INT8 file refused from the start, or kept serving FP32."""
    repo = model_store.copy_to(tmp_path / "models")
    set_variant(repo, CNN, "int8")
    shutil.copytree(repo / MLP, repo / "mlp_new")
    set_variant(repo, "mlp_new", "int8")  # asked for from the start: nothing to keep serving
    md = VersionMetadata.read(repo / CNN / "1")
    assert md.int8 is not None
    int8_ref = md.int8.reference_outputs["logits"].array()
    fp32_ref = md.reference.outputs["logits"].array()
    assert np.abs(int8_ref - fp32_ref).max() > 1e-3  # the two variants are distinguishable
    with serve_process(repo, WORKERS) as server:
        client = server.client
        assert variants(client, CNN) == {"int8"}
        assert variants(client, MLP) == {"folded"}
        for got in logits(client, CNN, md):
            np.testing.assert_allclose(got, int8_ref, atol=md.int8.reference_atol)
        index = {
            (e["name"], e.get("version")): e for e in client.get("/v2/repository/index").json()
        }
        fresh = index[("mlp_new", "1")]
        assert fresh["state"] == "UNAVAILABLE" and "no model.int8.onnx" in fresh["reason"]

        # Back to FP32 folded, in every worker, once the load answers.
        set_variant(repo, CNN, "folded")
        r = client.post(f"/v2/repository/models/{CNN}/load")
        assert r.status_code == 200, r.text
        assert r.json()["workers"] == WORKERS
        assert variants(client, CNN) == {"folded"}
        for got in logits(client, CNN, md):
            np.testing.assert_allclose(got, fp32_ref, atol=md.reference.atol)

        # A served version asked to switch: the load fails (400, the reason), it keeps serving.
        set_variant(repo, MLP, "int8")
        r = client.post(f"/v2/repository/models/{MLP}/load")
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "variant 'int8' not loaded" in error and "no model.int8.onnx" in error
        assert "still serving variant 'folded'" in error
        assert variants(client, MLP) == {"folded"}
        mlp = VersionMetadata.read(repo / MLP / "1")
        for got in logits(client, MLP, mlp):
            np.testing.assert_allclose(got, mlp.reference.outputs["logits"].array(), atol=1e-4)


@pytest.mark.parametrize(
    ("config", "variant"),
    [({}, "folded"), ({"variant": "folded"}, "folded"), ({"variant": "int8"}, "int8")],
)
def test_config_variant(tmp_path: Path, config: dict[str, str], variant: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_model_config(tmp_path).variant == variant


def test_config_variant_unknown_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"variant": "int4"}))
    with pytest.raises(ModelVersionError, match=r"variant must be one of \['folded', 'int8'\]"):
        read_model_config(tmp_path)
