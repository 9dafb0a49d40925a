"""`speechless tokenize audio`: audio in, stage-1 semantic tokens out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from speechless.commands.options import FormatOption, check_format
from speechless.log import emit

app = typer.Typer(no_args_is_help=True)


@app.command()
def audio(
    files: Annotated[Optional[list[Path]], typer.Argument(help="Audio files (any soundfile format, any rate).")] = None,
    tokenizer: Annotated[str, typer.Option("--tokenizer", "-t", help="Stage-1 checkpoint folder or store reference (stage1@v2, stage1@latest).")] = "stage1@latest",
    manifest: Annotated[Optional[Path], typer.Option("--manifest", help="Tokenize every utterance of a JSONL manifest instead of FILES.")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="With --manifest: only this split.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write token JSONL here (atomically) instead of stdout.")] = None,
    weights: Annotated[str, typer.Option("--weights", help="final, best or averaged.")] = "final",
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, ... (default: as trained, auto).")] = None,
    fmt: FormatOption = "text",
) -> None:
    """Turn audio into semantic tokens: 25 frames a second, 8 codes a frame.

    Text output prints one line per file: its id and the compact code string; JSON prints the full token rows (codes
    as one list per codebook). Audio over 30 s is split into equal windows, recorded in each row's `windows`.
    """
    from speechless.data.manifest import read_manifest
    from speechless.errors import UsageError
    from speechless.tokenizer import SpeechTokenizer, entries_for_files
    from speechless.tokens import write_token_jsonl

    fmt = check_format(fmt)
    if bool(files) == bool(manifest):
        raise UsageError("give audio FILES or --manifest M (one of them)")
    entries = read_manifest(manifest, splits=[split] if split else None) if manifest else entries_for_files(files)
    model = SpeechTokenizer.load(tokenizer, weights=weights, device=device)
    rows = model.tokenize(entries)
    if output is not None:
        write_token_jsonl(output, rows)
        emit({"output": str(output), "utterances": len(rows), "frames": sum(r["frames"] for r in rows)} if fmt == "json" else str(output), fmt)
    elif fmt == "json":
        emit(rows if len(rows) != 1 or manifest else rows[0], "json")
    else:
        emit("\n".join(f"{row['id']}\t{row['codes_str']}" for row in rows))
