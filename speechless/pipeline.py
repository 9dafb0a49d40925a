"""The whole Speechless pipeline in one run folder: data -> [encoder] -> stage 1 -> stage 2 -> stage 3 -> report.

Each step is an ordinary stage recipe (`stages/`) whose inputs the pipeline wires to the exact output of the step
before it. A step is skipped when its previous result in this run folder was made from the same resolved config and
the same upstream revisions (a content hash, `stamp`), unless forced; a step that was interrupted is simply run again
and its recipe resumes from its own `work/` state. `RUN_DIR/pipeline.json` records, per step, the stamp, the output
revision (sha256 of the step's main output file), the wall time and any pushed store version.

The `encoder` step is optional (config section `encoder`, None = no step): it trains a Gemma 4 audio encoder on the
corpus's train split (`stages/stage0_encoder.py`) and stage 1 then reads it as `encoder.source`, the way it reads a
real Gemma 4 checkpoint folder; a new encoder revision makes stage 1 (and so everything after it) run again.

    RUN_DIR/
      pipeline.json  metrics.json  resolved_config.yaml  report/index.html (+ PNGs)
      corpus/  [encoder/]  stage1/  stage2/  stage3_base/ (demo: the text-pretrained base)  stage3/
      [stage3_seeds/seed<N>/ (stage 3 again at each of `seeds`) + metrics.json (the claim check per seed)]
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator

from speechless.core import distributed, log
from speechless.core.config import Section, read_yaml, to_yaml
from speechless.core.errors import UsageError
from speechless.core.io import read_json, sha256_file, write_json, write_text
from speechless.core.runs import NOT_FINGERPRINTED, LoggerNames, RunConfig
from speechless.core.store import StoreConfig
from speechless.data.hf_import import ImportConfig
from speechless.data.prompts import PromptsConfig
from speechless.data.synth import SynthConfig
from stages.stage0_encoder import EncoderPretrainConfig
from stages.stage1_rvq import Stage1Config
from stages.stage2_t2s import Stage2Config
from stages.stage3_llm import Stage3Config


class PipelineRunConfig(Section):
    out_dir: str = "runs/demo"
    """The run folder holding every step's output, the pipeline state, the gathered metrics and the report."""
    push: bool = False
    """Push each stage's checkpoint to the store (`stageN@vK`) when it is (re)made; downstream steps then read that
    exact version. A skipped step is not pushed again."""
    loggers: LoggerNames = ["json"]
    """Extra training-curve sinks for EVERY step (added to each stage's own `run.loggers`): 'tensorboard' writes event
    files into each step's `work/tensorboard/` (`tensorboard --logdir RUN_DIR`). Never makes a step run again."""


class PipelineDataConfig(Section):
    source: Literal["synth", "prompts", "import", "manifest"] = "synth"
    """'synth': speak template sentences with espeak-ng (the offline demo); 'prompts': Debian's Asterisk prompt
    recordings (real speech, `prompts`); 'import': Hugging Face datasets (`imports`), merged into one manifest;
    'manifest': an existing manifest (`manifest`)."""
    synth: SynthConfig = SynthConfig()
    """With source 'synth': the corpus to synthesize."""
    prompts: PromptsConfig = PromptsConfig()
    """With source 'prompts': the languages and filters of the Asterisk prompts import (`speechless data prompts`)."""
    imports: list[ImportConfig] = Field(default_factory=list)
    """With source 'import': the datasets to import (each into `corpus/<n>/`) and merge into `corpus/all.jsonl`."""
    manifest: str | None = None
    """With source 'manifest': the manifest (JSONL) to use as it is."""


class PipelineConfig(Section):
    """`speechless run`: every stage's full config, plus how the run folder is laid out. The pipeline sets each
    stage's `run.out_dir`, `run.push` and its input (`stage1.data.manifest`, `stage2.data.stage1`, ...) itself."""

    run: PipelineRunConfig = PipelineRunConfig()
    data: PipelineDataConfig = PipelineDataConfig()
    encoder: EncoderPretrainConfig | None = None
    """Optional step before stage 1: train the Gemma 4 audio encoder on the corpus's train split (`speechless encoder
    pretrain`); stage 1's `encoder.source` is then set to its output folder. None = no such step (stage 1 reads its own
    `encoder.source`)."""
    stage1: Stage1Config = Stage1Config()
    stage2: Stage2Config = Stage2Config()
    stage3: Stage3Config = Stage3Config()
    seeds: list[int] = []
    """Further stage-3 seeds: stage 3 again at each (its `run.seed`: the adapters' initial weights, the data order; and
    stage 2's sampling of the training speech, `data.generate.seed`), each in `stage3_seeds/seed<N>/`, with the same
    base. The step's metrics give the claim check at every seed (stage 3's own included), the means, and at how many
    seeds the claim holds. [] = stage 3 once."""
    store: StoreConfig = StoreConfig()
    """The store every stage pushes to and reads from (each stage's own `store` section is set to this one)."""

    @model_validator(mode="after")
    def _encoder_step_fits(self) -> PipelineConfig:
        if self.encoder is not None and self.stage1.encoder.kind != "gemma4":
            raise ValueError(f"the encoder step trains a Gemma 4 stand-in, but stage1.encoder.kind is {self.stage1.encoder.kind}; "
                             "set encoder=null to put stage 1 on that encoder")
        return self


