"""Stage 2 recipe: the Speechless model, text -> stage-1 semantic tokens, with a measured round trip.

Read top to bottom: setup (the stage-1 version, its token JSONL checked against its weights, speakers) -> build the
text tokenizer and model -> train (AdamW, warmup + cosine, clipping, length-bucketed batches, eval loss per level,
best/final weights; resumable from `work/`) -> train the judge (a CTC ASR probe on REAL stage-1 tokens of the train
split) -> round trip on held-out sentences (probe CER on real tokens vs on tokens generated from the same text,
durations, per-level code usage, DTW cosine of decoded vectors) -> save (weights, config, tokenizer, probe, generated
tokens, metrics, provenance, model card) -> push as `stage2@vN`.

The run folder (`run.out_dir`) is the checkpoint. `work/` (resume state) is never pushed.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from speechless.core import distributed, log
from speechless.core.config import Section, to_yaml
from speechless.core.errors import UsageError
from speechless.core.io import read_json, sha256_file, write_json, write_text
from speechless.core.loggers import open_loggers
from speechless.core.runs import RunConfig, config_fingerprint, load_checkpoint, save_checkpoint
from speechless.core.store import StoreConfig
from speechless.core.training import (
    adamw,
    autocast_dtype,
    finish_run,
    length_batches,
    lr_factor,
    provenance,
    resolve_device,
    resume_state,
)
from speechless.data.manifest import corpus_line
from speechless.speech.tokens import (
    Stage1,
    load_split,
    resolve_stage1,
    row_codes,
    speaker_map,
    stage1_codebooks,
    stage1_manifest,
)
from speechless.t2s.align import align_durations, proportional_durations
from speechless.t2s.backbone import count_parameters
from speechless.t2s.config import T2SConfig
from speechless.t2s.frames import collate
from speechless.t2s.generate import WEIGHT_FILES, GenerateConfig
from speechless.t2s.model import T2SModel, build_model
from speechless.t2s.probe import CTCProbe, ProbeConfig, train_probe
from speechless.t2s.roundtrip import EvalConfig, round_trip


class DataConfig(Section):
    stage1: str = "runs/demo/stage1"
    """The stage-1 version whose tokens stage 2 learns to produce: a run folder or a store ref (`stage1@v1`). Its
    `tokens/<split>.jsonl` are read and must carry the revision of its `model.safetensors`; the version is recorded."""
    train_split: str = "train"
    """Token split that trains the model and the probe."""
    eval_split: str = "dev"
    """Held-out split for the per-level eval loss and the best checkpoint."""
    manifest: str | None = None
    """Manifest (JSONL with `id` and the speaker field) giving each utterance's speaker; None = the manifest recorded
    in the stage-1 provenance (when it exists); '' = no speakers."""
    speaker_field: str = "speaker_id"
    """Manifest field holding the speaker."""
    max_frames: int = Field(750, ge=1)
    """Training utterances with more frames are left out (750 = 30 s)."""


class TrainConfig(Section):
    steps: int = Field(30000, ge=0)
    """Optimizer steps."""
    batch_size: int = Field(32, ge=1)
    """Utterances per step (length-bucketed: similar lengths share a batch)."""
    learning_rate: float = Field(3e-4, gt=0.0)
    """Peak AdamW learning rate."""
    warmup_steps: int = Field(1000, ge=0)
    """Linear warmup steps, then cosine decay to `min_lr_ratio` x peak."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Final learning rate as a share of the peak."""
    weight_decay: float = Field(0.05, ge=0.0)
    """AdamW weight decay (not on norms, biases and embeddings)."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Gradient norm clipping."""
    eval_every: int = Field(1000, ge=1)
    """Eval loss per level on the eval split every N steps (and at the end); the best is kept."""
    checkpoint_every: int = Field(1000, ge=1)
    """Resume checkpoint every N steps (in `work/`)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """'bf16' autocast, 'fp32', or 'auto' = bf16 on a GPU that supports it, else fp32."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu', 'cuda', ..."""
    threads: int | None = Field(None, ge=1)
    """CPU threads for training and the round trip (None = torch's default, all cores). On cores shared with other
    jobs, 1 is often faster."""


