"""Encoder pretraining recipe (the step before stage 1): train a Gemma 4 audio encoder so that it hears.

Read top to bottom: config -> setup (the manifest's train and eval splits, the text units, log-mel features) -> train
(a `Gemma4AudioModel` + a linear CTC head on the input of `output_proj`, AdamW, warmup + cosine to `min_lr_ratio`,
length-bucketed batches, held-out CER every `eval_every` steps; resumable from `work/`) -> evaluate -> save -> push as
`encoder@vN`.

The run folder (`run.out_dir`) is a standalone `Gemma4AudioModel` folder (config.json, model.safetensors,
preprocessor_config.json) that stage 1 takes as `encoder.source`, the same path a real Gemma 4 checkpoint folder
takes; beside it the CTC head (ctc_head.safetensors, ctc_head.json), metrics.json (loss and CER curves),
resolved_config.yaml, provenance.json and the model card README.md. `work/` (resume state) is never pushed.
Only the TRAIN split trains the encoder; the eval split is held out (sentences never trained on).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from speechless.core import log
from speechless.core.config import Section, to_yaml
from speechless.core.errors import UsageError
from speechless.core.io import sha256_file, write_json, write_text
from speechless.core.loggers import open_loggers
from speechless.core.runs import RunConfig, config_fingerprint, load_checkpoint, save_checkpoint
from speechless.core.store import StoreConfig
from speechless.core.training import (
    adamw,
    finish_run,
    length_batches,
    lr_factor,
    provenance,
    resolve_device,
    resume_state,
)
from speechless.data.manifest import joined, manifest_sha256, manifest_splits
from speechless.speech.encoder_ctc import (
    CTCEncoder,
    alphabet_from,
    build_model,
    char_units,
    ctc_loss,
    evaluate,
    phonemize,
    save_encoder_folder,
    utterance_features,
)
from speechless.speech.encoders import weights_sha256


class DataConfig(Section):
    manifest: str = "runs/demo/corpus/all.jsonl"
    """JSONL manifest (NeMo-style fields) holding the train and eval splits; only the train split trains the encoder."""
    train_split: str = "train"
    """Split whose audio and transcripts train the encoder."""
    eval_split: str = "dev"
    """Held-out split for the CTC loss and error rate curves (CER for characters, phoneme error rate for phonemes)."""
    units: Literal["chars", "phonemes"] = "chars"
    """CTC targets: 'chars' = the characters of the normalised transcript (lower case, no punctuation, spaces kept);
    'phonemes' = espeak-ng's phonemes of it (`espeak-ng -x`, stress marks removed, a space between words)."""
    espeak_voice: str = "sw"
    """espeak-ng voice that phonemizes the transcripts (units 'phonemes' only)."""
    max_seconds: float = Field(30.0, gt=0.0, le=30.0)
    """Train utterances longer than this are left out (Gemma 4's encoder window is 30 s)."""
    max_eval_utterances: int | None = Field(None, ge=1)
    """Evaluate on at most this many eval-split utterances (the first ones of the manifest); None = all."""


class ModelConfig(Section):
    """The `Gemma4AudioModel` to train (a `Gemma4AudioConfig`; keys it leaves out keep transformers' defaults)."""

    hidden_size: int = Field(1024, ge=8)
    """Width of the conformer = dimension of the vectors stage 1 quantizes (the real Gemma 4 tower: 1024)."""
    num_hidden_layers: int = Field(12, ge=1)
    """Conformer layers (the real tower: 12)."""
    num_attention_heads: int = Field(8, ge=1)
    """Attention heads per layer (must divide hidden_size; the real tower: 8)."""
    subsampling_conv_channels: list[int] = [128, 32]
    """Channels of the two stride-2 subsampling convolutions (4x in time: 25 frames/s); the first must stay 128."""
    output_proj_dims: int = Field(1536, ge=1)
    """Output width of `output_proj` (Gemma 4 E2B's text width: 1536). Not trained here: stage 1 reads its input."""
    hook_module: str = "output_proj"
    """Module whose INPUT the CTC head reads (and stage 1 quantizes)."""


