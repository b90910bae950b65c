"""The runtime directory across processes: several workers open the same one at once and
each finds the layout the others write into."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path
from typing import Any

from foldserve.files import file_lock, write_atomic
from service.process.runtime_dir import RuntimeDir, open_runtime_dir

WORKERS = 6
CTX = mp.get_context("spawn")


def _worker(root: str, start: Any) -> None:
    start.wait(60)  # all open the directory at the same moment
    runtime = open_runtime_dir(Path(root))
    pid = os.getpid()
    write_atomic(runtime.worker(pid), json.dumps({"pid": pid}).encode())
    with file_lock(runtime.control_lock):
        seen = json.loads(runtime.control.read_bytes()) if runtime.control.exists() else []
        write_atomic(runtime.control, json.dumps([*seen, pid]).encode())
    write_atomic(runtime.latency_report(f"m{pid}"), b"{}")


def test_workers_open_one_runtime_directory_at_once(tmp_path: Path) -> None:
    root = tmp_path / "not" / "yet" / "there"
    start = CTX.Event()
    procs = [CTX.Process(target=_worker, args=(str(root), start)) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    runtime = RuntimeDir(root)
    pids = sorted(p.pid for p in procs if p.pid is not None)
    acks = sorted(int(path.stem) for path in runtime.workers.glob("*.json"))
    assert acks == pids
    assert sorted(json.loads(runtime.control.read_bytes())) == pids  # no lost update
    assert sorted(p.stem for p in runtime.latency_reports.iterdir()) == [f"m{p}" for p in pids]


def test_layout_on_disk_is_the_documented_one(tmp_path: Path) -> None:
    runtime = open_runtime_dir(tmp_path / "rt")
    rel = {
        name: str(getattr(runtime, name).relative_to(runtime.root))
        for name in (
            "control",
            "control_lock",
            "workers",
            "metrics",
            "derived",
            "latency_lock",
            "latency_progress",
            "latency_reports",
        )
    }
    assert rel == {
        "control": "control.json",
        "control_lock": "control.lock",
        "workers": "workers",
        "metrics": "metrics",
        "derived": "derived",
        "latency_lock": "fold-latency.lock",
        "latency_progress": "fold-latency.progress.json",
        "latency_reports": "fold-latency",
    }
    assert runtime.worker(12).name == "12.json"
    assert runtime.workers.is_dir() and runtime.latency_reports.is_dir()


def test_without_a_configured_path_each_server_gets_a_fresh_directory() -> None:
    first, second = open_runtime_dir(None), open_runtime_dir(None)
    try:
        assert first.root != second.root
        assert first.workers.is_dir() and second.workers.is_dir()
    finally:
        for r in (first, second):
            shutil.rmtree(r.root, ignore_errors=True)
