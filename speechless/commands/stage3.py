"""`speechless stage3 train|eval|infer` and the top-level `speechless chat`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from speechless.commands.options import ConfigOption, FormatOption, SetOption, check_format, load_run_config
from speechless.log import emit

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
    """Adapt the LLM to speech with stage-2 synthetic speech, evaluate on held-out real speech (metrics.json `eval`).

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
    if summary["pushed"]:
        lines.append(f"pushed {summary['pushed']}")
    emit("\n".join(lines))


def _read_requests(path: Path, instruction: str) -> tuple[list[str], list[dict]]:
    from speechless.errors import UsageError
    from speechless.io import read_jsonl

    ids, requests = [], []
    for number, row in read_jsonl(path, "manifest"):
        if not (row.get("audio_filepath") or row.get("instruction")):
            raise UsageError(f"{path}:{number}: a row needs 'audio_filepath' (speech) or 'instruction' (text-only request)")
        audio = row.get("audio_filepath")
        ids.append(str(row.get("id", number)))
        requests.append({"text": row.get("instruction", instruction) + ("\n" if audio else ""),
                         "audio": str((path.parent / audio).resolve()) if audio else None})
    if not requests:
        raise UsageError(f"{path}: no requests in the file")
    return ids, requests


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
    from speechless.io import write_jsonl
    from stages.stage3_llm import answer_requests, load_for_inference, stage1_round_trip

    ids, requests = _read_requests(manifest, instruction)
    lm, record, _ = load_for_inference(model)
    answers = answer_requests(lm, requests, max_new_tokens, batch_size, *stage1_round_trip(record, quantize))
    rows = [{"id": i, "answer": a} for i, a in zip(ids, answers)]
    if output is not None:
        write_jsonl(output, rows)
        emit(f"{output}: {len(rows)} answers")
    else:
        emit("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).rstrip("\n"))


@app.command("eval")
def evaluate(
    model: ModelOption = "stage3@latest",
    manifest: Annotated[Path, typer.Option("--manifest", help="Corpus manifest with sentences.jsonl beside it (the demo corpus).")] = Path("runs/demo/corpus/all.jsonl"),
    split: Annotated[str, typer.Option("--split", help="Held-out split of real recordings.")] = "test",
    voices: Annotated[int, typer.Option("--voices", help="Recordings per sentence.")] = 2,
    quantize: QuantizeOption = None,
    fmt: FormatOption = "text",
) -> None:
    """Score an adapter on held-out REAL speech of the demo task set (WER/CER, BLEU/chrF, exact match)."""
    from speechless.instructions import DEMO_TASKS, demo_conversations
    from stages.stage3_llm import (
        EvalConfig,
        load_for_inference,
        manifest_rows,
        quantized,
        real_vectors,
        stage1_round_trip,
    )
    from stages.stage3_llm import evaluate as run_eval

    fmt = check_format(fmt)
    lm, record, _ = load_for_inference(model)
    rows = demo_conversations(manifest.parent / "sentences.jsonl", manifest_rows(manifest), split, list(DEMO_TASKS), voices, 0)
    clips = real_vectors(lm, rows, lm.encoder_cfg)
    rvq, levels = stage1_round_trip(record, quantize)
    if rvq is not None:
        clips = quantized(rvq, clips, levels)
    result = run_eval(lm, rows, clips, EvalConfig())
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
    from speechless.errors import UsageError
    from stages.stage3_llm import answer_requests, load_for_inference, stage1_round_trip

    if audio is None and not text:
        raise UsageError("chat: give --audio FILE and/or --text 'question'")
    if audio is not None and not audio.is_file():
        raise UsageError(f"--audio {audio}: file not found")
    lm, record, _ = load_for_inference(model)
    request = {"text": (text or "Transcribe the audio.") + ("\n" if audio else ""), "audio": str(audio) if audio else None}
    emit(answer_requests(lm, [request], max_new_tokens, 1, *stage1_round_trip(record, quantize))[0])