class TrainConfig(Section):
    steps: int = Field(20000, ge=0)
    """Optimizer steps."""
    batch_size: int = Field(32, ge=1)
    """Utterances per step (length-bucketed: similar lengths share a batch)."""
    learning_rate: float = Field(5e-4, gt=0.0)
    """Peak AdamW learning rate."""
    warmup_steps: int = Field(1000, ge=0)
    """Linear warmup steps, then cosine decay to `min_lr_ratio` x peak."""
    min_lr_ratio: float = Field(0.05, ge=0.0, le=1.0)
    """Final learning rate as a share of the peak (0-1)."""
    weight_decay: float = Field(0.01, ge=0.0)
    """AdamW weight decay (not on norms and biases)."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Gradient norm clipping."""
    eval_every: int = Field(1000, ge=1)
    """Held-out CTC loss and error rate every N steps (and at the end)."""
    checkpoint_every: int = Field(1000, ge=1)
    """Resume checkpoint every N steps (in `work/`)."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu', 'cuda', ..."""
    threads: int | None = Field(None, ge=1)
    """CPU threads (None = torch's default, all cores). On cores shared with other jobs, 1 is often faster."""


class EncoderPretrainConfig(Section):
    run: RunConfig = RunConfig(out_dir="runs/demo/encoder")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    store: StoreConfig = StoreConfig()


# ---------------------------------------------------------------------------------------------------------- setup

def _load_splits(cfg: EncoderPretrainConfig) -> tuple[list, list]:
    by_split = manifest_splits(cfg.data.manifest, cfg.data.train_split, cfg.data.eval_split)
    train = [e for e in by_split[cfg.data.train_split] if e.duration <= cfg.data.max_seconds]
    if not train:
        raise UsageError(f"{cfg.data.manifest}: no train utterance of at most data.max_seconds={cfg.data.max_seconds} s")
    return train, joined(by_split, cfg.data.eval_split)[: cfg.data.max_eval_utterances]


def _unit_sequences(cfg: EncoderPretrainConfig, texts: list[str]) -> list[list[str]]:
    return [char_units(t) for t in texts] if cfg.data.units == "chars" else phonemize(texts, cfg.data.espeak_voice)


def _reference(cfg: EncoderPretrainConfig, units: list[str]) -> str:
    """A unit sequence in the greedy decoder's text form (characters joined; phonemes '_' within a word, ' ' between)."""
    return "".join(units) if cfg.data.units == "chars" else "_".join(units).replace("_ _", " ")


# ---------------------------------------------------------------------------------------------------------- train

