"""How the bench tests run bench/ scripts: as a user does (a process of their own), or their
modules imported by the bare names the scripts import each other by."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

from tests import ROOT

BENCH = ROOT / "bench"


def run_script(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python bench/NAME ARGS`` from the checkout under test (not whichever copy of the
    packages is installed); fails the test, with its stderr, unless it exits 0."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(BENCH / name), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@contextlib.contextmanager
def bench_module(name: str) -> Iterator[ModuleType]:
    """bench/NAME.py, imported with bench/ on the path (its siblings import while it is)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))
