"""`speechless stage1 train|eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from speechless.commands.options import ConfigOption, FormatOption, SetOption, check_format, load_run_config
from speechless.core.log import emit

app = typer.Typer(no_args_is_help=True)


@app.command()
def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (overrides run.out_dir).")] = None,
    push: Annotated[bool, typer.Option("--push", help="Push the finished checkpoint to the store as the next stage1@vN.")] = False,
    fmt: FormatOption = "text",
) -> None:
    """Extract Gemma 4 encoder activations for a manifest, train the RVQ, evaluate it, and write a checkpoint folder.

    Re-running the same command resumes: cached feature shards are reused and training continues from its last
    checkpoint. Example: speechless stage1 train -c configs/stage1/demo.yaml --set train.steps=50
    """
    from stages.stage1_rvq import Stage1Config
    from stages.stage1_rvq import train as run_train

    cfg = load_run_config(Stage1Config, config, set_, out, push)
    summary = run_train(cfg)
    if summary["eval"] is None:  # a rank > 0 of a torchrun job: rank 0 reports
        return
    fmt = check_format(fmt)
    if fmt == "json":
        emit(summary, "json")
    else:
        ev = summary["eval"]
        emit(f"{summary['out_dir']}\nmse {ev['mse']:.4f}  cosine {ev['cosine']:.4f}  utilization min {min(ev['utilization']):.3f}"
             + (f"\npushed {summary['pushed']}" if summary["pushed"] else ""))


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint folder or store reference (stage1@v2).")],
    manifest: Annotated[Path, typer.Option("--manifest", help="Manifest holding the audio to evaluate on.")],
    split: Annotated[str, typer.Option("--split", help="Split of the manifest to evaluate.")] = "test",
    weights: Annotated[str, typer.Option("--weights", help="final, best or averaged.")] = "final",
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, ... (default: as trained, auto).")] = None,
    fmt: FormatOption = "text",
) -> None:
    """Evaluate a stage-1 checkpoint on a manifest split: MSE, cosine, per-codebook utilization and perplexity."""
    from speechless.speech.tokenizer import evaluate_tokenizer

    fmt = check_format(fmt)
    metrics = evaluate_tokenizer(model, str(manifest), split, weights, device)
    if fmt == "json":
        emit(metrics, "json")
    else:
        lines = [f"{k}: {v:.4f}" for k, v in metrics.items() if isinstance(v, float)]
        lines += [f"utilization: {' '.join(f'{u:.3f}' for u in metrics['utilization'])}",
                  f"perplexity: {' '.join(f'{p:.0f}' for p in metrics['perplexity'])}"]
        emit("\n".join(lines))
