"""Logs and progress bars go to stderr (rich); results go to stdout so scripts can read them."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)


def info(message: str) -> None:
    console.print(message)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


def progress() -> Progress:
    """A progress bar on stderr; quiet when stderr is not a terminal except for the final state."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def emit(result: Any, fmt: str = "text") -> None:
    """Print a command's result on stdout: JSON for scripts, or plain text lines for people."""
    if fmt == "json":
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    elif isinstance(result, str):
        sys.stdout.write(result + ("" if result.endswith("\n") else "\n"))
    else:
        sys.stdout.write(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()
