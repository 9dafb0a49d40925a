"""Stage 3 recipe: adapt an LLM to speech with synthetic speech only, and measure it on real speech.

Read top to bottom: config schema -> setup (stage-1 and stage-2 versions, checked against each other; the instruction
conversations: any conversation JSONL via `data.instructions`, or the demo task set built from the corpus; the base
LLM, for the demo first taught its tasks in text when `pretrain.enabled`) -> train the configured adapter on stage-2
speech of every user turn (decoded to 1024-d vectors with the stage-1 codebooks; loss on assistant tokens) and, when
asked in `compare`, the same recipe on REAL speech tokens of the same recordings (the real-speech topline) and other
adapter kinds -> evaluate each on held-out REAL speech through the model's own audio tower (per-task scores, text
perplexity before/after, the same requests as text; ratios to the topline) -> save the adapter only (+ lineage),
metrics, provenance and model card -> push `stage3@vN` (`finish_run`).

The library parts live in `speechless.llm.adapt` (data, training loop, evaluation, inference), `speechless.llm.model` (the
model), `speechless.llm.adapters` (its adapters) and `speechless.llm.base` (the base LLM). `work/` (caches, resume state,
compared variants) is never pushed.

Several processes (`torchrun --nproc_per_node N -m speechless stage3 train ...`): DDP over the adapter only, every rank
on its share of each global batch; speech synthesis and evaluation sharded by rank; rank 0 writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from speechless.core import distributed, log
from speechless.core.config import Section, to_yaml
from speechless.core.errors import UsageError
from speechless.core.io import read_json, sha256_file, write_json, write_jsonl, write_text
from speechless.core.loggers import open_loggers
from speechless.core.runs import RunConfig, config_fingerprint, utc_now
from speechless.core.store import StoreConfig
from speechless.core.training import finish_run, provenance
from speechless.data.manifest import corpus_line, corpus_record
from speechless.data.udhr import read_udhr, udhr_parallel
from speechless.llm.adapt import (
    EvalConfig,
    PretrainConfig,
    adapted_model,
    evaluate,
    load_base,
    manifest_rows,
    no_listening_baselines,
    perplexity,
    pretrain_base,
    quantized,
    ratio_to_topline,
    real_speech_conversations,
    real_vectors,
    speech_examples,
    stage1_encoder,
    synthetic_tokens,
    train_loop,
)
from speechless.llm.adapters import AdapterConfig
from speechless.llm.base import BaseConfig, check_text_lm_base
from speechless.llm.instructions import (
    DEMO_TASKS,
    demo_conversations,
    demo_labels,
    read_conversations,
    speech_parts,
    text_conversations,
)
from speechless.llm.model import SpeechLM
from speechless.llm.text_eval import udhr_perplexity
from speechless.speech.encoders import EncoderConfig
from speechless.speech.rvq import SpeechRVQ
from speechless.speech.tokens import Stage1, load_split, resolve_stage1
from speechless.t2s.generate import GenerateConfig

SYNTHETIC, TOPLINE, EXTRA = "synthetic_speech", "real_speech_topline", "synthetic_speech+text"
"""The speech sources a stage-3 model can learn from: stage-2 speech of the text (the product), real speech tokens of
the same recordings (the topline of a comparison), and stage-2 speech of the text plus extra text with no recording."""


class DataConfig(Section):
    stage1: str = "runs/demo/stage1"
    """Stage-1 version (folder or stage1@vN): its codebooks decode tokens to vectors, its encoder is the audio tower."""
    stage2: str = "runs/demo/stage2"
    """Stage-2 version (folder or stage2@vN) that speaks the user turns; refused if trained on another stage-1 version."""
    manifest: str = "runs/demo/corpus/all.jsonl"
    """Corpus manifest (JSONL): the recordings of the demo task set, recorded by sha256 in the provenance."""
    sentences: str | None = None
    """Demo sentences with their answers (None = `sentences.jsonl` beside the manifest)."""
    instructions: str | None = None
    """Training conversations JSONL (see speechless/llm/instructions.py); None = the demo task set of `train_split`."""
    eval_instructions: str | None = None
    """Held-out conversations JSONL whose speech parts carry real `audio` (relative to the file) and a `task`;
    None = the demo task set of `eval_split`."""
    tasks: list[str] = list(DEMO_TASKS)
    """Demo tasks: asr (transcribe), ast (translate to English), where/who (closed answers, exact match)."""
    train_split: str = "train"
    """Corpus split of the demo training conversations (and of the real stage-1 tokens of the topline)."""
    eval_split: str = "test"
    """Held-out split(s) of the demo task set, several joined by '+' (e.g. 'dev+test')."""
    voices_per_sentence: int = Field(2, ge=1)
    """Demo: training recordings (and stage-2 voices) per sentence."""
    eval_voices_per_sentence: int = Field(2, ge=1)
    """Demo: held-out recordings per sentence."""
    generate: GenerateConfig = GenerateConfig(max_seconds=20.0)
    """How stage 2 speaks the user turns (each in the voice of the recording it stands for)."""
    synthetic_draws: int = Field(1, ge=1)
    """Stage 2 speaks each user turn n times and the draw its CTC probe (trained on real stage-1 tokens) reads closest
    to the text is kept: n x the generation, no real speech. 1 = one draw, no probe needed."""
    extra_text_udhr: str | None = None
    """Extra training text with no recording, for the `synthetic_speech+text` variant (`compare.extra_text`): the
    Universal Declaration of Human Rights in this language (a UDHR file code: fra, spa, swh, ...), as transcribe and
    translate requests spoken by stage 2. None = no extra text."""
    extra_text_translation: str = "eng"
    """UDHR language of the extra text's translations (the ast answers), aligned by article."""
    extra_text_translation_language: str = "en"
    """The language code those translations are in, as the ast instruction names it (en, fr, ...)."""
    extra_text_max_words: int = Field(40, ge=1)
    """Extra-text passages longer than this many words are left out."""
    synthetic_levels: int | None = Field(None, ge=1)
    """Decode stage-2 speech from only its first L codebook levels (the coarse ones); None = all. Real speech (the
    topline, evaluation) always uses every level."""


