"""foldserve.files across processes: atomic replacement never shows a torn file, and the
file lock excludes other processes (what every worker relies on)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest

from foldserve.files import file_lock, staged_dir, write_atomic

SIZE = 1 << 16  # large enough that a plain write would be seen half-done
WRITERS = 4
WRITES = 150
CTX = mp.get_context("spawn")  # no inherited locks or threads from pytest


def _content(writer: int, i: int) -> bytes:
    # One byte repeated, then a trailer naming it: a torn file mixes bytes or lacks it.
    mark = (writer * WRITES + i) % 251
    return bytes([mark]) * SIZE + f"|{mark}".encode()


def _whole(data: bytes) -> bool:
    body, sep, trailer = data.rpartition(b"|")
    return sep == b"|" and len(body) == SIZE and body == bytes([int(trailer)]) * SIZE


def _write_many(path: str, writer: int) -> None:
    for i in range(WRITES):
        write_atomic(Path(path), _content(writer, i))


def _read_until(path: str, stop: Any, torn: Any, reads: Any) -> None:
    while not stop.is_set():
        data = Path(path).read_bytes()
        reads.value += 1
        if not _whole(data):
            torn.value += 1


def test_write_atomic_readers_never_see_a_torn_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.json"
    write_atomic(path, _content(0, 0))
    stop, torn, reads = CTX.Event(), CTX.Value("i", 0), CTX.Value("i", 0)
    readers = [
        CTX.Process(target=_read_until, args=(str(path), stop, torn, reads)) for _ in range(2)
    ]
    writers = [CTX.Process(target=_write_many, args=(str(path), w)) for w in range(WRITERS)]
    for p in readers + writers:
        p.start()
    for p in writers:
        p.join(120)
    stop.set()
    for p in readers:
        p.join(30)
    assert [p.exitcode for p in writers + readers] == [0] * (WRITERS + 2)
    assert reads.value > 0
    assert torn.value == 0
    assert _whole(path.read_bytes())
    assert [p.name for p in tmp_path.iterdir()] == ["shared.json"]  # no temporary left


def _add_under_lock(lock: str, counter: str, times: int) -> None:
    for _ in range(times):
        with file_lock(Path(lock)):
            # read-modify-write: without mutual exclusion, increments are lost
            value = int(Path(counter).read_text())
            Path(counter).write_text(str(value + 1))


def test_file_lock_excludes_other_processes(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")
    procs = [
        CTX.Process(target=_add_under_lock, args=(str(tmp_path / "c.lock"), str(counter), 200))
        for _ in range(WRITERS)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    assert int(counter.read_text()) == WRITERS * 200


def _hold(lock: str, held: Any, release: Any) -> None:
    with file_lock(Path(lock)):
        held.set()
        release.wait(60)


def test_file_lock_without_waiting_refuses_while_another_process_holds_it(tmp_path: Path) -> None:
    lock = tmp_path / "busy.lock"
    held, release = CTX.Event(), CTX.Event()
    holder = CTX.Process(target=_hold, args=(str(lock), held, release))
    holder.start()
    try:
        assert held.wait(60)
        with pytest.raises(BlockingIOError), file_lock(lock, wait=False):
            pass
    finally:
        release.set()
        holder.join(30)
    with file_lock(lock, wait=False):  # released with its holder
        pass


def test_staged_dir_is_removed_when_the_block_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), staged_dir(tmp_path) as tmp:
        (tmp / "half").write_bytes(b"x")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