def train_encoder(cfg: EncoderPretrainConfig, model: CTCEncoder, train_features: list, train_targets: list, usable: list[int],
                  eval_data: tuple[list, list, list], work: Path, device: torch.device, parameters: int) -> dict:
    """CTC training (resumable): the batches of step s depend only on (seed, s), the optimizer slots are in the
    checkpoint; the held-out loss and error rate every `eval_every` steps. Returns the training state."""
    eval_features, eval_refs, eval_targets = eval_data
    model.to(device).train()
    optimizer = adamw(model, cfg.train.learning_rate, cfg.train.weight_decay)
    fingerprint = config_fingerprint(cfg)
    state = resume_state(work, fingerprint, "encoder pretraining")
    if state is None:
        state = {"fingerprint": fingerprint, "step": 0, "history": [], "best": None, "train_seconds": 0.0}
        save_checkpoint(work, 0, model.tensors(), optimizer, state, keep=2)
    else:
        model.load_tensors(load_checkpoint(work, state["step"], optimizer, device), f"{work} step {state['step']}")
        log.info(f"resuming encoder pretraining from step {state['step']} of {cfg.train.steps}")
    lengths = [len(train_features[i]) for i in usable]
    per_epoch = math.ceil(len(usable) / cfg.train.batch_size)
    step = state["step"]
    log.info(f"training on {device}: {parameters / 1e6:.2f} M encoder parameters (width {cfg.model.hidden_size}, "
             f"{cfg.model.num_hidden_layers} layers), {cfg.train.steps} steps of {cfg.train.batch_size}")
    with log.progress() as bar, open_loggers(cfg.run) as curves:
        task = bar.add_task("pretraining encoder", total=cfg.train.steps, completed=step)
        while step < cfg.train.steps:
            tick = time.time()
            epoch, position = divmod(step, per_epoch)
            picked = [usable[i] for i in length_batches(lengths, cfg.train.batch_size, cfg.run.seed, epoch)[position]]
            torch.manual_seed(cfg.run.seed * 1_000_003 + step)
            for group in optimizer.param_groups:
                group["lr"] = cfg.train.learning_rate * lr_factor(step, cfg.train.steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio)
            loss = ctc_loss(model, [train_features[i] for i in picked], [train_targets[i] for i in picked], device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))
            optimizer.step()
            step += 1
            state["train_seconds"] += time.time() - tick
            record = {"step": step, "loss": round(float(loss.detach()), 4), "grad_norm": round(grad_norm, 3),
                      "lr": optimizer.param_groups[0]["lr"]}
            if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                ev = evaluate(model, eval_features, eval_refs, eval_targets, device)
                record["eval"] = {"loss": ev["loss"], "error_rate": ev["error_rate"]}
                if step == cfg.train.steps:
                    state["final_eval"] = ev  # the final weights' figures (with examples): not evaluated again
                if state["best"] is None or ev["error_rate"] < state["best"]["error_rate"]:
                    state["best"] = {"step": step, "error_rate": ev["error_rate"]}
                log.info(f"step {step}: train ctc {record['loss']:.3f}, eval ctc {ev['loss']:.3f}, "
                         f"eval {'CER' if cfg.data.units == 'chars' else 'PER'} {ev['error_rate']:.4f} ({state['train_seconds']:.0f} s)")
            state["history"].append(record)
            curves.log(step, record)
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                save_checkpoint(work, step, model.tensors(), optimizer, state, keep=2)
            bar.advance(task)
    return state