class TrainConfig(Section):
    steps: int = Field(4000, ge=1)
    """Optimizer steps of each adapter."""
    batch_size: int = Field(16, ge=1)
    """Conversations per step (length-bucketed), across all processes."""
    learning_rate: float = Field(2e-4, gt=0.0)
    """Peak AdamW learning rate."""
    warmup_steps: int = Field(200, ge=0)
    """Linear warmup steps, then cosine decay to `min_lr_ratio` x peak."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Final learning rate as a share of the peak (0-1)."""
    checkpoint_every: int = Field(250, ge=1)
    """Resume checkpoint every N steps (in work/): a killed run restarts from the last one."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, slower)."""
    threads: int | None = Field(None, ge=1)
    """CPU threads (None = torch's default, all cores); on cores shared with other jobs 1 thread can be faster."""


class CompareConfig(Section):
    real_speech_topline: bool = False
    """Also train the same adapter(s) on REAL speech tokens of the same training recordings (the topline), and report
    each task's `ratio_to_topline`. Needs the training recordings' stage-1 tokens (split `data.train_split`)."""
    extra_text: bool = False
    """Also train the configured adapter on stage-2 speech of the training conversations PLUS the extra text
    (`data.extra_text_udhr`): whether text without recordings, spoken by stage 2, adds to what the recordings teach."""
    adapters: list[Literal["lora", "dus", "lora_all_positions", "dus_all_positions"]] = []
    """Adapter variants also trained and evaluated, with `adapter`'s other settings (the configured one is always
    trained; it is the product): lora, dus (speech-only as `adapter.speech_only` says), or either on every position
    (`*_all_positions`: text-only inputs change too, so the table shows what speech-only keeps of the text skills)."""


class Stage3Config(Section):
    run: RunConfig = RunConfig(out_dir="runs/demo/stage3")
    base: BaseConfig = BaseConfig()
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    compare: CompareConfig = CompareConfig()
    store: StoreConfig = StoreConfig()


