"""`speechless stage3 train|eval|infer` and the top-level `speechless chat`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from speechless.commands.options import ConfigOption, FormatOption, SetOption, check_format, load_run_config
from speechless.core.log import emit

app = typer.Typer(no_args_is_help=True)

ModelOption = Annotated[str, typer.Option("--model", "-m", help="Stage-3 adapter folder or store reference (stage3@v1, stage3@latest).")]
InstructionOption = Annotated[str, typer.Option("--instruction", help="Instruction sent with each audio (rows may carry their own 'instruction').")]
QuantizeOption = Annotated[Optional[bool], typer.Option("--quantize/--no-quantize", show_default=False,
                          help="Quantize/dequantize the audio vectors through stage 1 first, at the codebook levels of the training speech "
                               "[default: the adapter's eval.quantize_real]")]
MaxTokensOption = Annotated[int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")]


@app.command()
def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (overrides run.out_dir).")] = None,
    push: Annotated[bool, typer.Option("--push", help="Push the adapter to the store as the next stage3@vN.")] = False,
    fmt: FormatOption = "text",
) -> None:
    """Adapt the LLM to speech with stage-2 synthetic speech, evaluate on held-out real speech (metrics.json `eval`);
    the `compare` section adds a real-speech topline and other adapter kinds.

    Re-running the same command resumes. Example: speechless stage3 train -c configs/stage3/demo.yaml
    """
    from stages.stage3_llm import Stage3Config
    from stages.stage3_llm import train as run_train

    fmt = check_format(fmt)
    summary = run_train(load_run_config(Stage3Config, config, set_, out, push))
    if summary["eval"] is None:  # a rank > 0 of a torchrun job: rank 0 reports
        return
    if fmt == "json":
        emit(summary, "json")
        return
    lines = [summary["out_dir"]]
    for name, row in summary["eval"]["adapters"].items():
        lines.append(f"{name}: " + "  ".join(f"{t} {s:.3f}" for t, s in row["tasks"].items())
                     + f"  text ppl {row['text_perplexity_change']:+.3%}  trainable {row['trainable_parameters']:,}")
    for kind, tasks in summary["eval"].get("topline_comparison", {}).items():
        lines.append(f"ratio to the real-speech topline ({kind}): " + "  ".join(f"{t} {r['ratio_to_topline']}" for t, r in tasks.items()))
    if summary["pushed"]:
        lines.append(f"pushed {summary['pushed']}")
    emit("\n".join(lines))


@app.command()
def infer(
    manifest: Annotated[Path, typer.Option("--manifest", help="JSONL: rows with audio_filepath (relative to the file) and/or instruction.")],
    model: ModelOption = "stage3@latest",
    instruction: InstructionOption = "Transcribe the audio.",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write answers as JSONL here (default: stdout).")] = None,
    quantize: QuantizeOption = None,
    max_new_tokens: MaxTokensOption = 40,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Requests answered together.")] = 16,
) -> None:
    """Answer a batch of requests: real audio (through the model's own audio tower) and/or text, in; text out."""
    from speechless.core.io import write_jsonl
    from speechless.llm.adapt import infer_file

    rows = infer_file(model, manifest, instruction, quantize, max_new_tokens, batch_size)
    if output is not None:
        write_jsonl(output, rows)
        emit(f"{output}: {len(rows)} answers")
    else:
        emit("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).rstrip("\n"))


@app.command("eval")
def evaluate(
    model: ModelOption = "stage3@latest",
    conversations: Annotated[Optional[Path], typer.Option("--conversations", help="Held-out conversations JSONL whose speech parts carry real 'audio' (relative to the file), each with its answer and task.")] = None,
    demo_manifest: Annotated[Optional[Path], typer.Option("--demo-manifest", help="Without --conversations: the demo corpus manifest (sentences.jsonl beside it) [default: runs/demo/corpus/all.jsonl].")] = None,
    split: Annotated[str, typer.Option("--split", help="Demo corpus: held-out split of real recordings ('dev+test' joins splits).")] = "test",
    voices: Annotated[int, typer.Option("--voices", help="Demo corpus: recordings per sentence.")] = 2,
    quantize: QuantizeOption = None,
    max_new_tokens: MaxTokensOption = 40,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Requests answered together.")] = 48,
    fmt: FormatOption = "text",
) -> None:
    """Score an adapter on held-out REAL speech (WER/CER, BLEU/chrF, exact match): a conversation file, or the demo task set."""
    from speechless.llm.adapt import evaluate_file

    fmt = check_format(fmt)
    result = evaluate_file(model, conversations, quantize, demo_manifest, split, voices, max_new_tokens, batch_size)
    if fmt == "json":
        emit(result, "json")
    else:
        emit("\n".join(f"{task}: {r['score_name']} {r['score']:.4f}" for task, r in result.items()))


def chat(
    audio: Annotated[Optional[Path], typer.Option("--audio", help="Audio file (any format soundfile reads; longer than 30 s is split into windows).")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Instruction or question (default with audio: transcribe).")] = None,
    model: ModelOption = "stage3@latest",
    quantize: QuantizeOption = None,
    max_new_tokens: MaxTokensOption = 60,
) -> None:
    """One request to a stage-3 model: speech and/or text in, text out."""
    from speechless.llm.adapt import chat as answer

    emit(answer(model, audio, text, quantize, max_new_tokens))
