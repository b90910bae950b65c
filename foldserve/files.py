"""Files that several processes share: atomic replacement, staged directories, locks.

Every writer in the project that another process may read at the same time goes
through here: the repository's version directories, the derived cache, the
runtime directory's control, acknowledgement and report files, ``fold-onnx``'s
output. What is promised is atomicity against concurrent readers (a reader sees
the old content or the new, whole), not durability across a power loss, except
where :func:`write_synced` is used.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new file, whole.

    The data goes to a temporary file beside ``path`` (named per process and thread, so
    concurrent writers never share one), renamed over ``path``; on failure it is removed
    and ``path`` is left as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it: on disk before a rename publishes it."""
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def staged_dir(parent: Path, prefix: str = ".tmp-") -> Iterator[Path]:
    """A new directory in ``parent`` to assemble files in before the caller renames it
    into place (``os.rename``: atomic, so a reader never sees a half-written directory).
    Readable by other users (servers may run as one); removed when the block raises."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) across processes.

    The lock is the kernel's (``flock``): a process that dies releases it. With
    ``wait=False`` a lock held elsewhere raises :class:`BlockingIOError` at once.
    OSError when ``path`` cannot be created."""
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
