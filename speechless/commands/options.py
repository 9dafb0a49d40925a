"""Options shared by several commands (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (defaults apply to keys it leaves out).")]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: --set train.steps=100 (repeatable; values are type-checked).")]
FormatOption = Annotated[str, typer.Option("--format", help="Output on stdout: text for people, json for scripts.", case_sensitive=False)]


def check_format(fmt: str) -> str:
    from speechless.core.errors import UsageError

    if fmt.lower() not in ("text", "json"):
        raise UsageError(f"--format {fmt!r}: choose text or json")
    return fmt.lower()


def load_run_config(schema, config, set_: list[str] | None, out: Path | None = None, push: bool = False):
    """A stage's config from -c/--set, with the command-line shortcuts --out (run.out_dir) and --push (run.push)."""
    from speechless.core.config import load_config

    overrides = list(set_ or [])
    if out is not None:
        overrides.append(f"run.out_dir={out}")
    if push:
        overrides.append("run.push=true")
    return load_config(schema, config, overrides)
