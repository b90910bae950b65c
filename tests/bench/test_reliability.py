"""bench/reliability.py --versions 2 --cycles 10: hot swaps under load, over real HTTP with
two workers (two versions rather than --quick's three: the corrupt one still comes between
them, and each version costs an export under load).

No request fails, every answer is the output of the version it names, a load is
seen by every request started after it answered, and a corrupt version is refused
while the one before serves on. (The full run's figures, RSS included, are in
docs/benchmarks.md.)
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench.scripts import run_script


def test_short_reliability_run_meets_its_goals(tmp_path: Path) -> None:
    out = tmp_path / "reliability.json"
    run_script(
        "reliability.py", "--versions", "2", "--cycles", "10",
        "--json", str(out), "--workdir", str(tmp_path / "work"),
    )  # fmt: skip
    figures = json.loads(out.read_text())

    assert figures["requests"] >= 100
    assert figures["failed"] == 0, figures["failed_statuses"]
    assert figures["mismatched"] == 0
    # One entry per load: 3 versions and the corrupt one between them.
    swaps = [(s["version"], s["status"], s["expected"]) for s in figures["swaps"]]
    assert swaps == [(2, 200, 2), (3, 400, 2), (3, 200, 3)]
    assert [s["served"] for s in figures["swaps"]] == [figures["fresh"]] * 3
    assert "version 3: sha256 of model.onnx" in figures["corrupt_reason"]
    assert figures["cycle_failures"] == 0