# ------------------------------------------------------------------------------------------------------------ setup

@dataclass
class Setup:
    stage1: Stage1
    rvq: SpeechRVQ
    encoder_cfg: EncoderConfig
    encoder_sha: str
    train_rows: list[dict]
    eval_rows: list[dict]
    baselines: dict
    """What each closed task scores without listening (see `adapt.no_listening_baselines`)."""


def setup(cfg: Stage3Config, work: Path) -> Setup:
    """Stage 1 (codebooks + encoder), checked against the levels asked for, and the conversations (checked)."""
    stage1 = resolve_stage1(cfg.data.stage1, cfg.store)
    for lang in cfg.eval.udhr_languages:  # real text for the perplexity table: present before the slow steps
        read_udhr(lang)
    rvq = SpeechRVQ.load(stage1.folder)
    if (cfg.data.synthetic_levels or 0) > rvq.num_quantizers:
        raise UsageError(f"data.synthetic_levels={cfg.data.synthetic_levels}: stage 1 ({stage1.folder}) has "
                         f"{rvq.num_quantizers} codebook levels; set at most {rvq.num_quantizers}")
    encoder_cfg, encoder_sha = stage1_encoder(stage1.folder)
    need_demo = not (cfg.data.instructions and cfg.data.eval_instructions)
    manifest = manifest_rows(Path(cfg.data.manifest)) if need_demo else []
    sentences = Path(cfg.data.sentences) if cfg.data.sentences else Path(cfg.data.manifest).parent / "sentences.jsonl"

    def demo(split: str, voices: int) -> list[dict]:
        return demo_conversations(sentences, manifest, split, cfg.data.tasks, voices, cfg.run.seed)

    train_rows = read_conversations(cfg.data.instructions) if cfg.data.instructions else demo(cfg.data.train_split, cfg.data.voices_per_sentence)
    eval_rows = (real_speech_conversations(cfg.data.eval_instructions) if cfg.data.eval_instructions
                 else demo(cfg.data.eval_split, cfg.data.eval_voices_per_sentence))
    if distributed.group().is_main:
        write_jsonl(work / "data" / "train.jsonl", train_rows)
        write_jsonl(work / "data" / "eval.jsonl", eval_rows)
    log.info(f"conversations: {len(train_rows)} train, {len(eval_rows)} held-out")
    # the demo task set also knows each sentence's verb: the commonest answer for the verb is what hearing one word buys
    verbs = demo_labels(sentences, manifest, train_rows + eval_rows, "verb") if need_demo else None
    baselines = no_listening_baselines(train_rows, eval_rows, verbs, "verb")
    return Setup(stage1, rvq, encoder_cfg, encoder_sha, train_rows, eval_rows, baselines)


def extra_text_rows(cfg: Stage3Config, s: Setup) -> list[dict]:
    """The extra-text conversations (`data.extra_text_udhr`), spoken in the training conversations' speakers."""
    if not cfg.data.extra_text_udhr:
        raise UsageError("compare.extra_text: set data.extra_text_udhr to the UDHR language of the extra text (e.g. fra)")
    pairs = [(a, b) for a, b in udhr_parallel(cfg.data.extra_text_udhr, cfg.data.extra_text_translation)
             if len(a.split()) <= cfg.data.extra_text_max_words]
    speakers = sorted({p.get("speaker") for r in s.train_rows for p in speech_parts(r) if p.get("speaker")})
    return text_conversations(pairs, cfg.data.tasks, speakers, f"udhr-{cfg.data.extra_text_udhr}", cfg.data.extra_text_translation_language)


