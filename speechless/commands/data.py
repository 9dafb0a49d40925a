"""`speechless data ...`: build a synthetic corpus, import a Hugging Face dataset or the Asterisk prompts, validate a
manifest."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from speechless.commands.options import ConfigOption, FormatOption, SetOption, check_format
from speechless.core.config import load_config
from speechless.core.errors import UsageError
from speechless.core.io import read_json
from speechless.core.log import emit
from speechless.data.manifest import read_manifest, summarize, validate_manifest

app = typer.Typer(
    no_args_is_help=True,
    help="Build, import and validate speech corpora (JSONL manifests: id, audio_filepath, duration, text, split, ...).",
)


def _summary_lines(manifest: Path, summary: dict) -> str:
    lines = [f"{manifest}: {summary['utterances']} utterances, {summary['hours']:.3f} h"]
    for split, stats in summary["splits"].items():
        lines.append(f"  {split}: {stats['utterances']} utterances, {stats['seconds']:.1f} s ({stats['hours']:.3f} h)")
    return "\n".join(lines)


@app.command()
def synth(
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder (resumable: re-run to finish an interrupted run).")] = Path(
        "data/demo_synth"
    ),
    fmt: FormatOption = "text",
) -> None:
    """Synthesize a speech corpus with espeak-ng voices, split by sentence into train/dev/test.

    Sentences come from a template grammar (Swahili or English), each with an English translation.

    Writes OUT/all.jsonl, OUT/{train,dev,test}.jsonl, OUT/sentences.jsonl, OUT/audio/, OUT/resolved_config.yaml.

    Prints the manifest path (--format json: counts and durations per split). Needs espeak-ng (apt-get install espeak-ng).
    """
    from speechless.data.synth import SynthConfig, synthesize_from_config

    fmt = check_format(fmt)
    cfg = load_config(SynthConfig, config, overrides or [])
    manifest = synthesize_from_config(cfg, out)
    if fmt == "json":
        emit({"manifest": str(manifest), **summarize(read_manifest(manifest))}, "json")
    else:
        emit(str(manifest))


@app.command("import")
def import_(
    config: Annotated[Path, typer.Option("-c", "--config", help="Import config YAML, e.g. data_manifests/twi/waxal_aka_asr.yaml.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for audio/ and the manifests (resumable).")],
    overrides: SetOption = None,
    fmt: FormatOption = "text",
) -> None:
    """Import a speech dataset (Hub id, save_to_disk folder or metadata table) as 16 kHz mono wav + manifests.

    Writes OUT/all.jsonl, OUT/<split>.jsonl, OUT/audio/<split>/*.wav, OUT/resolved_config.yaml.

    OUT/import_report.json counts rows written, resumed and skipped (with reasons) per source split.

    Prints the manifest path (--format json: counts and durations per split).
    """
    from speechless.data.hf_import import ImportConfig, import_hf_dataset

    fmt = check_format(fmt)
    cfg = load_config(ImportConfig, config, overrides or [])
    manifest = import_hf_dataset(cfg, out)
    if fmt == "json":
        report = read_json(manifest.parent / "import_report.json")
        emit({"manifest": str(manifest), **summarize(read_manifest(manifest)), "report": report["splits"]}, "json")
    else:
        emit(str(manifest))


@app.command()
def prompts(
    out: Annotated[Path, typer.Option("--out", help="Output folder for audio/ and the manifests (resumable).")],
    config: ConfigOption = None,
    overrides: SetOption = None,
    fmt: FormatOption = "text",
) -> None:
    """Import Debian's Asterisk prompt recordings (real speech: en, es, fr, it; one speaker each) as 16 kHz wav.

    Needs asterisk-core-sounds-XX and asterisk-core-sounds-XX-g722 (scripts/install.sh installs them).

    Split by prompt, the same in every language; each row carries the prompt's text in the other languages.

    Writes OUT/all.jsonl, OUT/{train,dev,test}.jsonl, OUT/sentences.jsonl, OUT/audio/<lang>/, OUT/resolved_config.yaml.

    OUT/import_report.json counts utterances, minutes and dropped entries (with reasons) per language.

    Prints the manifest path (--format json: counts and durations per split, and the report).
    """
    from speechless.data.prompts import PromptsConfig, import_prompts

    fmt = check_format(fmt)
    cfg = load_config(PromptsConfig, config, overrides or [])
    manifest = import_prompts(cfg, out)
    if fmt == "json":
        report = read_json(manifest.parent / "import_report.json")
        emit({"manifest": str(manifest), **summarize(read_manifest(manifest)), "report": report}, "json")
    else:
        emit(str(manifest))


@app.command()
def validate(
    manifest: Annotated[Path, typer.Argument(help="JSONL manifest to check.")],
    check_audio: Annotated[
        bool, typer.Option("--check-audio", help="Also decode every audio file and compare its length with 'duration' (0.1 s tolerance).")
    ] = False,
    fmt: FormatOption = "text",
) -> None:
    """Check a manifest and list EVERY problem (line number and field); exit 2 if there is any.

    Checks: JSON syntax; required fields (id, audio_filepath, duration, text, split) and their types.

    Also: positive durations, unique ids, audio files that exist (relative paths are read from the manifest's folder).

    A clean manifest prints its utterances and hours per split.
    """
    fmt = check_format(fmt)
    problems = validate_manifest(manifest, check_audio=check_audio)
    if problems:
        if fmt == "json":
            emit({"manifest": str(manifest), "ok": False, "problems": [asdict(problem) for problem in problems]}, "json")
        else:
            emit("\n".join(problem.format(manifest) for problem in problems))
        lines = len({problem.line for problem in problems})
        raise UsageError(f"{manifest}: {len(problems)} problem(s) on {lines} line(s), listed on stdout; fix them and re-run")
    summary = summarize(read_manifest(manifest))
    if fmt == "json":
        emit({"manifest": str(manifest), "ok": True, **summary}, "json")
    else:
        emit(_summary_lines(manifest, summary))
