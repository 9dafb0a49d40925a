"""`speechless encoder pretrain`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from speechless.commands.options import ConfigOption, FormatOption, SetOption, check_format, load_run_config
from speechless.core.log import emit

app = typer.Typer(no_args_is_help=True)


@app.command()
def pretrain(
    config: ConfigOption = None,
    set_: SetOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (overrides run.out_dir).")] = None,
    push: Annotated[bool, typer.Option("--push", help="Push the finished encoder to the store as the next encoder@vN.")] = False,
    fmt: FormatOption = "text",
) -> None:
    """Train a Gemma 4 audio encoder (CTC on characters or phonemes of the train split) and write a standalone
    Gemma4AudioModel folder that stage 1 takes as encoder.source.

    Re-running the same command resumes from the last checkpoint. Example:
    speechless encoder pretrain -c configs/encoder/demo.yaml --set train.steps=50
    """
    from stages.stage0_encoder import EncoderPretrainConfig, train

    fmt = check_format(fmt)
    summary = train(load_run_config(EncoderPretrainConfig, config, set_, out, push))
    if fmt == "json":
        emit(summary, "json")
    else:
        ev = summary["eval"]
        emit(f"{summary['out_dir']}\nheld-out {'CER' if ev['units'] == 'chars' else 'PER'} {ev['error_rate']:.4f} on {ev['utterances']} "
             f"{ev['split']} utterances; weights {summary['weights_sha256'][:12]}" + (f"\npushed {summary['pushed']}" if summary["pushed"] else ""))
