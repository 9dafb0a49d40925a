"""Options shared by several commands (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (defaults apply to keys it leaves out).")]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: --set train.steps=100 (repeatable; values are type-checked).")]
FormatOption = Annotated[str, typer.Option("--format", help="Output on stdout: text for people, json for scripts.", case_sensitive=False)]


def check_format(fmt: str) -> str:
    from speechless.errors import UsageError

    if fmt.lower() not in ("text", "json"):
        raise UsageError(f"--format {fmt!r}: choose text or json")
    return fmt.lower()
