"""`speechless run` (the whole pipeline) and `speechless report RUN_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from speechless.commands.options import ConfigOption, FormatOption, SetOption, check_format, load_run_config
from speechless.core.log import emit


def run(
    config: ConfigOption = None,
    set_: SetOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (overrides run.out_dir).")] = None,
    force: Annotated[Optional[list[str]], typer.Option("--force", help="Re-run this step even if it is up to date (repeatable): data, stage1, stage2, ...")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (steps, inputs, outputs, what would be skipped) and run nothing.")] = False,
    no_report: Annotated[bool, typer.Option("--no-report", help="Do not write the HTML report at the end.")] = False,
    until: Annotated[Optional[str], typer.Option("--until", help="Stop after this step (e.g. stage2: corpus, stage 1 and stage 2 only).")] = None,
    fmt: FormatOption = "text",
) -> None:
    """Run the whole pipeline: data -> stage 1 -> stage 2 -> stage 3 -> report, in one run folder.

    A step whose output already exists for the same resolved config and the same upstream revision is skipped;
    an interrupted step resumes. Example: speechless run -c configs/pipeline/demo.yaml
    """
    from speechless.pipeline import PipelineConfig, plan, run_pipeline

    fmt = check_format(fmt)
    cfg = load_run_config(PipelineConfig, config, set_, out)
    if dry_run:
        steps = plan(cfg, set(force or ()), until)
        rows = [{"step": p.step.name, "action": p.action, "reason": p.reason, "output": str(p.folder / p.step.output),
                 "input": _input_of(p)} for p in steps]
        if fmt == "json":
            emit({"out_dir": cfg.run.out_dir, "steps": rows}, "json")
        else:
            emit("\n".join(f"{r['step']:<7} {r['action']:<13} {r['reason']}\n        in:  {r['input']}\n        out: {r['output']}"
                           for r in rows))
        return
    state = run_pipeline(cfg, set(force or ()), report=not no_report, until=until)
    if fmt == "json":
        emit(state, "json")
    else:
        lines = [f"{name:<7} {rec['revision'][:12]}  {rec['seconds']:>7.1f} s" + (f"  pushed {rec['pushed']}" if rec.get("pushed") else "")
                 for name, rec in state["steps"].items()]
        lines.append(f"total {state['last_run_seconds']:.1f} s; metrics: {Path(cfg.run.out_dir) / 'metrics.json'}")
        if not no_report:
            lines.append(f"report: {Path(cfg.run.out_dir) / 'report' / 'index.html'}")
        emit("\n".join(lines))


def _input_of(planned) -> str:
    cfg = planned.config
    if planned.step.name == "data" and cfg is not None:
        if hasattr(cfg, "voices"):
            spoken_by = f"{cfg.voices_per_sentence} of {len(cfg.voices)}" if cfg.voices_per_sentence else str(len(cfg.voices))
            return f"espeak-ng synthesis: {cfg.num_sentences} sentences x {spoken_by} voices ({cfg.language})"
        if hasattr(cfg, "min_words"):
            return f"Asterisk prompts (real speech): {', '.join(cfg.languages)}"
        return f"manifest {cfg.manifest}" if cfg.source == "manifest" else "import: " + ", ".join(i.dataset for i in cfg.imports)
    if cfg is None:
        return f"the output of {planned.step.upstream}"
    data = getattr(cfg, "data", None)
    for key in ("manifest", "stage2", "stage1"):
        if data is not None and getattr(data, key, None):
            return f"{key} {getattr(data, key)}"
    return "data config (see resolved_config.yaml)"


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `speechless run`.")],
    shot: Annotated[bool, typer.Option("--screenshot", help="Also render the page in headless Chromium to report/screenshot.png.")] = False,
) -> None:
    """Write RUN_DIR/report/index.html with PNG plots of every stage's results (and gather RUN_DIR/metrics.json)."""
    from speechless.core.report import screenshot, write_report
    from speechless.pipeline import gather_metrics

    if (run_dir / "pipeline.json").is_file():
        gather_metrics(run_dir)
    page = write_report(run_dir)
    emit(str(page))
    if shot:
        emit(str(screenshot(page, page.parent / "screenshot.png")))
