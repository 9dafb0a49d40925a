"""Stage 1 recipe: the speech tokenizer.

Read top to bottom: setup -> extract encoder activations (cached, resumable) -> initialise the RVQ -> train with
held-out evaluation and checkpoints (resumable) -> evaluate final/best/averaged -> write the checkpoint folder and
its token JSONL -> push to the store.

The run folder (`run.out_dir`) is the checkpoint: model*.safetensors, config.json, metrics.json, provenance.json,
resolved_config.yaml, README.md (model card), and tokens/<split>.jsonl for every split of the manifest. Its `work/`
subfolder holds the feature cache and resume state; it is never pushed.

Several processes (`torchrun --nproc_per_node N speechless stage1 train ...`): feature shards are split among the
ranks; rank 0 initialises (or resumes) the codebooks and broadcasts them; every step each rank quantizes its slice of
the same global batch while vqp all-reduces the EMA statistics, so codebooks stay identical on all ranks; rank 0 alone
evaluates and writes. `run.out_dir` must be on a filesystem every rank can read.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from speechless.core import distributed, log
from speechless.core.config import Section, to_yaml
from speechless.core.io import read_json, sha256_file, write_json, write_text
from speechless.core.loggers import open_loggers
from speechless.core.runs import RunConfig, config_fingerprint, load_checkpoint, save_checkpoint
from speechless.core.store import StoreConfig
from speechless.core.training import finish_run, provenance, resume_state
from speechless.data.manifest import corpus_line, corpus_record, joined, manifest_sha256, manifest_splits
from speechless.speech.encoders import FRAMES_PER_SECOND, EncoderConfig, load_encoder, weights_sha256
from speechless.speech.features import extract_to_cache, read_cache
from speechless.speech.rvq import RVQConfig, SpeechRVQ, average_checkpoints
from speechless.speech.tokenizer import WEIGHT_FILES, quantizer_eval, tokens_from_vectors
from speechless.speech.tokens import write_token_jsonl


class DataConfig(Section):
    manifest: str = "runs/demo/corpus/all.jsonl"
    """JSONL manifest (NeMo-style fields) holding the train and eval splits. Token JSONL is written for EVERY split
    it holds (`tokens/<split>.jsonl`): later stages read real tokens of held-out audio from there."""
    train_split: str = "train"
    """Split whose audio trains the RVQ."""
    eval_split: str = "dev"
    """Held-out split for evaluation and best-checkpoint selection; several joined by '+' ('dev+test'). It needs
    >= 10 x codebook_size frames for a meaningful utilization: 20k frames = 800 s of audio for 2048 codes."""


class FeaturesConfig(Section):
    shard_size: int = 512
    """Utterances per feature-cache shard (the unit of resume)."""
    max_train_vectors: int = 2_000_000
    """Cap on train frames held in memory for training (uniformly sampled when the corpus has more; 2M x 1024 fp32 = 8 GB)."""


class TrainConfig(Section):
    steps: int = 2000
    """Training steps after initialisation."""
    batch_size: int = 16384
    """Vectors (frames) per step."""
    eval_every: int = 250
    """Evaluate on the held-out split every N steps (and at the end)."""
    checkpoint_every: int = 250
    """Write a resume checkpoint every N steps."""
    average_last: int = 4
    """The averaged model is the mean of the last K resume checkpoints' codebooks."""


class Stage1Config(Section):
    run: RunConfig = RunConfig(out_dir="runs/demo/stage1")
    data: DataConfig = DataConfig()
    encoder: EncoderConfig = EncoderConfig()
    features: FeaturesConfig = FeaturesConfig()
    rvq: RVQConfig = RVQConfig()
    train: TrainConfig = TrainConfig()
    store: StoreConfig = StoreConfig()


# ---------------------------------------------------------------------------------------------------------- setup

def _stack(utterances, cap: int | None, seed: int) -> torch.Tensor:
    vectors = torch.cat([u.vectors for u in utterances])
    if cap is not None and len(vectors) > cap:
        keep = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed))[:cap].sort().values
        vectors = vectors[keep]
    return vectors


# ---------------------------------------------------------------------------------------------------- checkpoints