@dataclass
class Step:
    """One pipeline step: its name, what it writes, and how to configure and run it given the upstream outputs."""

    name: str
    folder: str
    """Sub-folder of the run folder."""
    output: str
    """The file (relative to `folder`) whose sha256 is the step's revision."""
    configure: Callable[[PipelineConfig, Path, dict], Section | None]
    """(pipeline config, step folder, upstream results) -> the step's resolved config (None for the data step)."""
    execute: Callable[[PipelineConfig, Section | None, Path], dict]
    """Runs the step; returns a summary (it may hold `pushed`)."""
    upstream: str | None


# ------------------------------------------------------------------------------------------------------ the steps


def _step_run(cfg: PipelineConfig, run: RunConfig, folder: Path) -> RunConfig:
    """A stage's run section in the pipeline: its folder, the pipeline's push setting, its loggers and the pipeline's."""
    loggers = list(dict.fromkeys([*run.loggers, *cfg.run.loggers]))
    return run.model_copy(update={"out_dir": str(folder), "push": cfg.run.push, "loggers": loggers})


def _data_configure(cfg: PipelineConfig, folder: Path, upstream: dict) -> Section:
    if cfg.data.source == "synth":
        return cfg.data.synth
    if cfg.data.source == "prompts":
        return cfg.data.prompts
    if cfg.data.source == "import":
        if not cfg.data.imports:
            raise UsageError("data.imports: empty; list at least one dataset to import (data_manifests/twi/*.yaml show the fields)")
        return PipelineDataConfig(source="import", imports=cfg.data.imports)
    if not cfg.data.manifest or not Path(cfg.data.manifest).is_file():
        raise UsageError(f"data.manifest {cfg.data.manifest!r}: manifest file not found (source 'manifest' needs one)")
    return PipelineDataConfig(source="manifest", manifest=str(Path(cfg.data.manifest).resolve()))


def _data_execute(cfg: PipelineConfig, step_cfg: Section | None, folder: Path) -> dict:
    from speechless.data.manifest import read_manifest, write_manifest

    if cfg.data.source == "synth":
        from speechless.data.synth import synthesize_from_config

        synthesize_from_config(cfg.data.synth, folder)
    elif cfg.data.source == "prompts":  # like synth: sentences.jsonl lands beside all.jsonl, for stage 3's tasks
        from speechless.data.prompts import import_prompts

        import_prompts(cfg.data.prompts, folder)
    else:
        if cfg.data.source == "import":
            from speechless.data.hf_import import import_hf_dataset

            manifests = [import_hf_dataset(item, folder / f"{number}") for number, item in enumerate(cfg.data.imports)]
        else:
            manifests = [Path(cfg.data.manifest)]
        entries = [entry for manifest in manifests for entry in read_manifest(manifest)]
        try:
            write_manifest(folder / "all.jsonl", entries)
        except ValueError as exc:
            raise UsageError(f"data: merging {len(manifests)} manifest(s): {exc}; give each source distinct ids") from exc
    return {"manifest": str(folder / "all.jsonl")}


def _encoder_configure(cfg: PipelineConfig, folder: Path, upstream: dict) -> Section:
    return cfg.encoder.model_copy(update={
        "run": _step_run(cfg, cfg.encoder.run, folder),
        "data": cfg.encoder.data.model_copy(update={"manifest": upstream["data"]["summary"]["manifest"]}),
        "store": cfg.store})


def _encoder_execute(cfg: PipelineConfig, step_cfg: Section | None, folder: Path) -> dict:
    from stages.stage0_encoder import train

    return train(step_cfg)


