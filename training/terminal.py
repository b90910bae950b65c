"""The CLI's terminal: one rich console, and the one-line error every command ends with."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console()


def fail(message: str) -> None:
    """One-line error, exit code 2 (no traceback for user mistakes)."""
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)