class Stage2Config(Section):
    run: RunConfig = RunConfig(out_dir="runs/demo/stage2")
    data: DataConfig = DataConfig()
    model: T2SConfig = T2SConfig()
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()
    probe: ProbeConfig = ProbeConfig()
    eval: EvalConfig = EvalConfig()
    store: StoreConfig = StoreConfig()


# ---------------------------------------------------------------------------------------------------------- training

def _items(rows: list[dict], model: T2SModel, speakers: dict[str, str], durations: list[list[int]] | None = None) -> list[tuple]:
    """(text ids, codes, speaker index, token durations or None) per row."""
    items = []
    for k, row in enumerate(rows):
        encoded = model.text.encode(row["text"], where=f"utterance {row['id']}")
        ids = [i for chunk in encoded.chunks for i in chunk][: model.cfg.max_text_tokens]
        spk = model.speakers.index(speakers[row["id"]]) if model.speaker_embed is not None and row["id"] in speakers else 0
        codes = row_codes(row)
        spoken = None
        if durations is not None:
            spoken = durations[k] if len(durations[k]) == len(ids) else proportional_durations(len(ids), codes.shape[1])
        items.append((ids, codes, spk, spoken))
    return items


def align_text(model: T2SModel, probe: CTCProbe, rows: list[dict], split: str) -> list[list[int]]:
    """The frames of every text token of real utterances, by CTC forced alignment with the judge (alignment 'ctc')."""
    spans = [model.text.spans(row["text"], where=f"utterance {row['id']}") for row in rows]
    durations, failed = align_durations(probe, [(clean, offsets, row_codes(row)) for (clean, _, offsets), row in zip(spans, rows)])
    if failed:
        log.warn(f"alignment: {failed} of {len(rows)} '{split}' utterances could not be aligned (too few frames for the "
                 f"transcript, or characters the judge never saw); they use a constant speaking rate")
    mean = sum(len(d) for d in durations) / max(len(durations), 1)
    log.info(f"aligned {len(rows) - failed} '{split}' utterances by CTC ({mean:.1f} tokens each)")
    return durations


@torch.no_grad()
def eval_loss(model: T2SModel, items: list, batch_size: int, device: torch.device, amp: torch.dtype | None) -> dict:
    """Mean cross-entropy per level (and overall) on held-out items, weighted by target counts; for the parallel
    decoder, the squared error of the vectors (one value)."""
    model.eval()
    width = 1 if model.parallel else model.num_levels
    sums = torch.zeros(width, dtype=torch.float64)
    counts = torch.zeros(width, dtype=torch.float64)
    dur_sum, dur_count = 0.0, 0
    order = sorted(range(len(items)), key=lambda i: items[i][1].shape[1])
    for start in range(0, len(order), batch_size):
        batch = collate([items[i] for i in order[start:start + batch_size]], model.delays, model.codebook_size).to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model.loss(batch)
        if model.parallel:
            sums += float(out["vector_mse"]) * int(out["frames"])
            counts += int(out["frames"])
        else:
            sums += (out["level_loss"].double() * out["level_count"].double()).cpu()
            counts += out["level_count"].double().cpu()
        if "duration_loss" in out:
            dur_sum += float(out["duration_loss"]) * int(out["duration_count"])
            dur_count += int(out["duration_count"])
    level = (sums / counts.clamp_min(1)).tolist()
    result = {"loss": sum(level) / len(level)}
    result.update({"vector_mse": round(level[0], 4)} if model.parallel else {"level_loss": [round(v, 4) for v in level]})
    if dur_count:  # the duration predictor's squared error in log(1 + frames), added to the loss as in training
        result["duration_loss"] = round(dur_sum / dur_count, 4)
        result["loss"] += dur_sum / dur_count
    return result