def speech_sources(cfg: Stage3Config, s: Setup, work: Path) -> tuple[dict[str, tuple[list[dict], dict]], dict]:
    """{source: (training conversations, {part: tokens})}: stage-2 speech of every user turn; (compare.real_speech_topline)
    the real stage-1 tokens of the same recordings; (compare.extra_text) stage-2 speech of those turns and of the extra
    text; with the stage-2 lineage record."""
    synthetic, stage2_record = synthetic_tokens(cfg.data.stage2, cfg.data.stage1, cfg.data.generate, cfg.data.synthetic_draws,
                                                s.train_rows, work, cfg.store, cfg.base.device)
    sources = {SYNTHETIC: (s.train_rows, synthetic)}
    if cfg.compare.real_speech_topline:
        sources[TOPLINE] = (s.train_rows, {r["id"]: r for r in load_split(s.stage1, cfg.data.train_split)})
    if cfg.compare.extra_text:
        extra = extra_text_rows(cfg, s)
        log.info(f"extra text: {len(extra)} conversations from the UDHR ({cfg.data.extra_text_udhr}), spoken by stage 2")
        # its own cache: the training turns keep exactly the speech the synthetic_speech variant learns from
        spoken, _ = synthetic_tokens(cfg.data.stage2, cfg.data.stage1, cfg.data.generate, cfg.data.synthetic_draws,
                                     extra, work / "extra_text", cfg.store, cfg.base.device)
        sources[EXTRA] = (s.train_rows + extra, {**synthetic, **spoken})
    return sources, stage2_record


# -------------------------------------------------------------------------------------------------------- train

def variant_folder(out: Path, name: str) -> Path:
    """Where variant `name` ("synthetic_speech/lora") of the stage-3 run in `out` keeps its checkpoints."""
    return out / "work" / "variants" / name.replace("/", "_")


def adapter_folder(out: Path, name: str, main_name: str) -> Path:
    """Where the stage-3 run in `out` saved variant `name`'s adapter: the run folder itself for the main model."""
    return out if name == main_name else variant_folder(out, name) / "adapter"


def variant_name(adapter: AdapterConfig) -> str:
    """lora / dus, with `_all_positions` when the adapter is not speech-only."""
    return adapter.kind + ("" if adapter.speech_only else "_all_positions")


def variant_adapter(adapter: AdapterConfig, variant: str) -> AdapterConfig:
    """`adapter` turned into a compared variant (see `CompareConfig.adapters`)."""
    kind, _, rest = variant.partition("_")
    return adapter.model_copy(update={"kind": kind, "speech_only": adapter.speech_only and rest != "all_positions"})


def train_variant(cfg: Stage3Config, s: Setup, base_cfg: BaseConfig, name: str, rows: list[dict], tokens: dict, variant: str,
                  levels: int | None, curves=None) -> tuple[SpeechLM, list[dict]]:
    """Train one adapter variant on the conversations `rows` spoken with `tokens` (decoded at `levels`); resumable.
    Its curve also goes to `curves` (`run.loggers`)."""
    adapter = variant_adapter(cfg.adapter, variant)
    model = adapted_model(base_cfg, s.encoder_cfg, s.encoder_sha, adapter, cfg.run.seed)
    examples = model.embed_audio_once(speech_examples(model, rows, tokens, s.rvq, levels=levels))
    fingerprint = f"{config_fingerprint(cfg)} {name} {model.dus_after}"
    history = train_loop(model, examples, cfg.train.steps, cfg.train.batch_size, cfg.train.learning_rate, cfg.train.warmup_steps,
                         variant_folder(Path(cfg.run.out_dir), name), fingerprint, cfg.run.seed, cfg.train.checkpoint_every,
                         name, cfg.train.gradient_checkpointing, cfg.train.min_lr_ratio, curves)
    return model, history


# ----------------------------------------------------------------------------------------------------- evaluate