def _stage1_configure(cfg: PipelineConfig, folder: Path, upstream: dict) -> Section:
    """Stage 1 reads the corpus, and the encoder this run trained when it has an encoder step (its folder: a
    standalone Gemma4AudioModel, loaded like any Gemma 4 checkpoint folder)."""
    encoder = cfg.stage1.encoder
    if "encoder" in upstream:
        encoder = encoder.model_copy(update={"source": upstream["encoder"]["folder"], "revision": None})
    return cfg.stage1.model_copy(update={
        "run": _step_run(cfg, cfg.stage1.run, folder),
        "data": cfg.stage1.data.model_copy(update={"manifest": upstream["data"]["summary"]["manifest"]}),
        "encoder": encoder,
        "store": cfg.store})


def _stage1_execute(cfg: PipelineConfig, step_cfg: Section | None, folder: Path) -> dict:
    from stages.stage1_rvq import train

    return train(step_cfg)


def _stage2_configure(cfg: PipelineConfig, folder: Path, upstream: dict) -> Section:
    stage1 = upstream["stage1"]
    return cfg.stage2.model_copy(update={
        "run": _step_run(cfg, cfg.stage2.run, folder),
        "data": cfg.stage2.data.model_copy(update={"stage1": stage1.get("pushed") or stage1["folder"]}),
        "store": cfg.store})


def _stage2_execute(cfg: PipelineConfig, step_cfg: Section | None, folder: Path) -> dict:
    from stages.stage2_t2s import train

    return train(step_cfg)


def _stage3_configure(cfg: PipelineConfig, folder: Path, upstream: dict) -> Section:
    """Stage 3 reads the exact stage-1 and stage-2 outputs of this run (and the corpus for real speech); the demo's
    text-pretrained base lives beside it in the run folder."""
    stage1, stage2 = upstream["stage1"], upstream["stage2"]
    return cfg.stage3.model_copy(update={
        "run": _step_run(cfg, cfg.stage3.run, folder),
        "data": cfg.stage3.data.model_copy(update={"stage1": stage1.get("pushed") or stage1["folder"],
                                                   "stage2": stage2.get("pushed") or stage2["folder"],
                                                   "manifest": upstream["data"]["summary"]["manifest"]}),
        "pretrain": cfg.stage3.pretrain.model_copy(update={"out_dir": str(folder.parent / "stage3_base")}),
        "store": cfg.store})


def _stage3_execute(cfg: PipelineConfig, step_cfg: Section | None, folder: Path) -> dict:
    from stages.stage3_llm import train

    return train(step_cfg)


class SeedsStepConfig(Section):
    """The `stage3_seeds` step: stage 3's resolved config (run folder and seed set per repeat) and the seeds."""

    stage3: Stage3Config
    seeds: list[int]


def _seeds_configure(cfg: PipelineConfig, folder: Path, upstream: dict) -> Section:
    stage3 = _stage3_configure(cfg, folder.parent / "stage3", upstream)
    return SeedsStepConfig(stage3=stage3.model_copy(update={"run": stage3.run.model_copy(update={"push": False})}),
                           seeds=[seed for seed in cfg.seeds if seed != cfg.stage3.run.seed])


def seed_config(stage3: Stage3Config, folder: Path, seed: int) -> Stage3Config:
    """Stage 3's config for one repeat: its own run folder, the seed for the adaptation and stage 2's sampling."""
    return stage3.model_copy(update={
        "run": stage3.run.model_copy(update={"seed": seed, "out_dir": str(folder / f"seed{seed}")}),
        "data": stage3.data.model_copy(update={"generate": stage3.data.generate.model_copy(update={"seed": seed})})})


def finished_with(out: Path, cfg: Section) -> bool:
    """Whether the run folder `out` holds a finished run (metrics.json) of `cfg`, whatever its loggers."""
    resolved = out / "resolved_config.yaml"
    return (out / "metrics.json").is_file() and resolved.is_file() and \
        _without_loggers(read_yaml(resolved)) == _without_loggers(yaml.safe_load(to_yaml(cfg)))


def _seeds_execute(cfg: PipelineConfig, step_cfg: Section | None, folder: Path) -> dict:
    """Stage 3 at every further seed (a repeat already finished with the same config is read, not run again), then
    the claim check of each seed and their summary in `stage3_seeds/metrics.json`."""
    from speechless.core.metrics import seeds_summary
    from stages.stage3_llm import train

    per_seed = {str(cfg.stage3.run.seed): read_json(Path(step_cfg.stage3.run.out_dir) / "metrics.json")["eval"]}
    for seed in step_cfg.seeds:
        seed_cfg = seed_config(step_cfg.stage3, folder, seed)
        out = Path(seed_cfg.run.out_dir)
        done = finished_with(out, seed_cfg)
        if done:
            log.info(f"pipeline stage3_seeds: seed {seed} already finished with this config")
        per_seed[str(seed)] = read_json(out / "metrics.json")["eval"] if done else train(seed_cfg)["eval"]
    summary = seeds_summary(per_seed)
    write_json(folder / "metrics.json", {"eval": summary})
    log.info(f"stage 3 over {len(per_seed)} seeds: the claim holds at {summary['holds_at']}; mean ratio to the topline "
             + ", ".join(f"{t} {v}" for t, v in summary["mean_ratio_to_topline"].items()))
    return {"out_dir": str(folder)}