def train_model(cfg: Stage2Config, model: T2SModel, train_items: list, eval_items: list, out: Path, work: Path) -> dict:
    """The training loop (resumable). Writes model.best.safetensors whenever the eval loss improves; returns state."""
    job = distributed.group()
    device = distributed.local_device(resolve_device(cfg.train.device))
    amp = autocast_dtype(cfg.train.precision, device)
    model.to(device)
    optimizer = adamw(model, cfg.train.learning_rate, cfg.train.weight_decay, no_decay_names=("embed",))
    fingerprint = config_fingerprint(cfg)
    state = resume_state(work, fingerprint, "stage 2")
    if state is None:
        state = {"fingerprint": fingerprint, "step": 0, "history": [], "best": None, "train_seconds": 0.0, "frames": 0}
        if job.is_main:
            save_checkpoint(work, 0, model.tensors(), optimizer, state, keep=2)
    else:
        model.load_weights(load_checkpoint(work, state["step"], optimizer, model.device), f"{work} step {state['step']}")
        log.info(f"resuming stage 2 from step {state['step']} of {cfg.train.steps}")
    distributed.barrier()  # every rank has read the resume state before rank 0 writes again
    # Several processes: DDP averages gradients; each rank trains on its share of every (global) batch.
    loss_fn = distributed.data_parallel(model, "loss")
    lengths = [item[1].shape[1] + len(item[0]) for item in train_items]
    per_epoch = math.ceil(len(train_items) / cfg.train.batch_size)
    step = state["step"]
    log.info(f"training on {device}{' (bf16 autocast)' if amp else ''}: {len(train_items)} utterances, "
             f"{count_parameters(model) / 1e6:.2f} M parameters, {cfg.train.steps} steps of {cfg.train.batch_size}")
    window: list[float] = []
    with log.progress() as bar, open_loggers(cfg.run) as curves:
        task = bar.add_task("training stage 2", total=cfg.train.steps, completed=step)
        while step < cfg.train.steps:
            tick = time.time()
            epoch, index = divmod(step, per_epoch)
            picked = [train_items[i] for i in length_batches(lengths, cfg.train.batch_size, cfg.run.seed, epoch)[index]]
            torch.manual_seed(cfg.run.seed * 1_000_003 + step)
            for group in optimizer.param_groups:
                group["lr"] = cfg.train.learning_rate * lr_factor(step, cfg.train.steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio)
            model.train()
            local = distributed.shard(picked, job) or picked[-1:]  # a batch smaller than the job: reuse one item
            batch = collate(local, model.delays, model.codebook_size).to(device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                result = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            result["loss"].backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))
            optimizer.step()
            step += 1
            state["train_seconds"] += time.time() - tick
            state["frames"] += int(sum(item[1].shape[1] for item in picked))
            loss = distributed.all_reduce_mean(float(result["loss"].detach()))
            if not job.is_main:  # rank 0 alone evaluates, logs and saves
                bar.advance(task)
                continue
            window.append(loss)
            record = {"step": step, "loss": round(loss, 4), "grad_norm": round(grad_norm, 3),
                      "lr": optimizer.param_groups[0]["lr"]}
            if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                ev = eval_loss(model, eval_items, cfg.train.batch_size * 2, device, amp)
                record["eval"] = ev
                if state["best"] is None or ev["loss"] < state["best"]["loss"]:
                    state["best"] = {"step": step, "loss": ev["loss"]}
                    model.save_weights(out / WEIGHT_FILES["best"])
                detail = (f"vector mse {ev['vector_mse']:.3f}" if model.parallel else
                          f"levels {' '.join(f'{v:.2f}' for v in ev['level_loss'])}")
                log.info(f"step {step}: train loss {sum(window) / len(window):.3f}, eval loss {ev['loss']:.3f} ({detail})")
                window = []
            state["history"].append(record)
            curves.log(step, record)
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                save_checkpoint(work, step, model.tensors(), optimizer, state, keep=2)
            bar.advance(task)
    if state["best"] is None and job.is_main:  # steps == 0
        ev = eval_loss(model, eval_items, cfg.train.batch_size * 2, device, amp)
        state["best"] = {"step": 0, "loss": ev["loss"]}
        model.save_weights(out / WEIGHT_FILES["best"])
    return state