def evaluate_variant(cfg: Stage3Config, s: Setup, model: SpeechLM, history: list[dict], clips: dict, base_ppl: float,
                     base_udhr: dict, base_text: dict, levels: int | None, main: bool, main_variant: bool) -> dict:
    """Scores on held-out real speech (and, for the configured adapter kind, with the real input through stage 1 at
    the levels the model's training speech had); the same requests as text; text perplexity before/after."""
    result = {"adapter": model.adapter.model_dump(mode="json"), "parameters": model.parameter_counts(), "history": history,
              "speech": evaluate(model, s.eval_rows, clips, cfg.eval)}
    # A speech-only adapter leaves text-only inputs exactly the base (tested: bit-identical logits), so its text answers
    # are the base's; they are generated again only for an adapter that also changes text.
    if main and model.adapter.speech_only:
        result["text"] = base_text
    elif not model.adapter.speech_only:
        result["text"] = evaluate(model, s.eval_rows, None, cfg.eval)
    ppl = perplexity(model, s.eval_rows)
    result["text_perplexity"] = {"before": base_ppl, "after": ppl, "relative_change": round((ppl - base_ppl) / base_ppl, 6)}
    if base_udhr:
        after = udhr_perplexity(model, model.tokenizer, list(base_udhr))
        # the change from the unrounded perplexities: a speech-only adapter's is exactly 0
        result["udhr_perplexity"] = {lang: {"before": round(base_udhr[lang], 4), "after": round(after[lang]["perplexity"], 4),
                                            "relative_change": round((after[lang]["perplexity"] - base_udhr[lang]) / base_udhr[lang], 6)}
                                     for lang in base_udhr}
    if main_variant:
        result["speech_quantized"] = evaluate(model, s.eval_rows, quantized(s.rvq, clips, levels), cfg.eval)
    return result


def _eval_scalars(result: dict) -> dict:
    """A variant's held-out figures as TensorBoard reads them (`eval/speech/<task>/score`, `eval/text_perplexity/after`,
    ...): its scores and perplexities, without the adapter settings and the history."""
    return {key: result[key] for key in ("speech", "speech_quantized", "text", "text_perplexity", "udhr_perplexity")
            if key in result}


def summarize(variants: dict, base_text: dict, main_name: str, kinds: list[str], baselines: dict) -> dict:
    """The figures of the closing note: per adapter kind the ratio of synthetic-speech scores to the real-speech
    topline's (when compared), the closed tasks' no-listening baselines, and the table of every variant."""
    summary: dict = {"main": main_name, "no_listening_baselines": baselines}
    main_kind = main_name.split("/")[1]
    if f"{EXTRA}/{main_kind}" in variants and f"{TOPLINE}/{main_kind}" in variants:
        summary["extra_text_comparison"] = {main_kind: ratio_to_topline(variants[f"{EXTRA}/{main_kind}"]["speech"],
                                                                        variants[f"{TOPLINE}/{main_kind}"]["speech"], name=EXTRA)}
    if any(name.startswith(TOPLINE + "/") for name in variants):
        summary["topline_comparison"] = {kind: ratio_to_topline(variants[f"{SYNTHETIC}/{kind}"]["speech"], variants[f"{TOPLINE}/{kind}"]["speech"])
                                         for kind in kinds}
        # Both models with real input put through stage 1 as their training speech was (synthetic at data.synthetic_levels).
        summary["topline_comparison_quantized"] = {main_kind: ratio_to_topline(variants[main_name]["speech_quantized"],
                                                                               variants[f"{TOPLINE}/{main_kind}"]["speech_quantized"])}
    summary["adapters"] = {name: {"tasks": {t: v["score"] for t, v in r["speech"].items()},
                                  "text_perplexity_change": r["text_perplexity"]["relative_change"],
                                  **({"udhr_perplexity": {lang: v["after"] for lang, v in r["udhr_perplexity"].items()},
                                      "udhr_perplexity_change": {lang: v["relative_change"] for lang, v in r["udhr_perplexity"].items()}}
                                     if "udhr_perplexity" in r else {}),
                                  "trainable_parameters": r["parameters"]["trainable"]} for name, r in variants.items()}
    summary["base_text_scores"] = {t: v["score"] for t, v in base_text.items()}
    # the shape `speechless report` plots
    summary["comparison"] = {name: {"scores": {t: {"score": v["score"]} for t, v in r["speech"].items()},
                                    "text_perplexity": r["text_perplexity"]} for name, r in variants.items()}
    return summary


# --------------------------------------------------------------------------------------------------- the stage

