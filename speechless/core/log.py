"""Logs and progress bars go to stderr (rich); results go to stdout so scripts can read them.

In a torchrun job only rank 0 prints info lines and progress bars (warnings and errors come from every rank).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)


def _secondary_rank() -> bool:
    return os.environ.get("RANK", "0") not in ("", "0")


def info(message: str) -> None:
    if not _secondary_rank():
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
        disable=not console.is_terminal or _secondary_rank(),
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