# ---------------------------------------------------------------------------------------------------------- the stage

def setup(cfg: Stage2Config, job) -> tuple[Stage1, dict[str, list[dict]], dict[str, str], list[str]]:
    """The stage-1 version, its token splits (checked against its weights), the speakers and the voices to learn;
    everything is checked before anything is written."""
    stage1 = resolve_stage1(cfg.data.stage1, cfg.store)
    rows = {"train": load_split(stage1, cfg.data.train_split, cfg.data.max_frames),
            "eval": load_split(stage1, cfg.data.eval_split, cfg.data.max_frames),
            "test": load_split(stage1, cfg.eval.split)[: cfg.eval.max_utterances]}
    overlap = {r["text"] for r in rows["train"]} & {r["text"] for r in rows["test"]}
    if overlap:
        log.warn(f"{len(overlap)} sentence(s) of split '{cfg.eval.split}' also occur in '{cfg.data.train_split}': the round trip is not fully held out")
    speakers = speaker_map(stage1, cfg.data.manifest, cfg.data.speaker_field)
    speaker_names = sorted({speakers[r["id"]] for r in rows["train"] if r["id"] in speakers}) if cfg.model.speaker_embedding else []
    if cfg.generate.speaker is not None and cfg.generate.speaker not in speaker_names:
        raise UsageError(f"generate.speaker {cfg.generate.speaker!r}: not a training speaker ({', '.join(speaker_names) or 'none'})")
    if cfg.generate.speaker is not None:  # the default voice is the first speaker
        speaker_names.remove(cfg.generate.speaker)
        speaker_names.insert(0, cfg.generate.speaker)
    log.info(f"stage 1: {stage1.version or stage1.ref} (revision {stage1.revision[:12]}, {stage1.num_levels} x {stage1.codebook_size}); "
             f"{len(rows['train'])} train / {len(rows['eval'])} eval / {len(rows['test'])} round-trip utterances; "
             f"speakers: {', '.join(speaker_names) or 'none'}")
    return stage1, rows, speakers, speaker_names