def train(cfg: EncoderPretrainConfig) -> dict:
    """Pretrain the encoder end to end; returns a summary (out_dir, eval, pushed, weights_sha256)."""
    started = time.time()
    out = Path(cfg.run.out_dir)
    work = out / "work"
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)

    # Setup: splits, units, targets (checked before anything is written).
    train_entries, eval_entries = _load_splits(cfg)
    train_seqs = _unit_sequences(cfg, [e.text for e in train_entries])
    eval_seqs = _unit_sequences(cfg, [e.text for e in eval_entries])
    units = alphabet_from([e.text for e in train_entries]) if cfg.data.units == "chars" else sorted({u for s in train_seqs for u in s})
    model = build_model({**cfg.model.model_dump(exclude={"hook_module"}), "model_type": "gemma4_audio"}, units, cfg.run.seed,
                        cfg.model.hook_module)
    index = model.index
    train_targets = [[index[u] for u in s if u in index] for s in train_seqs]
    eval_targets = [[index[u] for u in s if u in index] for s in eval_seqs]
    eval_refs = [_reference(cfg, s) for s in eval_seqs]
    work.mkdir(parents=True, exist_ok=True)
    write_text(out / "resolved_config.yaml", to_yaml(cfg))

    tick = time.time()
    train_features = utterance_features([e.audio_filepath for e in train_entries])
    eval_features = utterance_features([e.audio_filepath for e in eval_entries])
    usable = [i for i, (f, t) in enumerate(zip(train_features, train_targets)) if t and len(f) // 4 >= len(t)]
    log.info(f"encoder pretraining: {len(usable)} of {len(train_entries)} train utterances usable, {len(eval_entries)} eval; "
             f"{len(units)} {cfg.data.units} units; features in {time.time() - tick:.0f} s")
    if not usable:
        raise UsageError(f"{cfg.data.manifest}: no train utterance has a transcript that fits its frames (25 per second)")
    parameters = sum(p.numel() for p in model.encoder.parameters())

    # Train (resumable).
    state = train_encoder(cfg, model, train_features, train_targets, usable, (eval_features, eval_refs, eval_targets), work,
                          device, parameters)

    # The final weights on the held-out split: evaluated at the last step (again only for a checkpoint without it).
    final = state.get("final_eval") or evaluate(model, eval_features, eval_refs, eval_targets, device)
    model.to("cpu").eval()

    # Save: the standalone Gemma4AudioModel folder + head, metrics, provenance, model card.
    save_encoder_folder(out, model, cfg.data.units)
    revision = weights_sha256(model.encoder)
    metrics = {
        "eval": {"split": cfg.data.eval_split, "utterances": len(eval_entries), "units": cfg.data.units,
                 "error_rate": final["error_rate"], "cer" if cfg.data.units == "chars" else "per": final["error_rate"],
                 "loss": final["loss"], "examples": final["examples"]},
        "model": {"hidden_size": cfg.model.hidden_size, "num_hidden_layers": cfg.model.num_hidden_layers,
                  "parameters": parameters, "units": len(units), "weights_sha256": revision},
        "best": state["best"],
        "train": {"steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "utterances": len(usable),
                  "seconds": round(state["train_seconds"], 2), "threads": torch.get_num_threads(), "device": str(device)},
        "history": state["history"],
        "wall_seconds": round(time.time() - started, 2),
    }
    write_json(out / "metrics.json", metrics)
    record = provenance(
        "encoder", cfg,
        manifest={"path": str(cfg.data.manifest), "sha256": manifest_sha256(cfg.data.manifest),
                  "train_split": cfg.data.train_split, "eval_split": cfg.data.eval_split},
        weights_sha256={"final": sha256_file(out / "model.safetensors")},
        encoder_weights_sha256=revision,
        ctc_head_sha256=sha256_file(out / "ctc_head.safetensors"),
        upstream=None)
    pushed = finish_run(out, "encoder", record, model_card(cfg, metrics, record), cfg.run.push, cfg.store, cfg.run.message)
    return {"out_dir": str(out), "eval": metrics["eval"], "pushed": pushed, "weights_sha256": revision}


# ----------------------------------------------------------------------------------------------------- model card

def model_card(cfg: EncoderPretrainConfig, metrics: dict, provenance: dict) -> str:
    ev = metrics["eval"]
    name = "CER" if cfg.data.units == "chars" else "phoneme error rate"
    curve = "\n".join(f"| {h['step']} | {h['loss']:.3f} | {h['eval']['loss']:.3f} | {h['eval']['error_rate']:.4f} |"
                      for h in metrics["history"] if "eval" in h)
    return f"""---
library_name: transformers
tags: [speechless, gemma4, audio-encoder, ctc]
---
# speechless encoder: a Gemma 4 audio encoder trained to hear

A `transformers` `Gemma4AudioModel` (width {cfg.model.hidden_size}, {cfg.model.num_hidden_layers} layers,
{cfg.model.num_attention_heads} heads, {metrics['model']['parameters'] / 1e6:.2f} M parameters; weights sha256
`{provenance['encoder_weights_sha256'][:16]}`) trained from random weights with a linear CTC head over
{metrics['model']['units']} {cfg.data.units} units on the input of `{cfg.model.hook_module}` (the vectors stage 1 quantizes).
Trained on split `{cfg.data.train_split}` of `{cfg.data.manifest}` (sha256 `{provenance['manifest']['sha256'][:16]}`,
{metrics['train']['utterances']} utterances), {metrics['train']['steps']} steps x {metrics['train']['batch_size']}
utterances ({metrics['train']['seconds']:.0f} s on {metrics['train']['device']}, {metrics['train']['threads']} thread(s)).

## Held-out {name} (split `{ev['split']}`, {ev['utterances']} utterances, greedy CTC decoding)

Final: **{ev['error_rate']:.4f}** (CTC loss {ev['loss']:.3f}).

| step | train CTC loss | eval CTC loss | eval {name} |
|---|---|---|---|
{curve}

## Use

```bash
speechless stage1 train -c configs/stage1/demo.yaml --set encoder.source=THIS_FOLDER
```

`config.json` + `model.safetensors` form a standalone `Gemma4AudioModel` folder (stage 1 reads it like any Gemma 4
checkpoint folder); the CTC head is in `ctc_head.safetensors` / `ctc_head.json`. Weights are safetensors and configs
JSON: nothing here is executed or unpickled. Code: {provenance['code_version']}.
"""