def train(cfg: Stage3Config) -> dict:
    """Run stage 3 end to end; returns a summary (its `eval` is None on ranks > 0 of a torchrun job)."""
    began = time.time()
    job = distributed.setup()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.run.out_dir)
    work = out / "work"
    if job.is_main:
        write_text(out / "resolved_config.yaml", to_yaml(cfg))

    # Setup: stage 1, the conversations, the base (demo: text-pretrained first), the speech to learn from.
    s = setup(cfg, work)
    base_cfg = cfg.base
    if not cfg.pretrain.enabled:
        check_text_lm_base(cfg.base)  # chat turns and audio slots of a pretrained text LM, before the slow steps
    if cfg.pretrain.enabled:
        with open_loggers(cfg.run, "pretrain") as curves:
            base_cfg = pretrain_base(cfg.base, cfg.pretrain, s.encoder_cfg, s.encoder_sha, s.train_rows, cfg.data.tasks,
                                     cfg.pretrain.seed, curves)
    sources, stage2_record = speech_sources(cfg, s, work)
    base = load_base(base_cfg, s.encoder_cfg, s.encoder_sha)
    clips = real_vectors(base, s.eval_rows, s.encoder_cfg)
    base_ppl, base_text = perplexity(base, s.eval_rows), evaluate(base, s.eval_rows, None, cfg.eval)
    base_udhr = {lang: r["perplexity"] for lang, r in udhr_perplexity(base, base.tokenizer, cfg.eval.udhr_languages).items()}
    timings = {"setup_s": round(time.time() - began, 1)}
    lineage = {"stage1": s.stage1.record(), "stage2": stage2_record}

    # Train and evaluate the configured adapter on synthetic speech, then whatever `compare` asks for.
    main_variant = variant_name(cfg.adapter)
    main_name = f"{SYNTHETIC}/{main_variant}"
    kinds = list(dict.fromkeys([main_variant] + cfg.compare.adapters))
    variants = {}
    for source, (rows, tokens) in sources.items():
        levels = None if source == TOPLINE else cfg.data.synthetic_levels
        for kind in (kinds if source != EXTRA else [main_variant]):
            name, t0 = f"{source}/{kind}", time.time()
            with open_loggers(cfg.run, name) as curves:  # one TensorBoard run per variant: their curves overlay
                model, history = train_variant(cfg, s, base_cfg, name, rows, tokens, kind, levels, curves)
                trained = time.time()
                variants[name] = evaluate_variant(cfg, s, model, history, clips, base_ppl, base_udhr, base_text, levels,
                                                  name == main_name, kind == main_variant)
                curves.log(cfg.train.steps, {"eval": _eval_scalars(variants[name])}, purge=False)
            variants[name]["seconds_train"] = round(trained - t0, 1)
            variants[name]["seconds_eval"] = round(time.time() - trained, 1)
            if job.is_main:
                model.save_adapter(adapter_folder(out, name, main_name), {**lineage, "speech_levels": levels, "quantize_real": cfg.eval.quantize_real})
            variants[name]["seconds"] = round(time.time() - t0, 1)
            log.info(f"{name}: " + ", ".join(f"{t} {v['score']:.3f}" for t, v in variants[name]["speech"].items()))

    summary = summarize(variants, base_text, main_name, kinds, s.baselines)
    if not job.is_main:  # torchrun job: rank 0 writes, pushes and reports
        distributed.barrier()
        return {"out_dir": str(out), "eval": None, "pushed": None, "rank": job.rank}

    # Save: metrics, provenance, model card; push.
    held_out = {"source": cfg.data.eval_instructions or f"demo task set, split {cfg.data.eval_split}", "conversations": len(s.eval_rows),
                "recordings": len(clips), "speech": "real recordings through the model's own audio tower"}
    metrics = {"eval": {**summary, "base_text": base_text, "base_text_perplexity": base_ppl,
                        **({"base_udhr_perplexity": {lang: round(v, 4) for lang, v in base_udhr.items()}} if base_udhr else {}),
                        "variants": variants, "held_out": held_out},
               "timings": {**timings, "total_s": round(time.time() - began, 1)}, "created": utc_now()}
    write_json(out / "metrics.json", metrics)
    data_files = {key: sha256_file(path) for key, path in (("manifest", cfg.data.manifest), ("instructions", cfg.data.instructions),
                                                           ("eval_instructions", cfg.data.eval_instructions)) if path and Path(path).is_file()}
    corpus = corpus_record(cfg.data.manifest) if Path(cfg.data.manifest).is_file() else None
    record = provenance("stage3", cfg, **lineage, encoder_sha256=s.encoder_sha, data_sha256=data_files, corpus=corpus,
                        base={"source": base_cfg.source, **{k: v for k, v in read_json(out / "adapter_config.json")["base"].items()
                                                            if k in ("weights_sha256", "gguf_sha256")}})
    pushed = finish_run(out, "stage3", record, model_card(cfg, metrics, record), cfg.run.push, cfg.store, cfg.run.message)
    distributed.barrier()  # the other ranks return once the outputs are written
    return {"out_dir": str(out), "eval": summary, "pushed": pushed}


