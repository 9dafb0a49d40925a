"""`speechless tokenize audio`: audio in, stage-1 semantic tokens out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from speechless.commands.options import FormatOption, check_format
from speechless.commands.stage2 import (
    GuidanceOption,
    MaxSecondsOption,
    SeedOption,
    SpeakerOption,
    TemperatureOption,
    TopKOption,
    generate_settings,
)
from speechless.core.log import emit

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
    Under `torchrun --nproc_per_node N` the utterances are shared among N processes and rank 0 writes the output.
    """
    from speechless.core import distributed
    from speechless.speech.tokenizer import tokenize_audio

    fmt = check_format(fmt)
    rows = tokenize_audio(tokenizer, files, manifest, split, weights, device, output)
    if not distributed.group().is_main:
        return
    if output is not None:
        emit({"output": str(output), "utterances": len(rows), "frames": sum(r["frames"] for r in rows)} if fmt == "json" else str(output), fmt)
    elif fmt == "json":
        emit(rows if len(rows) != 1 or manifest else rows[0], "json")
    else:
        emit("\n".join(f"{row['id']}\t{row['codes_str']}" for row in rows))


@app.command()
def text(
    texts: Annotated[list[str], typer.Argument(help="Text(s) to turn into semantic tokens.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Stage-2 checkpoint folder or store reference (stage2@v1, stage2@latest).")] = "stage2@latest",
    stage1: Annotated[Optional[str], typer.Option("--stage1", help="The stage-1 version the codes must belong to (folder or stage1@vN): refused if the model was trained on another.")] = None,
    weights: Annotated[str, typer.Option("--weights", help="final or best.")] = "final",
    speaker: SpeakerOption = None,
    temperature: TemperatureOption = 0.7,
    top_k: TopKOption = 30,
    guidance: GuidanceOption = 1.0,
    max_seconds: MaxSecondsOption = 30.0,
    seed: SeedOption = 0,
    store_root: Annotated[Optional[Path], typer.Option("--store-root", help="Local store folder (default: $SPEECHLESS_STORE or ./store).")] = None,
    fmt: FormatOption = "text",
) -> None:
    """Turn text into the stage-1 semantic tokens the same words would give as speech (stage 2: no audio, no TTS).

    Text output prints the compact code string of each text (one line each); JSON prints token rows like `audio`.
    """
    from speechless.core.store import store_config
    from speechless.t2s.generate import generate_texts

    fmt = check_format(fmt)
    gen = generate_settings(temperature, top_k, max_seconds, 64, speaker, seed, guidance)
    rows = generate_texts(model, texts, gen, weights, stage1, store_config(root=store_root))
    if fmt == "json":
        emit(rows[0] if len(rows) == 1 else rows, "json")
    else:
        emit("\n".join(row["codes_str"] for row in rows))
