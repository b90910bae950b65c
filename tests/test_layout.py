"""The layers as docs/architecture.md draws them: who may import whom, what stays at the top
of service/, and a map that names only files that exist.

Imports are read from the source (every ``import`` and ``from ... import`` statement,
in functions too), so a layer crossing fails here before a reviewer has to find it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests import ROOT

SERVICE_LAYERS = ("rest", "grpc", "dataplane", "models", "process", "observability")
# Below the transports: these never import REST or gRPC.
BELOW_TRANSPORTS = ("dataplane", "models", "process", "observability")


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports are not used)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def crossings(folder: str, forbidden: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[str]:
    """``file: module`` for each import under ``folder`` of a module under ``forbidden``."""
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative in skip:
            continue
        for name in sorted(imported(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{relative}: {name}")
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden", "skip"),
    [
        # The core stands below both sides; only the command dispatches to one.
        ("foldserve", ("service", "training", "torch", "fastapi"), ("foldserve/cli.py",)),
        ("training", ("service",), ()),
        ("service", ("training", "torch"), ()),
        ("service/rest", ("service.grpc",), ()),
        ("service/grpc", ("service.rest",), ()),
        *[(f"service/{layer}", ("service.rest", "service.grpc"), ()) for layer in BELOW_TRANSPORTS],
    ],
)
def test_no_import_crosses_a_layer(folder: str, forbidden: tuple[str, ...], skip: tuple[str, ...]):
    assert crossings(folder, forbidden, skip) == []


def test_the_checker_sees_a_crossing(tmp_path: Path) -> None:
    """The scan finds imports inside functions too (a wrong checker would pass anything)."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from service.rest.codec import dump_json\n    import torch\n")
    assert imported(module) == {"service.rest.codec", "torch"}


def test_service_keeps_its_layers_in_folders() -> None:
    top = sorted(p.name for p in (ROOT / "service").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 8, top
    for layer in (*SERVICE_LAYERS, "fold_latency"):
        assert (ROOT / "service" / layer / "__init__.py").is_file(), layer


def test_the_map_names_files_that_exist_and_every_layer() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:foldserve|training|service|tests|bench)/[\w/]+\.py)", text))
    assert len(named) > 20  # the two request paths name their functions' files
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert missing == []
    for layer in (*SERVICE_LAYERS, "fold_latency"):
        assert f"`service/{layer}/`" in text, layer