def train_judge(cfg: Stage2Config, stage1: Stage1, train_rows: list[dict], probe_dir: Path) -> tuple[CTCProbe, dict]:
    """The judge: a CTC probe on REAL tokens of the train split (reused when this run already trained it)."""
    key = config_fingerprint(cfg.probe) + stage1.revision
    codebooks = stage1_codebooks(stage1) if cfg.probe.input == "vectors" else None
    meta = probe_dir / "config.json"
    if meta.is_file() and read_json(meta).get("key") == key:
        log.info("probe: reusing the one already trained in this run")
        return CTCProbe.load(probe_dir, codebooks), read_json(meta)["summary"]
    log.info(f"training the CTC probe on {len(train_rows)} real utterances ({cfg.probe.steps} steps)")
    probe, summary = train_probe([row_codes(r) for r in train_rows], [r["text"] for r in train_rows], cfg.probe,
                                 stage1.num_levels, stage1.codebook_size, log_every=max(1, cfg.probe.steps // 4), log=log.info,
                                 codebooks=codebooks)
    probe.save(probe_dir, extra={"key": key, "summary": summary, "stage1_revision": stage1.revision})
    return probe, summary


def train(cfg: Stage2Config) -> dict:
    """Run stage 2 end to end; returns a summary (paths, round-trip metrics, pushed version)."""
    started = time.time()
    job = distributed.setup()
    out, work = Path(cfg.run.out_dir), Path(cfg.run.out_dir) / "work"
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)

    # Setup: the stage-1 version and its tokens, then the model (deterministic for the seed; a resume replaces weights).
    stage1, rows, speakers, speaker_names = setup(cfg, job)
    work.mkdir(parents=True, exist_ok=True)
    if job.is_main:
        write_text(out / "resolved_config.yaml", to_yaml(cfg))
    model = build_model(cfg.model, [r["text"] for r in rows["train"]], stage1.num_levels, stage1.codebook_size, speaker_names,
                        stage1.record(), seed=cfg.run.seed, train_frames=[r["frames"] for r in rows["train"]],
                        train_speakers=[speakers.get(r["id"], "") for r in rows["train"]],
                        codebooks=stage1_codebooks(stage1) if cfg.model.decoder == "parallel" else None)

    # The judge (a CTC probe on real train tokens): with alignment 'ctc' it first aligns the text to the real frames.
    durations = {"train": None, "eval": None}
    judge = None
    if cfg.model.alignment == "ctc":
        if job.is_main:
            judge = train_judge(cfg, stage1, rows["train"], out / "probe")
        distributed.barrier()  # the other ranks load the judge rank 0 trained
        if judge is None:
            judge = train_judge(cfg, stage1, rows["train"], out / "probe")
        durations = {part: align_text(model, judge[0], rows[part], split) for part, split in
                     (("train", cfg.data.train_split), ("eval", cfg.data.eval_split))}

    # Train.
    state = train_model(cfg, model, _items(rows["train"], model, speakers, durations["train"]),
                        _items(rows["eval"], model, speakers, durations["eval"]), out, work)
    if not job.is_main:  # torchrun job: rank 0 evaluates and writes the checkpoint
        return {"out_dir": str(out), "eval": None, "pushed": None, "revision": None, "stage1": stage1.record(), "rank": job.rank}
    model.save(out, WEIGHT_FILES["final"])

    # Evaluate: the judge, then the round trip on held-out sentences.
    probe, probe_summary = judge or train_judge(cfg, stage1, rows["train"], out / "probe")
    eval_model = model if cfg.eval.weights == "final" else T2SModel.load(out, WEIGHT_FILES["best"])
    eval_model.to("cpu")
    log.info(f"round trip on {len(rows['test'])} held-out utterances of split '{cfg.eval.split}'")
    metrics_eval, generated = round_trip(eval_model, probe, rows["test"], speakers, cfg.generate, cfg.eval, stage1.folder,
                                         stage1_manifest(stage1, cfg.data.manifest))
    model_revision = sha256_file(out / WEIGHT_FILES["final"])
    for row in generated:
        row["stage2_revision"] = model_revision
    write_text(out / "tokens" / f"generated_{cfg.eval.split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generated))
    log.info(f"probe CER: real {metrics_eval['probe_cer_real']:.4f}, generated {metrics_eval['probe_cer_generated']:.4f}; "
             f"DTW centred cosine {metrics_eval['dtw_centered_cosine']}")

    # Save: metrics, provenance, model card; push.
    final_eval = state["history"][-1].get("eval") if state["history"] else None
    metrics = {
        "eval": metrics_eval,
        "eval_loss": final_eval,
        "best": state["best"],
        "probe": probe_summary,
        "model": {"parameters": count_parameters(model), "decoder": cfg.model.decoder, "frame_mode": cfg.model.frame_mode, "delays": model.delays,
                  "backbone": model.backbone_source, "text_vocab": model.text.vocab_size, "speakers": model.speakers},
        "train": {"steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "utterances": len(rows["train"]),
                  "seconds": round(state["train_seconds"], 2), "frames_seen": state["frames"],
                  "frames_per_second": round(state["frames"] / max(state["train_seconds"], 1e-9), 1)},
        "history": state["history"],
        "wall_seconds": round(time.time() - started, 2),
    }
    write_json(out / "metrics.json", metrics)
    splits = ((cfg.data.train_split, len(rows["train"])), (cfg.data.eval_split, len(rows["eval"])), (cfg.eval.split, len(rows["test"])))
    record = provenance(
        "stage2", cfg,
        stage1={**stage1.record(), "num_levels": stage1.num_levels, "codebook_size": stage1.codebook_size},
        data={split: {"file": f"tokens/{split}.jsonl", "sha256": sha256_file(stage1.folder / "tokens" / f"{split}.jsonl"), "utterances": n}
              for split, n in splits},
        backbone=model.backbone_source,
        tokenizer_sha256=sha256_file(out / "tokenizer.json"),
        weights_sha256={name: sha256_file(out / file) for name, file in WEIGHT_FILES.items()},
        probe_sha256=sha256_file(out / "probe" / "model.safetensors"),
        corpus=read_json(stage1.folder / "provenance.json").get("corpus") if (stage1.folder / "provenance.json").is_file() else None)
    pushed = finish_run(out, "stage2", record, model_card(cfg, metrics, record), cfg.run.push, cfg.store, cfg.run.message)
    return {"out_dir": str(out), "eval": metrics_eval, "pushed": pushed, "revision": model_revision, "stage1": stage1.record()}

# ----------------------------------------------------------------------------------------------------- model card

def _ci(interval: dict | None) -> str:
    """'0.0123 [0.0100, 0.0150]' for an interval record, '' for none."""
    return f"{interval['value']:.4f} [{interval['low']:.4f}, {interval['high']:.4f}]" if interval else ""


def _whisper_section(judge: dict | None) -> str:
    if not judge:
        return ""
    rows = "\n".join(f"| {label} | {_ci(judge['wer_' + name])} | {_ci(judge['cer_' + name])} |" for name, label in (
        ("continuous", "continuous states (no quantization: the ceiling)"), ("real", "real tokens (dequantized)"),
        ("generated", "stage-2 tokens (dequantized)")))
    q, g = judge["wer_quantizer_cost"], judge["wer_stage2_cost"]
    return f"""
### Whisper's own decoder as the judge ({judge['utterances']} utterances, {', '.join(judge['languages'])})

| reading | WER [95 % interval] | CER [95 % interval] |
|---|---|---|
{rows}

What the quantizer costs (real tokens - continuous, WER): {q['difference']['value']:+.4f} [{q['difference']['low']:+.4f}, {q['difference']['high']:+.4f}];
what stage 2 costs (generated / real tokens, WER): {g['ratio']['value']:.3f} [{g['ratio']['low']:.3f}, {g['ratio']['high']:.3f}] (paired bootstrap).
"""


def model_card(cfg: Stage2Config, metrics: dict, provenance: dict) -> str:
    ev = metrics["eval"]
    s1 = provenance["stage1"]
    levels = "\n".join(f"| {i} | {g:.3f} | {r:.3f} | {gp:.0f} | {rp:.0f} |" for i, (g, r, gp, rp) in enumerate(zip(
        ev["code_usage"]["generated"]["utilization"], ev["code_usage"]["real"]["utilization"],
        ev["code_usage"]["generated"]["perplexity"], ev["code_usage"]["real"]["perplexity"])))
    eval_loss = metrics.get("eval_loss") or {}
    level_loss = " / ".join(f"{v:.2f}" for v in eval_loss.get("level_loss", []))
    parallel = metrics["model"].get("decoder") == "parallel"
    if parallel:
        design = ("text tokens, then one position per frame holding the text aligned to it (each token lasting its "
                  "predicted duration), all frames at once (non-autoregressive); out, the frame's stage-1 vector, which "
                  "stage 1's codebooks (kept in this checkpoint) turn into codes")
        loss_line = (f"Eval (split `{cfg.data.eval_split}`): squared error of the vectors {eval_loss.get('vector_mse', float('nan')):.4f}, "
                     f"durations {eval_loss.get('duration_loss', float('nan')):.4f} (log frames).")
        decoding = "one forward pass, deterministic"
    else:
        design = (f"text tokens, then one position per audio step holding the sum of {s1['num_levels']} level embeddings, one head "
                  f"per level out; frame layout `{metrics['model']['frame_mode']}` (level delays {metrics['model']['delays']})")
        loss_line = f"Eval loss per level (split `{cfg.data.eval_split}`): {level_loss}."
        decoding = ('greedy' if ev['generation']['temperature'] == 0 else
                    f"temperature {ev['generation']['temperature']}, top-k {ev['generation']['top_k']}")
    d = ev["duration"]
    refs = ev["dtw_centered_cosine_reference"]
    return f"""---
library_name: speechless
tags: [text-to-semantic-tokens, speechless, gemma4]
---
# speechless stage 2: text -> semantic tokens

Turns text into the stage-1 semantic tokens ({s1['num_levels']} codebooks x {s1['codebook_size']} codes, 25 frames/s) the
same words would have produced as speech: no audio, no TTS. Trained on stage 1 `{s1['version'] or s1['ref']}`
(weights sha256 `{s1['revision'][:16]}`); its codes are meaningful only with those codebooks, and generating or
consuming them with another stage-1 version is refused.
{corpus_line(provenance.get('corpus'))}

Model: decoder-only `{metrics['model']['backbone'].get('source')}` backbone ({metrics['model']['parameters'] / 1e6:.2f} M parameters
in all) fed through `inputs_embeds`: {design};
speakers: {', '.join(metrics['model']['speakers']) or 'none'} (default: the first). Text tokenizer: {metrics['model']['text_vocab']} tokens.
Trained {metrics['train']['steps']} steps x {metrics['train']['batch_size']} utterances ({metrics['train']['seconds']:.0f} s).
{loss_line}

## Semantic round trip (held-out split `{ev['split']}`: {ev['utterances']} utterances, {ev['sentences']} sentences never seen in training)

The judge is a CTC ASR probe ({metrics['probe']['parameters'] / 1e6:.2f} M parameters: summed code embeddings -> {metrics['probe'].get('layers', 'residual')} 1-D convolutions{' -> BiGRU' if cfg.probe.rnn else ''} -> characters, CTC)
trained on real stage-1 tokens of the train split. It reads the real tokens of the held-out audio and the tokens this
model generated from the same sentences' text ({'each utterance in its own speaker' if ev['generation']['speakers'] == 'each' else 'default speaker'},
{decoding}).

| metric | real tokens | generated tokens |
|---|---|---|
| probe CER | {_ci(ev.get('probe_cer_real_interval')) or f"{ev['probe_cer_real']:.4f}"} | {_ci(ev.get('probe_cer_generated_interval')) or f"{ev['probe_cer_generated']:.4f}"} |
| frames (mean) | {d['real_frames_mean']:.1f} | {d['generated_frames_mean']:.1f} |

Generated / real probe CER: {_ci(ev.get('probe_cer_ratio_interval')) or ev['probe_cer_ratio']} (95 % intervals: bootstrap over utterances, paired for the ratio).
{_whisper_section(ev.get('whisper'))}
Generated / real duration ratio {d['ratio_mean']:.3f} (mean absolute relative error {d['abs_relative_error_mean']:.3f},
correlation {d['correlation']}); {d['capped']} generation(s) hit the length cap.
DTW-aligned cosine of the decoded 1024-d vectors, generated vs real: {ev['dtw_cosine']} (mean-centred: {ev['dtw_centered_cosine']};
for reference, real vs real of the same sentence by another speaker: {refs['real_same_sentence_other_speaker']}, of a different sentence: {refs['real_different_sentence']}).

| level | utilization (generated) | utilization (real) | perplexity (generated) | perplexity (real) |
|---|---|---|---|---|
{levels}

## Use

```bash
speechless tokenize text "Habari ya asubuhi" --model PATH_OR_stage2@vN
speechless stage2 generate --model PATH_OR_stage2@vN --input texts.jsonl --output tokens.jsonl
```

Weights are safetensors, configs JSON and the tokenizer `tokenizer.json`: nothing here is executed or unpickled.
Code: {provenance['code_version']}.
"""