STEPS = [
    Step("data", "corpus", "all.jsonl", _data_configure, _data_execute, None),
    Step("stage1", "stage1", "model.safetensors", _stage1_configure, _stage1_execute, "data"),
    Step("stage2", "stage2", "model.safetensors", _stage2_configure, _stage2_execute, "stage1"),
    Step("stage3", "stage3", "adapter.safetensors", _stage3_configure, _stage3_execute, "stage2"),
]
ENCODER_STEP = Step("encoder", "encoder", "model.safetensors", _encoder_configure, _encoder_execute, "data")
SEEDS_STEP = Step("stage3_seeds", "stage3_seeds", "metrics.json", _seeds_configure, _seeds_execute, "stage3")


def pipeline_steps(cfg: PipelineConfig) -> list[Step]:
    """The steps of a run: STEPS, with the encoder step between data and stage 1 when the config has one, and the
    stage-3 repeats at the end when it asks for further seeds."""
    from dataclasses import replace

    steps = list(STEPS) if cfg.encoder is None else [STEPS[0], ENCODER_STEP, replace(STEPS[1], upstream="encoder"), *STEPS[2:]]
    return steps + ([SEEDS_STEP] if cfg.seeds else [])


# ------------------------------------------------------------------------------------------------------ planning


def step_stamp(step: Step, step_cfg: Section | None, upstream_revisions: dict[str, str]) -> str:
    """Content hash of what a step's output depends on: its resolved config (minus push/store settings, which do not
    change the output), minus its loggers, and the output revisions of every step before it (stage 3 reads stage 1 and the corpus too)."""
    data = step_cfg.model_dump(mode="json", exclude={"run": NOT_FINGERPRINTED, "store": True}) if step_cfg else {}
    if "run" in data:
        data["run"].pop("out_dir", None)
    data = _without_loggers(data)  # also the stage-3 config inside the seeds step
    blob = json.dumps({"step": step.name, "config": data, "upstream": upstream_revisions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _without_loggers(data):
    """A dumped config without any `run.loggers` (at any depth): the loggers change no output."""
    if not isinstance(data, dict):
        return data
    return {key: ({k: v for k, v in value.items() if k != "loggers"} if key == "run" and isinstance(value, dict)
                  else _without_loggers(value)) for key, value in data.items()}


@dataclass
class PlannedStep:
    step: Step
    folder: Path
    config: Section | None
    stamp: str | None
    """None when it cannot be known yet (an upstream step will run first)."""
    action: str
    """'skip' (up to date), 'run', 'resume' (work state present), or 'run (forced)'."""
    reason: str


def _state_file(out: Path) -> Path:
    return out / "pipeline.json"


def read_state(out: Path) -> dict:
    path = _state_file(out)
    return read_json(path) if path.is_file() else {"steps": {}}


def _up_to_date(record: dict | None, folder: Path, output: str, stamp: str | None) -> bool:
    if not record or stamp is None or record.get("stamp") != stamp:
        return False
    target = folder / output
    return target.is_file() and sha256_file(target) == record.get("revision")


def plan_step(step: Step, cfg: PipelineConfig, out: Path, results: dict, state: dict, force: set[str]) -> PlannedStep:
    """What `run` would do for one step, given the results of the steps before it (known or planned)."""
    folder = out / step.folder
    upstream = results.get(step.upstream) if step.upstream else None
    if step.upstream and upstream is None:
        return PlannedStep(step, folder, None, None, "run", f"after {step.upstream} (re)runs")
    step_cfg = step.configure(cfg, folder, results)
    stamp = step_stamp(step, step_cfg, {name: result["revision"] for name, result in results.items()})
    record = state["steps"].get(step.name)
    if step.name in force:
        return PlannedStep(step, folder, step_cfg, stamp, "run (forced)", "--force")
    if _up_to_date(record, folder, step.output, stamp):
        return PlannedStep(step, folder, step_cfg, stamp, "skip", f"up to date (revision {record['revision'][:12]})")
    if (folder / "work").is_dir() or (step.name == "data" and folder.is_dir()):
        return PlannedStep(step, folder, step_cfg, stamp, "resume", "unfinished or changed output in the folder: resumes where it stopped")
    return PlannedStep(step, folder, step_cfg, stamp, "run", "no output yet" if record is None else "config or upstream changed")


def _result(record: dict, folder: Path) -> dict:
    return {"revision": record["revision"], "folder": str(folder), "pushed": record.get("pushed"), "summary": record.get("summary", {})}


def steps_until(cfg: PipelineConfig, until: str | None) -> list[Step]:
    """The pipeline's steps, up to and including `until` (None = all)."""
    steps = pipeline_steps(cfg)
    if until is None:
        return steps
    names = [step.name for step in steps]
    if until not in names:
        raise UsageError(f"--until {until}: no such step; steps are {', '.join(names)}")
    return steps[: names.index(until) + 1]


def plan(cfg: PipelineConfig, force: set[str] | None = None, until: str | None = None) -> list[PlannedStep]:
    """The dry-run plan: every step with its action, without running anything."""
    out = Path(cfg.run.out_dir)
    state = read_state(out)
    force = _check_force(force, cfg)
    results: dict = {}
    planned = []
    for step in steps_until(cfg, until):
        item = plan_step(step, cfg, out, results, state, force)
        planned.append(item)
        if item.action == "skip":
            results[step.name] = _result(state["steps"][step.name], item.folder)
    return planned


def _check_force(force: set[str] | None, cfg: PipelineConfig) -> set[str]:
    force = set(force or ())
    names = [step.name for step in pipeline_steps(cfg)]
    unknown = sorted(force - set(names))
    if unknown:
        hint = " (this config has no encoder section)" if unknown[0] == "encoder" else ""
        raise UsageError(f"--force {unknown[0]}: no such step{hint}; steps are {', '.join(names)}")
    return force


# ------------------------------------------------------------------------------------------------------ running


def run_pipeline(cfg: PipelineConfig, force: set[str] | None = None, report: bool = True, until: str | None = None) -> dict:
    """Run every step in order (skipping up-to-date ones), gather metrics, write the report; returns the state.
    With `until`, the steps after that one are left out (e.g. 'stage2': corpus, stage 1 and stage 2 only)."""
    if distributed.env().world_size > 1:
        raise UsageError("speechless run is one process (its data step and pipeline.json would be written by every rank); "
                         "launch it without torchrun, or the stage commands under torchrun one after the other "
                         "(README: Several processes)")
    force = _check_force(force, cfg)
    steps = steps_until(cfg, until)
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "resolved_config.yaml", to_yaml(cfg))
    state = read_state(out)
    results: dict = {}
    started = time.time()
    for step in steps:
        item = plan_step(step, cfg, out, results, state, force)
        record = state["steps"].get(step.name)
        if item.action == "skip":
            log.info(f"pipeline {step.name}: skipped: {item.reason}")
            results[step.name] = _result(record, item.folder)
            continue
        if item.action == "run (forced)" and (item.folder / "work").is_dir():
            import shutil

            shutil.rmtree(item.folder / "work")
        log.info(f"pipeline {step.name}: {item.action}: {item.reason}")
        tick = time.time()
        summary = step.execute(cfg, item.config, item.folder)
        revision = sha256_file(item.folder / step.output)
        record = {"stamp": item.stamp, "revision": revision, "seconds": round(time.time() - tick, 1),
                  "pushed": summary.get("pushed") if isinstance(summary, dict) else None,
                  "summary": {k: v for k, v in summary.items() if k in ("manifest", "out_dir", "pushed")}}
        state["steps"][step.name] = record
        write_json(_state_file(out), state)  # after every step: a later interruption keeps the finished ones
        results[step.name] = _result(record, item.folder)
        log.info(f"pipeline {step.name}: done in {record['seconds']:.0f} s (revision {revision[:12]})")
    state["last_run_seconds"] = round(time.time() - started, 1)
    write_json(_state_file(out), state)
    gather_metrics(out)
    if report:
        from speechless.core.report import write_report

        write_report(out)
    return state


def gather_metrics(out: Path) -> dict:
    """RUN_DIR/metrics.json: every stage's `eval` block under its step name, plus the step revisions and times."""
    state = read_state(out)
    gathered: dict = {"steps": {name: {k: rec.get(k) for k in ("revision", "seconds", "pushed")}
                                for name, rec in state["steps"].items()}}
    for step in [ENCODER_STEP, *STEPS[1:], SEEDS_STEP]:
        metrics_file = out / step.folder / "metrics.json"
        if metrics_file.is_file():
            gathered[step.name] = read_json(metrics_file).get("eval", {})
    write_json(out / "metrics.json", gathered)
    return gathered
