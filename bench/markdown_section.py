"""Benchmark results recorded in a markdown file between a script's own markers."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, start: str, end: str, section: str) -> None:
    """Replace the text between ``start`` and ``end`` in ``path`` with ``section`` (appended
    with its markers when they are absent, the file created when missing); the rest stays."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"{start}\n{section.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def publish(lines: list[str], path: Path, start: str, end: str, *, write: bool) -> None:
    """Print a script's result ``lines``; with ``write``, also record them in ``path`` between
    ``start`` and ``end`` (:func:`write_section`)."""
    section = "\n".join(lines)
    print(section)
    if write:
        write_section(path, start, end, section)
