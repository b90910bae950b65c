"""The Kubernetes manifest and Dockerfile agree with the service they deploy."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _docs() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def test_probes_hit_real_routes_and_env_names_real_settings(tmp_path: Path):
    app = create_app(Settings(repository=tmp_path))
    paths = set(app.openapi()["paths"])
    container = _docs()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in paths
    fields = {f"FOLDSERVE_{name.upper()}" for name in Settings.model_fields}
    for env in container["env"]:
        assert env["name"] in fields, env["name"]


def test_service_and_autoscaler_target_the_deployment():
    docs = _docs()
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Service"]["spec"]["selector"] == labels
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == "foldserve"