def _load_resume(work: Path, step: int, rvq: SpeechRVQ) -> None:
    rvq.load_tensors(load_checkpoint(work, step), source=f"{work} step {step}")


def _averaged_model(work: Path, steps: list[int], cfg: RVQConfig, dim: int) -> SpeechRVQ:
    """The mean of the last K resume checkpoints' codebooks (one run, so codes stay aligned)."""
    models = []
    for step in steps:
        model = SpeechRVQ(cfg, dim)
        _load_resume(work, step, model)
        models.append(model)
    return average_checkpoints(models)


# ---------------------------------------------------------------------------------------------------------- train

def extract_features(cfg: Stage1Config, splits: dict[str, list], encoder, work: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The input of output_proj for every valid frame of every split, cached in resumable shards; and the train / eval
    vectors stacked (train capped at `features.max_train_vectors`)."""
    utterances = {}
    for split, entries in splits.items():
        paths = extract_to_cache(entries, encoder, cfg.encoder, work / "features" / split, cfg.features.shard_size)
        utterances[split] = read_cache(paths)
    train_vectors = _stack(utterances[cfg.data.train_split], cfg.features.max_train_vectors, cfg.run.seed)
    eval_vectors = _stack(joined(utterances, cfg.data.eval_split), None, cfg.run.seed)
    log.info(f"features: {len(train_vectors)} train frames, {len(eval_vectors)} eval frames, dim {train_vectors.shape[1]}")
    if len(eval_vectors) < 10 * cfg.rvq.codebook_size:
        log.warn(f"eval split has {len(eval_vectors)} frames < 10 x codebook_size: utilization is bounded by 1 - exp(-N/K) = "
                 f"{1 - torch.exp(torch.tensor(-len(eval_vectors) / cfg.rvq.codebook_size)).item():.3f}")
    return utterances, train_vectors, eval_vectors


def start_or_resume(cfg: Stage1Config, rvq: SpeechRVQ, train_vectors: torch.Tensor, work: Path, job) -> dict | None:
    """Initialise the codebooks from the train features, or resume from `work/` (rank 0; the other ranks receive its
    codebooks). Returns the training state on rank 0, None elsewhere."""
    fingerprint = config_fingerprint(cfg)
    state = resume_state(work, fingerprint, "stage 1") if job.is_main else None
    if job.is_main and state is None:
        log.info("initialising codebooks (residual k-means on train features)")
        rvq.initialize(train_vectors, seed=cfg.run.seed)
        state = {"fingerprint": fingerprint, "history": [], "best": None, "train_seconds": 0.0}
        save_checkpoint(work, 0, rvq.tensors(), None, state, cfg.train.average_last)
    elif job.is_main:
        _load_resume(work, state["step"], rvq)
        log.info(f"resuming from step {state['step']} of {cfg.train.steps}")
    rvq.load_tensors(distributed.broadcast_tensors(rvq.tensors()))
    return state


def train_codebooks(cfg: Stage1Config, rvq: SpeechRVQ, state: dict | None, train_vectors: torch.Tensor,
                    eval_vectors: torch.Tensor, out: Path, work: Path, job, curves) -> None:
    """EMA codebook updates, deterministic per step; held-out evaluation (best weights kept) and resume checkpoints.
    The initialised codebooks are evaluated too (step 0), so the history shows what fine-tuning changes. Every history
    record also goes to `curves` (`run.loggers`)."""
    step = distributed.broadcast_json(state["step"] if job.is_main else None)
    if job.is_main and step == 0 and not state["history"]:
        metrics = quantizer_eval(rvq, eval_vectors)
        state["history"].append({"step": 0, "eval": metrics})
        curves.log(0, state["history"][-1])
        state["best"] = {"step": 0, "mse": metrics["mse"]}
        rvq.save(out, weights=WEIGHT_FILES["best"])
        log.info(f"step 0 (initialised): eval mse {metrics['mse']:.4f} cosine {metrics['cosine']:.4f} "
                 f"utilization min {min(metrics['utilization']):.3f}")
    with log.progress() as bar:
        task = bar.add_task("training RVQ", total=cfg.train.steps, completed=step)
        while step < cfg.train.steps:
            tick = time.time()
            step += 1
            torch.manual_seed(cfg.run.seed * 1_000_003 + step)  # dead-code replacement samples from the global RNG
            batch = train_vectors[torch.randint(len(train_vectors), (cfg.train.batch_size,))]
            # Every rank draws the same global batch and quantizes its own slice of it.
            losses = rvq.train_step(batch[job.rank::job.world_size], global_batch=cfg.train.batch_size)
            losses = {k: distributed.all_reduce_mean(v) for k, v in losses.items()}
            if not job.is_main:
                bar.advance(task)
                continue
            state["train_seconds"] += time.time() - tick
            record = {"step": step, **{f"train_{k}": v for k, v in losses.items()}}
            if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                metrics = quantizer_eval(rvq, eval_vectors)
                record["eval"] = metrics
                if state["best"] is None or metrics["mse"] < state["best"]["mse"]:
                    state["best"] = {"step": step, "mse": metrics["mse"]}
                    rvq.save(out, weights=WEIGHT_FILES["best"])
                log.info(f"step {step}: eval mse {metrics['mse']:.4f} cosine {metrics['cosine']:.4f} "
                         f"utilization min {min(metrics['utilization']):.3f}")
            state["history"].append(record)
            curves.log(step, record)
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                save_checkpoint(work, step, rvq.tensors(), None, state, cfg.train.average_last)
            bar.advance(task)


def train(cfg: Stage1Config) -> dict:
    """Run stage 1 end to end; returns a summary (paths, metrics, pushed version)."""
    started = time.time()
    job = distributed.setup()
    out = Path(cfg.run.out_dir)
    work = out / "work"

    # Setup: data and encoder, checked before anything is written (bad input leaves the run folder as it was).
    splits = manifest_splits(cfg.data.manifest, cfg.data.train_split, cfg.data.eval_split)
    encoder = load_encoder(cfg.encoder)
    log.info(f"encoder: {cfg.encoder.source} (dim {encoder.dim}, weights {encoder.revision[:12]}, {encoder.device})")
    work.mkdir(parents=True, exist_ok=True)
    if job.is_main:
        write_text(out / "resolved_config.yaml", to_yaml(cfg))
    utterances, train_vectors, eval_vectors = extract_features(cfg, splits, encoder, work)

    # Train.
    rvq = SpeechRVQ(cfg.rvq, dim=encoder.dim)
    state = start_or_resume(cfg, rvq, train_vectors, work, job)
    with open_loggers(cfg.run) as curves:
        train_codebooks(cfg, rvq, state, train_vectors, eval_vectors, out, work, job, curves)
    if not job.is_main:
        distributed.barrier()  # until rank 0 has written the checkpoint folder
        return {"out_dir": str(out), "eval": None, "pushed": None, "revision": None, "rank": job.rank,
                "codebooks_sha256": weights_sha256(rvq)}

    # Evaluate the final, best and averaged models on the held-out split. The last step (step 0 without fine-tuning)
    # was always evaluated in training: its figures are the final model's, and the best model's when it was the best.
    rvq.save(out, weights=WEIGHT_FILES["final"])
    final_metrics = state["history"][-1]["eval"]
    averaged = _averaged_model(work, state["checkpoints"], cfg.rvq, encoder.dim)
    averaged.save(out, weights=WEIGHT_FILES["averaged"])
    best_metrics = (final_metrics if state["best"]["step"] == cfg.train.steps
                    else quantizer_eval(SpeechRVQ.load(out, weights=WEIGHT_FILES["best"]), eval_vectors))
    variants = {"final": final_metrics, "best": best_metrics, "averaged": quantizer_eval(averaged, eval_vectors)}

    # Save: config (RVQ + encoder), tokens, metrics, provenance, model card; push.
    config = read_json(out / "config.json")
    config["encoder"] = {**cfg.encoder.model_dump(mode="json"), "weights_sha256": encoder.revision, "source_commit": encoder.source_commit}
    config["frames_per_second"] = FRAMES_PER_SECOND
    write_json(out / "config.json", config)
    revision = sha256_file(out / WEIGHT_FILES["final"])
    for split, split_utterances in utterances.items():
        write_token_jsonl(out / "tokens" / f"{split}.jsonl", tokens_from_vectors(rvq, split_utterances, revision))
    metrics = {
        "eval": {**final_metrics, "split": cfg.data.eval_split, "frames": len(eval_vectors)},
        "eval_variants": variants,
        "dim": encoder.dim,
        "best_step": state["best"]["step"],
        "train": {"steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "frames": len(train_vectors),
                  "seconds": round(state["train_seconds"], 2),
                  "vectors_per_second": round(cfg.train.steps * cfg.train.batch_size / max(state["train_seconds"], 1e-9), 1)},
        "history": state["history"],
        "wall_seconds": round(time.time() - started, 2),
    }
    write_json(out / "metrics.json", metrics)
    record = provenance(
        "stage1", cfg,
        encoder={"source": cfg.encoder.source, "revision": cfg.encoder.revision, "commit": encoder.source_commit,
                 "weights_sha256": encoder.revision},
        manifest={"path": str(cfg.data.manifest), "sha256": manifest_sha256(cfg.data.manifest),
                  "train_split": cfg.data.train_split, "eval_split": cfg.data.eval_split},
        corpus=corpus_record(cfg.data.manifest),
        weights_sha256={name: sha256_file(out / file) for name, file in WEIGHT_FILES.items()},
        upstream=None)
    pushed = finish_run(out, "stage1", record, model_card(cfg, metrics, record), cfg.run.push, cfg.store, cfg.run.message)
    distributed.barrier()
    return {"out_dir": str(out), "eval": final_metrics, "pushed": pushed, "revision": revision, "rank": job.rank,
            "codebooks_sha256": weights_sha256(rvq)}

# ----------------------------------------------------------------------------------------------------- model card

def _encoder_words(encoder: EncoderConfig) -> str:
    if encoder.kind == "whisper":
        return (f"output states of the Whisper encoder `{encoder.source}` (CTranslate2, compute type {encoder.dtype}; 50 states/s "
                f"averaged in pairs; {encoder.whisper_pad_s:g} s of silence after the speech in each input)")
    return f"input of `{encoder.hook_module}` of the Gemma 4 audio encoder `{encoder.source}`"


def model_card(cfg: Stage1Config, metrics: dict, provenance: dict) -> str:
    ev = metrics["eval"]
    levels = "\n".join(f"| {i} | {u:.3f} | {p:.1f} |" for i, (u, p) in enumerate(zip(ev["utilization"], ev["perplexity"])))
    variants = "\n".join(f"| {name} | {m['mse']:.4f} | {m['nmse']:.4f} | {m['cosine']:.4f} | {min(m['utilization']):.3f} |"
                         for name, m in metrics["eval_variants"].items())
    return f"""---
library_name: speechless
tags: [speech-tokenizer, residual-vector-quantization, {cfg.encoder.kind}]
---
# speechless stage 1: speech tokenizer

Residual vector quantizer ({cfg.rvq.num_quantizers} codebooks x {cfg.rvq.codebook_size} codes) on the {metrics['dim']}-d {_encoder_words(cfg.encoder)}
(weights sha256 `{provenance['encoder']['weights_sha256'][:16]}`), 25 frames (tokens) per second.

{corpus_line(provenance.get('corpus'))}
Trained on split `{cfg.data.train_split}` of `{cfg.data.manifest}` (sha256 `{provenance['manifest']['sha256'][:16]}`),
{metrics['train']['frames']} frames, {metrics['train']['steps']} steps of {metrics['train']['batch_size']} vectors
({metrics['train']['vectors_per_second']} vectors/s). Evaluated on held-out split `{ev['split']}` ({ev['frames']} frames).

## Held-out metrics (final weights, `model.safetensors`)

| metric | value |
|---|---|
| MSE | {ev['mse']:.4f} |
| NMSE (MSE / variance) | {ev['nmse']:.4f} |
| cosine | {ev['cosine']:.4f} |
| mean-centred cosine | {ev['centered_cosine']:.4f} |

| codebook | utilization | perplexity |
|---|---|---|
{levels}

| weights | MSE | NMSE | cosine | min utilization |
|---|---|---|---|---|
{variants}

## Use

```bash
speechless tokenize audio speech.wav --tokenizer PATH_OR_REF --format json
```

Weights are safetensors and configs JSON: nothing in this folder is executed or unpickled.
Code: {provenance['code_version']}.
"""
