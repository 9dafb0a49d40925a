"""The `speechless` command line: `run` and `report` (the pipeline), `chat`, and a sub-app per area (data, encoder, stage1, stage2,
stage3, tokenize, eval, hub, config)."""

from __future__ import annotations

import sys

import typer

from speechless.commands import config_cmd, data, encoder, evaluate, hub, pipeline, stage1, stage2, stage3, tokenize
from speechless.core.errors import SpeechlessError
from speechless.core.log import console

app = typer.Typer(
    name="speechless",
    help="Teach Gemma to understand speech in a low-resource language, without recorded speech instructions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("run")(pipeline.run)
app.command("report")(pipeline.report)
app.add_typer(data.app, name="data", help="Build, import and validate speech corpora (JSONL manifests).")
app.add_typer(encoder.app, name="encoder", help="Before stage 1: train a Gemma 4 audio encoder that hears (CTC), for corpora without pretrained weights.")
app.add_typer(stage1.app, name="stage1", help="Stage 1: train and evaluate the speech tokenizer (RVQ on Gemma 4 encoder activations).")
app.add_typer(stage2.app, name="stage2", help="Stage 2: text -> semantic tokens (the Speechless model), with a measured round trip.")
app.add_typer(stage3.app, name="stage3", help="Stage 3: adapt the LLM to speech with synthetic speech only (LoRA or depth up-scaling); evaluate on real speech.")
app.command("chat", help="Ask a stage-3 model: --audio FILE and/or --text, answer on stdout.")(stage3.chat)
app.add_typer(tokenize.app, name="tokenize", help="Turn audio (stage 1) or text (stage 2) into semantic tokens.")
app.add_typer(evaluate.app, name="eval", help="Evaluate a causal LM's text skills on real text (UDHR perplexity).")
app.add_typer(hub.app, name="hub", help="The versioned checkpoint store: local folder (default) or the Hugging Face Hub.")
app.add_typer(config_cmd.app, name="config", help="Show a stage's config schema or resolve a config file.")


def run(args: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: 2 for usage/config errors, 1 for runtime failures, 0 on success."""
    command = typer.main.get_command(app)
    try:
        command.main(args=args, prog_name="speechless", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except SpeechlessError as exc:
        console.print("error:", str(exc), style="red", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]; re-run the same command to resume")
        return 130
    return 0


def main() -> None:
    sys.exit(run())
