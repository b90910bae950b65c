"""The manifests in deploy/k8s, read once, for the tests of tests/deploy/."""

from __future__ import annotations

from typing import Any

import yaml

from tests import ROOT

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37.0"


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            found.append((str(path.relative_to(K8S)), doc))
    return found


MANIFESTS = _manifests()


def one(kind: str, file: str | None = None) -> dict[str, Any]:
    """The one manifest of ``kind`` (in ``file``, relative to deploy/k8s)."""
    docs = [d for f, d in MANIFESTS if d["kind"] == kind and (file is None or f == file)]
    assert len(docs) == 1, (kind, file, len(docs))
    return docs[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """A container's environment, name -> value (or valueFrom)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