# ----------------------------------------------------------------------------------------------------- model card

def model_card(cfg: Stage3Config, metrics: dict, provenance: dict) -> str:
    ev = metrics["eval"]
    tasks = sorted({t for row in ev["adapters"].values() for t in row["tasks"]})
    lines = ["# speechless stage 3 adapter", "",
             f"Adapter `{cfg.adapter.kind}` for base `{provenance['base']['source']}` (weights sha256 {provenance['base']['weights_sha256'][:12]}), "
             f"trained on stage-2 synthetic speech only (stage 1 {provenance['stage1'].get('version') or provenance['stage1']['ref']}, "
             f"stage 2 {provenance['stage2'].get('version') or provenance['stage2']['ref']}).", "",
             f"Evaluated on held-out REAL speech ({ev['held_out']['source']}: {ev['held_out']['conversations']} requests, "
             f"{ev['held_out']['recordings']} recordings).", "", *([corpus_line(provenance["corpus"]), ""] if provenance.get("corpus") else []),
             "| variant | " + " | ".join(tasks) + " | text ppl change | trainable params |", "|---" * (len(tasks) + 3) + "|"]
    for name, row in ev["adapters"].items():
        lines.append(f"| {name} | " + " | ".join(str(row["tasks"].get(t, "")) for t in tasks)
                     + f" | {row['text_perplexity_change']:+.4%} | {row['trainable_parameters']:,} |")
    if ev.get("base_udhr_perplexity"):
        langs = list(ev["base_udhr_perplexity"])
        lines += ["", "Text perplexity on the Universal Declaration of Human Rights (never trained on):", "",
                  "| model | " + " | ".join(langs) + " |", "|---" * (len(langs) + 1) + "|",
                  "| base | " + " | ".join(f"{ev['base_udhr_perplexity'][lang]:.2f}" for lang in langs) + " |"]
        for name, row in ev["adapters"].items():
            if "udhr_perplexity" in row:
                lines.append(f"| {name} | " + " | ".join(f"{row['udhr_perplexity'][lang]:.2f} ({row['udhr_perplexity_change'][lang]:+.2%})"
                                                          for lang in langs) + " |")
    for key, label in (("topline_comparison", "native input"), ("topline_comparison_quantized", "input through stage 1 as in training")):
        for kind, rows in ev.get(key, {}).items():
            lines.append(f"\nSynthetic speech / real-speech topline (ratio), {kind}, {label}: "
                         + ", ".join(f"{t} {r[SYNTHETIC]} / {r[TOPLINE]} ({r['ratio_to_topline']})" for t, r in rows.items()))
    lines += ["", "Scores: asr 1 - CER, closed answers exact match, other tasks chrF/100. Text-only base on the same requests "
              "as text: " + ", ".join(f"{t} {v}" for t, v in ev["base_text_scores"].items()), "",
              "Files: `adapter.safetensors` + `adapter_config.json` (adapter weights only; lineage inside), metrics.json, provenance.json."]
    return "\n".join(lines) + "\n"
