"""`speechless stage2 train|generate|eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from speechless.commands.options import ConfigOption, FormatOption, SetOption, check_format, load_run_config
from speechless.core.log import emit

app = typer.Typer(no_args_is_help=True)

ModelOption = Annotated[str, typer.Option("--model", "-m", help="Stage-2 checkpoint folder or store reference (stage2@v1, stage2@latest).")]
Stage1Option = Annotated[Optional[str], typer.Option("--stage1", help="The stage-1 version the codes must belong to (folder or stage1@vN): refused if the model was trained on another.")]
StoreRootOption = Annotated[Optional[Path], typer.Option("--store-root", help="Local store folder (default: $SPEECHLESS_STORE or ./store).")]


def generate_settings(temperature: float, top_k: int, max_seconds: float, batch_size: int, speaker: Optional[str], seed: int,
                      guidance: float = 1.0):
    from speechless.core.config import validate
    from speechless.t2s.generate import GenerateConfig

    return validate(GenerateConfig, dict(temperature=temperature, top_k=top_k, max_seconds=max_seconds, batch_size=batch_size,
                                         speaker=speaker, seed=seed, guidance=guidance), "generation options")


TemperatureOption = Annotated[float, typer.Option("--temperature", help="0 = greedy (may loop on a weak model); > 0 = sampling (seeded).")]
TopKOption = Annotated[int, typer.Option("--top-k", help="With sampling: only the k most likely codes (0 = all).")]
GuidanceOption = Annotated[float, typer.Option("--guidance", help="Classifier-free guidance weight (1 = off; > 1 needs a model trained with model.unconditional_prob > 0).")]
MaxSecondsOption = Annotated[float, typer.Option("--max-seconds", help="Cap on generated speech per text chunk (seconds).")]
SpeakerOption = Annotated[Optional[str], typer.Option("--speaker", help="Voice (a training speaker); default: the model's first.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Sampling seed.")]


@app.command()
def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (overrides run.out_dir).")] = None,
    push: Annotated[bool, typer.Option("--push", help="Push the finished checkpoint to the store as the next stage2@vN.")] = False,
    fmt: FormatOption = "text",
) -> None:
    """Train the text -> semantic-token model on a stage-1 version's token JSONL, train the CTC probe, and measure the
    round trip on held-out sentences (metrics.json `eval`).

    Re-running the same command resumes from the last checkpoint. Example:
    speechless stage2 train -c configs/stage2/demo.yaml --set data.stage1=stage1@v1
    """
    from stages.stage2_t2s import Stage2Config
    from stages.stage2_t2s import train as run_train

    fmt = check_format(fmt)
    cfg = load_run_config(Stage2Config, config, set_, out, push)
    summary = run_train(cfg)
    if summary["eval"] is None:  # a rank > 0 of a torchrun job: rank 0 reports
        return
    if fmt == "json":
        emit(summary, "json")
    else:
        ev = summary["eval"]
        emit(f"{summary['out_dir']}\nprobe CER real {ev['probe_cer_real']:.4f}  generated {ev['probe_cer_generated']:.4f}  "
             f"duration ratio {ev['duration']['ratio_mean']:.3f}  DTW centred cosine {ev['dtw_centered_cosine']}"
             + (f"\npushed {summary['pushed']}" if summary["pushed"] else ""))


@app.command()
def generate(
    input_path: Annotated[Path, typer.Option("--input", "-i", help="Texts: JSONL rows with 'text' (optional 'id', 'speaker'), or a .txt file with one text per line.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Token JSONL to write (stage-1 row format). Interrupted runs resume from OUTPUT.partial.")],
    model: ModelOption = "stage2@latest",
    stage1: Stage1Option = None,
    weights: Annotated[str, typer.Option("--weights", help="final or best.")] = "final",
    temperature: TemperatureOption = 0.7,
    top_k: TopKOption = 30,
    guidance: GuidanceOption = 1.0,
    max_seconds: MaxSecondsOption = 30.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts generated together.")] = 64,
    speaker: SpeakerOption = None,
    seed: SeedOption = 0,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Skip texts that cannot be converted (listed in OUTPUT.skipped.jsonl) instead of stopping.")] = False,
    store_root: StoreRootOption = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, ... (default cpu).")] = None,
    fmt: FormatOption = "text",
) -> None:
    """Convert a text corpus into stage-2 semantic tokens, with a progress bar; re-running resumes where it stopped."""
    from speechless.core.store import store_config
    from speechless.t2s.generate import generate_file

    fmt = check_format(fmt)
    gen = generate_settings(temperature, top_k, max_seconds, batch_size, speaker, seed, guidance)
    summary = generate_file(model, input_path, output, gen, weights, stage1, store_config(root=store_root), device, skip_invalid)
    emit(summary if fmt == "json" else f"{summary['output']}: {summary['rows']} rows ({summary['generated']} generated, "
         f"{summary['resumed']} kept from an earlier run, {summary['skipped']} skipped)", fmt)


@app.command("eval")
def evaluate(
    model: ModelOption,
    stage1: Annotated[Optional[str], typer.Option("--stage1", help="Stage-1 folder or store ref holding the real tokens (default: the one the model records).")] = None,
    split: Annotated[str, typer.Option("--split", help="Stage-1 token split to run the round trip on.")] = "test",
    manifest: Annotated[Optional[str], typer.Option("--manifest", help="Manifest with speaker ids (default: stage 1's).")] = None,
    weights: Annotated[str, typer.Option("--weights", help="final or best.")] = "final",
    max_utterances: Annotated[Optional[int], typer.Option("--max-utterances", help="Use at most this many utterances.")] = None,
    speakers: Annotated[str, typer.Option("--speakers", help="each (every utterance in its own speaker) or default.")] = "each",
    temperature: TemperatureOption = 0.7,
    top_k: TopKOption = 30,
    guidance: GuidanceOption = 1.0,
    max_seconds: MaxSecondsOption = 30.0,
    seed: SeedOption = 0,
    store_root: StoreRootOption = None,
    fmt: FormatOption = "text",
) -> None:
    """The semantic round trip of a stage-2 checkpoint: probe CER on real vs generated tokens, durations, code usage,
    DTW cosine of decoded vectors."""
    from speechless.core.config import validate
    from speechless.core.store import store_config
    from speechless.t2s.roundtrip import EvalConfig, evaluate_checkpoint

    fmt = check_format(fmt)
    gen = generate_settings(temperature, top_k, max_seconds, 64, None, seed, guidance)
    ev = validate(EvalConfig, dict(split=split, max_utterances=max_utterances, weights=weights, speakers=speakers), "eval options")
    metrics = evaluate_checkpoint(model, stage1, split, gen, ev, manifest, store_config(root=store_root))
    if fmt == "json":
        emit(metrics, "json")
    else:
        d = metrics["duration"]
        emit(f"split {metrics['split']}: {metrics['utterances']} utterances\n"
             f"probe CER real {metrics['probe_cer_real']:.4f}  generated {metrics['probe_cer_generated']:.4f}\n"
             f"frames real {d['real_frames_mean']:.1f}  generated {d['generated_frames_mean']:.1f}  capped {d['capped']}\n"
             f"DTW cosine {metrics['dtw_cosine']}  centred {metrics['dtw_centered_cosine']}")
