"""What a user with their own data sees: feature names and labels in the model metadata,
labels beside the logits in V1 predictions, and a hint for the mistyped V1 route."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer


def test_model_metadata_names_features_and_labels(client: httpx.Client) -> None:
    linear = client.get("/v2/models/linear").json()
    assert linear["features"] == ["w", "x", "y", "z"]
    assert linear["labels"] == ["a", "b", "c", "d", "e"]
    trained = client.get("/v2/models/breast_cancer_mlp").json()
    assert trained["features"] == [str(f) for f in load_breast_cancer().feature_names]
    assert trained["labels"] == ["malignant", "benign"]
    assert client.get("/v2/models/two_io").json()["features"] == []


def test_v1_predictions_keep_logits_and_add_labels(client: httpx.Client) -> None:
    instances = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, -1.0], [0.5, 0.5, 0.5, 0.5]]
    r = client.post("/v1/models/linear:predict", json={"instances": instances})
    assert r.status_code == 200, r.text
    body = r.json()
    v2 = client.post(
        "/v2/models/linear/infer",
        json={"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": instances}]},
    ).json()
    logits = np.float32(v2["outputs"][0]["data"]).reshape(3, 5)
    np.testing.assert_array_equal(np.float32(body["predictions"]), logits)
    assert body["labels"] == [["a", "b", "c", "d", "e"][i] for i in logits.argmax(axis=1)]
    assert sorted(body) == ["labels", "predictions"]


def test_v1_predictions_without_labels_are_logits_only(client: httpx.Client) -> None:
    r = client.post("/v1/models/two_io:predict", json={"instances": [[1.0, 2.0, 3.0]]})
    assert r.status_code == 400  # two inputs: V1 refuses, with the V2 route named
    sample: dict[str, Any] = {"instances": [[0.0] * 30]}
    cancer = client.post("/v1/models/breast_cancer_mlp:predict", json=sample).json()
    assert cancer["labels"][0] in ("malignant", "benign")
    assert len(cancer["predictions"][0]) == 2


@pytest.mark.parametrize("name", ["digits_cnn", "nope"])
def test_v1_route_with_a_slash_suggests_the_colon(client: httpx.Client, name: str) -> None:
    r = client.post(f"/v1/models/{name}/predict", json={"instances": [[0.0]]})
    assert r.status_code == 404
    assert r.json() == {
        "error": f"no route POST /v1/models/{name}/predict: V1 predict is "
        f"POST /v1/models/{name}:predict (a colon before 'predict', not a slash)"
    }
    assert client.get("/v1/models/x/other").json() == {"error": "Not Found"}


def test_service_help_lists_every_setting_with_default_and_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from service.__main__ import build_parser, main
    from service.settings import Settings

    for action in build_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help and "(default: " in action.help, action.dest
        assert action.help.endswith(f"env FOLDSERVE_{action.dest.upper()}"), action.help
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in Settings.model_fields:
        assert f"FOLDSERVE_{name.upper()}" in text, name
    assert "FOLDSERVE_API_KEY: when set, repository load/unload" in text
    assert "FOLDSERVE_FOLD_LATENCY_MAX_SECONDS: a fold-latency measurement stops timing" in text
    assert "(default: 60.0)" in text and "(default: 8000)" in text
