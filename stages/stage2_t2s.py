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
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from speechless import distributed, log
from speechless.config import Section, to_yaml
from speechless.errors import RuntimeFailure, UsageError
from speechless.io import read_json, sha256_file, write_json, write_text
from speechless.probe import CTCProbe, ProbeConfig, cer, train_probe
from speechless.runs import RunConfig, code_version, config_fingerprint, load_checkpoint, save_checkpoint, utc_now, verify_weights
from speechless.store import StoreConfig, is_store_ref, open_store
from speechless.t2s import FRAMES_PER_SECOND, T2SConfig, T2SModel, build_model, collate, count_parameters
from speechless.tokens import read_token_jsonl, token_row
from speechless.training import epoch_batches  # noqa: F401  (re-exported: stage 3 and the benchmarks use it)

WEIGHT_FILES = {"final": "model.safetensors", "best": "model.best.safetensors"}


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
    steps: int = Field(1200, ge=0)
    """Optimizer steps."""
    batch_size: int = Field(24, ge=1)
    """Utterances per step (length-bucketed: similar lengths share a batch)."""
    learning_rate: float = Field(2e-3, gt=0.0)
    """Peak AdamW learning rate."""
    warmup_steps: int = Field(100, ge=0)
    """Linear warmup steps, then cosine decay to `min_lr_ratio` x peak."""
    min_lr_ratio: float = Field(0.05, ge=0.0, le=1.0)
    """Final learning rate as a share of the peak."""
    weight_decay: float = Field(0.01, ge=0.0)
    """AdamW weight decay (not on norms, biases and embeddings)."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Gradient norm clipping."""
    join_prob: float = Field(0.0, ge=0.0, le=1.0)
    """Augmentation: the share of training utterances that are followed by another random utterance of the same speaker
    (text ids and codes both joined, within `model.max_text_tokens` and `data.max_frames`), so that each step sees new
    sentence pairs. Measured on the demo: 0.5 made the round trip worse (ratio 1.49 vs 1.34, benchmarks/RESULTS.md),
    hence off by default."""
    eval_every: int = Field(300, ge=1)
    """Eval loss per level on the eval split every N steps (and at the end); the best is kept."""
    checkpoint_every: int = Field(100, ge=1)
    """Resume checkpoint every N steps (in `work/`)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """'bf16' autocast, 'fp32', or 'auto' = bf16 on a GPU that supports it, else fp32 (on CPUs bf16 autocast was
    measured: see benchmarks/RESULTS.md)."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu', 'cuda', ..."""
    threads: int | None = Field(None, ge=1)
    """CPU threads for training and the round trip (None = torch's default). On a 2-core machine shared with other
    jobs, 1 thread was measured several times faster than 2 (threads fight for the cores)."""


class GenerateConfig(Section):
    temperature: float = Field(0.7, ge=0.0)
    """0 = greedy; > 0 = sampling at this temperature. Default 0.7 with top_k 30: on the demo, greedy decoding looped
    (10 of 180 held-out texts never emitted end-of-audio; durations 1.7x too long) while sampling ended every text at
    the right length (ratio 1.05) with a lower probe CER (benchmarks/RESULTS.md)."""
    top_k: int = Field(30, ge=0)
    """With sampling: keep only the k most likely codes per level (0 = all)."""
    guidance: float = Field(1.0, ge=0.0)
    """Classifier-free guidance weight w: 1 = off (the model as trained); w > 1 samples from u + w (c - u), the
    text-conditioned logits c pushed away from the text-free ones u, at twice the generation cost. Needs a model trained
    with model.unconditional_prob > 0."""
    max_seconds: float = Field(30.0, gt=0.0)
    """Cap on generated speech per text chunk (25 frames per second); a text that reaches it is cut, with a warning."""
    batch_size: int = Field(64, ge=1)
    """Texts generated together."""
    speaker: str | None = None
    """Voice to generate in (a speaker of the training data); None = the first one."""
    seed: int = 0
    """Seed for sampling."""


class EvalConfig(Section):
    split: str = "test"
    """Held-out split of the stage-1 tokens for the round trip (sentences the model never saw)."""
    max_utterances: int | None = Field(None, ge=1)
    """Evaluate on at most this many utterances of the split (None = all)."""
    weights: Literal["final", "best"] = "final"
    """Which weights generate the round-trip tokens."""
    speakers: Literal["each", "default"] = "each"
    """'each': generate every held-out utterance's text in that utterance's speaker (like-for-like with the real
    tokens); 'default': all in `generate.speaker`."""


class Stage2Config(Section):
    run: RunConfig = RunConfig(out_dir="runs/demo/stage2")
    data: DataConfig = DataConfig()
    model: T2SConfig = T2SConfig()
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()
    probe: ProbeConfig = ProbeConfig()
    eval: EvalConfig = EvalConfig()
    store: StoreConfig = StoreConfig()


# ---------------------------------------------------------------------------------------------------------- stage 1

@dataclass
class Stage1:
    folder: Path
    ref: str
    revision: str
    """sha256 of the stage-1 `model.safetensors`: the identity of its codes."""
    num_levels: int
    codebook_size: int
    version: str | None
    """`stage1@vN` when the version is known (a store ref, or a folder matching a version in the local store)."""
    store_revision: str | None

    def record(self) -> dict:
        return {"ref": self.ref, "version": self.version, "store_revision": self.store_revision, "revision": self.revision}


def resolve_stage1(ref: str, store_cfg: StoreConfig | None = None) -> Stage1:
    """A stage-1 run folder or store ref -> its folder, weights revision and code layout."""
    version = store_revision = None
    if Path(ref).is_dir():
        folder = Path(ref)
    elif is_store_ref(ref):
        store = open_store(store_cfg)
        info = store.resolve(ref)
        folder = store.download(ref)
        version, store_revision = info.ref, info.revision
    else:
        raise UsageError(f"{ref}: not a stage-1 run folder nor a store ref like stage1@v1")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise UsageError(f"{folder}: no model.safetensors; not a finished stage-1 run (train it first)")
    meta = read_json(folder / "config.json")
    if "num_quantizers" not in meta or "codebook_size" not in meta:
        raise UsageError(f"{folder / 'config.json'}: not a stage-1 checkpoint config (no num_quantizers/codebook_size)")
    revision = sha256_file(weights)
    if version is None:
        version, store_revision = _find_in_store(revision, store_cfg)
    return Stage1(folder, ref, revision, int(meta["num_quantizers"]), int(meta["codebook_size"]), version, store_revision)


def _find_in_store(revision: str, store_cfg: StoreConfig | None) -> tuple[str | None, str | None]:
    """The local-store version of stage 1 whose weights have this sha256, if any (provenance for a folder ref)."""
    try:
        store = open_store(store_cfg)
        if not hasattr(store, "root"):
            return None, None
        for info in reversed(store.list("stage1")):
            weights = Path(info.location) / "model.safetensors"
            if weights.is_file() and sha256_file(weights) == revision:
                return info.ref, info.revision
    except (UsageError, RuntimeFailure, OSError):
        pass
    return None, None


def check_stage1_match(model: T2SModel, stage1_ref: str | None, store_cfg: StoreConfig | None = None) -> None:
    """Refuse a stage-1 version other than the one the model was trained on (its codes would mean something else)."""
    if stage1_ref is None:
        return
    other = resolve_stage1(stage1_ref, store_cfg)
    if other.revision != model.stage1["revision"]:
        raise UsageError(
            f"stage-1 mismatch: this stage-2 model was trained on stage-1 codes of revision {model.stage1['revision'][:12]} "
            f"({model.stage1.get('version') or model.stage1.get('ref')}), but {stage1_ref} has revision {other.revision[:12]}; "
            f"use the matching stage-1 version or retrain stage 2 on this one")


def load_split(stage1: Stage1, split: str, max_frames: int | None = None) -> list[dict]:
    path = stage1.folder / "tokens" / f"{split}.jsonl"
    if not path.is_file():
        present = sorted(p.stem for p in (stage1.folder / "tokens").glob("*.jsonl")) if (stage1.folder / "tokens").is_dir() else []
        raise UsageError(f"{path}: no token file for split '{split}' (splits present: {', '.join(present) or 'none'})")
    rows = read_token_jsonl(path, expect_revision=stage1.revision, codebook_size=stage1.codebook_size)
    for number, row in enumerate(rows, 1):
        if len(row["codes"]) != stage1.num_levels:
            raise UsageError(f"{path}: row {number} has {len(row['codes'])} levels, stage 1 has {stage1.num_levels}")
    kept = [r for r in rows if r.get("text") and r["frames"] > 0 and (max_frames is None or r["frames"] <= max_frames)]
    if len(kept) < len(rows):
        log.warn(f"{path}: left out {len(rows) - len(kept)} utterance(s) without text, without frames or over {max_frames} frames")
    if not kept:
        raise UsageError(f"{path}: no usable utterances (need text and frames)")
    return kept


def speaker_map(cfg: DataConfig, stage1: Stage1) -> dict[str, str]:
    """Utterance id -> speaker, from the manifest (lenient: only `id` and the speaker field are read)."""
    manifest = cfg.manifest
    if manifest is None:
        prov = stage1.folder / "provenance.json"
        recorded = read_json(prov).get("manifest", {}) if prov.is_file() else {}
        manifest = recorded.get("path")
        if manifest and not Path(manifest).is_file():
            log.warn(f"stage-1 manifest {manifest} not found: no speaker ids (set data.manifest)")
            return {}
        # a relative path is read from the working folder, where another manifest may stand under the same name
        if manifest and recorded.get("sha256") and sha256_file(manifest) != recorded["sha256"]:
            log.warn(f"{manifest} is not the manifest stage 1 read (sha256 differs; a relative path is read from the "
                     "working folder): no speaker ids (set data.manifest)")
            return {}
    if not manifest:
        return {}
    if not Path(manifest).is_file():
        raise UsageError(f"data.manifest {manifest}: file not found")
    out = {}
    for line in Path(manifest).read_text(encoding="utf-8").split("\n"):  # not splitlines(): U+2028 in a text is no line end
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "id" in row and row.get(cfg.speaker_field) is not None:
                out[str(row["id"])] = str(row[cfg.speaker_field])
    return out


def stage1_codebooks(stage1: Stage1) -> torch.Tensor:
    """(Q, K, D) codebooks of the stage-1 version, in its standardised units (what a 'vectors' probe reads)."""
    from speechless.rvq import SpeechRVQ

    return SpeechRVQ.load(stage1.folder).codebooks()


def load_probe(probe_dir: Path, stage1: Stage1) -> CTCProbe:
    """A saved probe, with the stage-1 codebooks when it reads decoded vectors."""
    reads_vectors = read_json(probe_dir / "config.json").get("probe", {}).get("input") == "vectors"
    return CTCProbe.load(probe_dir, stage1_codebooks(stage1) if reads_vectors else None)


def row_codes(row: dict) -> torch.Tensor:
    return torch.tensor(row["codes"], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------- training

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def make_optimizer(model: T2SModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.learning_rate, betas=(0.9, 0.98), eps=1e-8)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Warmup then cosine to min_lr_ratio (step counts from 0)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _items(rows: list[dict], model: T2SModel, speakers: dict[str, str]) -> list[tuple[list[int], torch.Tensor, int]]:
    items = []
    for row in rows:
        encoded = model.text.encode(row["text"], where=f"utterance {row['id']}")
        ids = [i for chunk in encoded.chunks for i in chunk][: model.cfg.max_text_tokens]
        spk = model.speakers.index(speakers[row["id"]]) if model.speaker_embed is not None and row["id"] in speakers else 0
        items.append((ids, row_codes(row), spk))
    return items


@torch.no_grad()
def eval_loss(model: T2SModel, items: list, batch_size: int, device: torch.device, amp: torch.dtype | None) -> dict:
    """Mean cross-entropy per level (and overall) on held-out items, weighted by target counts."""
    model.eval()
    sums = torch.zeros(model.num_levels, dtype=torch.float64)
    counts = torch.zeros(model.num_levels, dtype=torch.float64)
    order = sorted(range(len(items)), key=lambda i: items[i][1].shape[1])
    for start in range(0, len(order), batch_size):
        batch = collate([items[i] for i in order[start:start + batch_size]], model.delays, model.codebook_size).to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model.loss(batch)
        sums += (out["level_loss"].double() * out["level_count"].double()).cpu()
        counts += out["level_count"].double().cpu()
    level = (sums / counts.clamp_min(1)).tolist()
    return {"loss": sum(level) / len(level), "level_loss": [round(v, 4) for v in level]}


def join_utterances(picked: list, pool: list, by_speaker: dict[int, list[int]], prob: float, rng: random.Random,
                    max_tokens: int, max_frames: int) -> list:
    """`join_prob` augmentation: each picked item is, with probability `prob`, followed by a random utterance of the
    same speaker from `pool` (ids concatenated: the Metaspace tokenizer encodes "A B" as ids(A) + ids(B))."""
    out = []
    for ids, codes, spk in picked:
        if prob > 0 and rng.random() < prob:
            other_ids, other_codes, _ = pool[rng.choice(by_speaker[spk])]
            if len(ids) + len(other_ids) <= max_tokens and codes.shape[1] + other_codes.shape[1] <= max_frames:
                ids, codes = ids + other_ids, torch.cat([codes, other_codes], 1)
        out.append((ids, codes, spk))
    return out


def _load_resume(work: Path, step: int, model: T2SModel, optimizer) -> None:
    model.load_weights(load_checkpoint(work, step, optimizer, model.device), f"{work} step {step}")


def train_model(cfg: Stage2Config, model: T2SModel, train_items: list, eval_items: list, out: Path, work: Path) -> dict:
    """The training loop (resumable). Writes model.best.safetensors whenever the eval loss improves; returns state."""
    job = distributed.group()
    device = distributed.local_device(_device(cfg.train.device))
    amp = _autocast_dtype(cfg.train.precision, device)
    model.to(device)
    optimizer = make_optimizer(model, cfg.train)
    fingerprint = config_fingerprint(cfg)
    state_file = work / "state.json"
    state = read_json(state_file) if state_file.exists() else None
    if state is not None and state.get("fingerprint") != fingerprint:
        log.warn(f"{work}: resume state was made with another config; training restarts from step 0")
        state = None
    if state is not None and not (work / "checkpoints" / f"step-{state['step']:06d}.safetensors").is_file():
        log.warn(f"{work}: resume checkpoint of step {state['step']} is missing; training restarts from step 0")
        state = None
    if state is None:
        state = {"fingerprint": fingerprint, "step": 0, "history": [], "best": None, "train_seconds": 0.0, "frames": 0}
        if job.is_main:
            save_checkpoint(work, 0, model.tensors(), optimizer, state, keep=2)
    else:
        _load_resume(work, state["step"], model, optimizer)
        log.info(f"resuming stage 2 from step {state['step']} of {cfg.train.steps}")
    distributed.barrier()  # every rank has read the resume state before rank 0 writes again
    # Several processes: DDP averages gradients; each rank trains on its share of every (global) batch.
    loss_fn = distributed.data_parallel(model, "loss")
    lengths = [item[1].shape[1] + len(item[0]) for item in train_items]
    by_speaker: dict[int, list[int]] = {}
    for index, item in enumerate(train_items):
        by_speaker.setdefault(item[2], []).append(index)
    per_epoch = math.ceil(len(train_items) / cfg.train.batch_size)
    step = state["step"]
    log.info(f"training on {device}{' (bf16 autocast)' if amp else ''}: {len(train_items)} utterances, "
             f"{count_parameters(model) / 1e6:.2f} M parameters, {cfg.train.steps} steps of {cfg.train.batch_size}")
    window: list[float] = []
    with log.progress() as bar:
        task = bar.add_task("training stage 2", total=cfg.train.steps, completed=step)
        while step < cfg.train.steps:
            tick = time.time()
            epoch, index = divmod(step, per_epoch)
            batch_idx = epoch_batches(lengths, cfg.train.batch_size, cfg.run.seed, epoch)[index]
            torch.manual_seed(cfg.run.seed * 1_000_003 + step)
            for group in optimizer.param_groups:
                group["lr"] = cfg.train.learning_rate * lr_factor(step, cfg.train)
            model.train()
            model.own_code_share = step / cfg.train.steps
            picked = join_utterances([train_items[i] for i in batch_idx], train_items, by_speaker, cfg.train.join_prob,
                                     random.Random(cfg.run.seed * 1_000_003 + step), model.cfg.max_text_tokens,
                                     cfg.data.max_frames)
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
            state["frames"] += int(sum(codes.shape[1] for _, codes, _ in picked))
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
                log.info(f"step {step}: train loss {sum(window) / len(window):.3f}, eval loss {ev['loss']:.3f} "
                         f"(levels {' '.join(f'{v:.2f}' for v in ev['level_loss'])})")
                window = []
            state["history"].append(record)
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                save_checkpoint(work, step, model.tensors(), optimizer, state, keep=2)
            bar.advance(task)
    if state["best"] is None and job.is_main:  # steps == 0
        ev = eval_loss(model, eval_items, cfg.train.batch_size * 2, device, amp)
        state["best"] = {"step": 0, "loss": ev["loss"]}
        model.save_weights(out / WEIGHT_FILES["best"])
    return state


# -------------------------------------------------------------------------------------------------------- generation

@dataclass
class GenRequest:
    id: str
    text: str
    speaker: str | None = None


def generate_rows(model: T2SModel, requests: list[GenRequest], gen: GenerateConfig, use_cache: bool = True,
                  on_batch=None, warn_limit: int = 5) -> list[dict]:
    """Token rows (the stage-1 JSONL format, plus `source`, `speaker`, `capped`) for each request, in request order.

    Texts are checked and tokenized first (a bad text is a UsageError naming its id before anything is generated);
    chunks of long texts are generated separately and concatenated; rows are batched by text length.
    """
    encoded = []
    notes_shown = 0
    for req in requests:
        enc = model.text.encode(req.text, where=f"text {req.id!r}")
        for note in enc.notes:
            if notes_shown < warn_limit:
                log.warn(f"text {req.id!r}: {note}")
            notes_shown += 1
        encoded.append(enc)
    if notes_shown > warn_limit:
        log.warn(f"... {notes_shown - warn_limit} more text warning(s) of the same kinds")
    spk = [model.speaker_index(req.speaker if req.speaker is not None else gen.speaker) for req in requests]
    jobs = [(r, c) for r, enc in enumerate(encoded) for c in range(len(enc.chunks))]
    jobs.sort(key=lambda job: len(encoded[job[0]].chunks[job[1]]))
    pieces: dict[tuple[int, int], torch.Tensor] = {}
    capped_rows: set[int] = set()
    max_frames = max(1, int(round(gen.max_seconds * FRAMES_PER_SECOND)))
    generator = torch.Generator().manual_seed(gen.seed)
    for start in range(0, len(jobs), gen.batch_size):
        group = jobs[start:start + gen.batch_size]
        codes, capped = model.generate([encoded[r].chunks[c] for r, c in group], [spk[r] for r, _ in group],
                                       max_frames=max_frames, temperature=gen.temperature, top_k=gen.top_k,
                                       use_cache=use_cache, generator=generator, guidance=gen.guidance)
        for (r, c), code, cap in zip(group, codes, capped):
            pieces[(r, c)] = code
            if cap:
                capped_rows.add(r)
        if on_batch is not None:
            on_batch(len({r for r, _ in group}), group)
    if capped_rows:
        ids = ", ".join(repr(requests[r].id) for r in sorted(capped_rows)[:5])
        log.warn(f"{len(capped_rows)} text(s) reached the cap of {max_frames} frames ({gen.max_seconds:g} s, generate.max_seconds) "
                 f"without end-of-audio and were cut there: {ids}")
    rows = []
    for r, req in enumerate(requests):
        code = torch.cat([pieces[(r, c)] for c in range(len(encoded[r].chunks))], 1)  # (Q, T)
        frames = code.shape[1]
        row = token_row(req.id, req.text, code.T, [[0.0, round(frames / FRAMES_PER_SECOND, 3), frames]], model.codebook_size,
                        model.stage1["revision"])
        row.update(source="stage2", speaker=model.speakers[spk[r]] if model.speaker_embed is not None else None,
                   capped=r in capped_rows)
        rows.append(row)
    return rows


def read_text_requests(path: Path) -> list[GenRequest]:
    """Texts to convert: JSONL rows with `text` (and optional `id`, `speaker`); `.txt`: one text per line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: input file not found")
    requests, seen = [], set()
    lines = path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")  # not splitlines(): U+2028 in a text is no line end
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            req = GenRequest(id=f"{path.stem}-{number:06d}", text=line)
        else:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or "text" not in row:
                raise UsageError(f"{path}:{number}: expected a JSON object with a 'text' field")
            req = GenRequest(id=str(row.get("id", f"{path.stem}-{number:06d}")), text=row["text"], speaker=row.get("speaker"))
        if req.id in seen:
            raise UsageError(f"{path}:{number}: id {req.id!r} appears twice; ids name output rows and must be unique")
        seen.add(req.id)
        requests.append(req)
    if not requests:
        raise UsageError(f"{path}: no texts in the file")
    return requests


def _read_partial(partial: Path, model: T2SModel, model_revision: str) -> tuple[list[str], int]:
    """Complete rows already written by an interrupted run (their raw lines), dropping a half-written last line."""
    data = partial.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty when the last line is complete
    good, dropped = [], 0
    for number, raw in enumerate(lines, 1):
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RuntimeFailure(f"{partial}:{number}: corrupt line inside the partial output; delete the file to start over") from exc
        if row.get("stage1_revision") != model.stage1["revision"] or row.get("stage2_revision") != model_revision:
            raise UsageError(f"{partial}: was written by another stage-2 model or stage-1 version; delete it or choose another --output")
        good.append(raw.decode("utf-8"))
    if tail.strip():
        dropped = 1
    return good, dropped


def generate_corpus(model: T2SModel, model_revision: str, input_path: Path, output: Path, gen: GenerateConfig,
                    skip_invalid: bool = False) -> dict:
    """Convert a text corpus to token JSONL, resumably: rows go to `<output>.partial` (appended and flushed after each
    batch); a re-run keeps its complete rows, drops a half-written last line, and generates only what is missing; the
    finished file is written to `output` (atomically) and the partial file removed. With greedy decoding a resumed run
    gives exactly the rows of an uninterrupted one; with sampling, rows generated after the resume are new draws."""
    requests = read_text_requests(input_path)
    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    if output.exists():
        existing = read_token_jsonl(output)
        if existing and (existing[0]["stage1_revision"] != model.stage1["revision"] or existing[0].get("stage2_revision") != model_revision):
            raise UsageError(f"{output}: exists and was written by another stage-2 model or stage-1 version; choose another --output")
        if {r["id"] for r in existing} == {r.id for r in requests}:
            log.info(f"{output}: already complete ({len(existing)} rows)")
            return {"output": str(output), "rows": len(existing), "generated": 0, "resumed": len(existing), "skipped": 0}
        raise UsageError(f"{output}: exists with other texts; choose another --output or delete it")
    done_lines, dropped = ([], 0)
    if partial.exists():
        done_lines, dropped = _read_partial(partial, model, model_revision)
        if dropped:
            log.warn(f"{partial}: dropped a half-written last line left by an interrupted run; that text is generated again")
        log.info(f"resuming: {len(done_lines)} of {len(requests)} texts already done in {partial}")
    done = {json.loads(line)["id"] for line in done_lines}
    todo = [r for r in requests if r.id not in done]
    skipped = []
    if skip_invalid:
        valid = []
        for req in todo:
            try:
                model.text.encode(req.text, where=f"text {req.id!r}")
                valid.append(req)
            except UsageError as exc:
                skipped.append({"id": req.id, "reason": str(exc)})
        if skipped:
            log.warn(f"skipping {len(skipped)} invalid text(s), e.g. {skipped[0]['reason']}")
        todo = valid
    else:
        for req in todo:  # fail before generating anything
            model.text.encode(req.text, where=f"text {req.id!r}")
    with open(partial, "wb") as handle:  # rewrite the good lines (drops any half line), then append
        handle.write("".join(line + "\n" for line in done_lines).encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
    by_id = {}
    with log.progress() as bar, open(partial, "ab") as handle:
        task = bar.add_task("generating tokens", total=len(requests) - len(skipped), completed=len(done))
        step = max(1, gen.batch_size)
        for start in range(0, len(todo), step):
            group = todo[start:start + step]
            rows = generate_rows(model, group, gen)
            for row in rows:
                row["stage2_revision"] = model_revision
                by_id[row["id"]] = row
            handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
            bar.advance(task, len(group))
    # final file in input order, written atomically, then the partial file goes
    lines = {json.loads(line)["id"]: line for line in done_lines}
    lines.update({rid: json.dumps(row, ensure_ascii=False) for rid, row in by_id.items()})
    ordered = [lines[r.id] for r in requests if r.id in lines]
    write_text(output, "".join(line + "\n" for line in ordered))
    partial.unlink(missing_ok=True)
    if skipped:
        write_text(output.with_name(output.name + ".skipped.jsonl"), "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped))
    return {"output": str(output), "rows": len(ordered), "generated": len(by_id), "resumed": len(done_lines), "skipped": len(skipped)}


# -------------------------------------------------------------------------------------------------------- evaluation

def dtw_cosine(generated: list[torch.Tensor], real: list[torch.Tensor], center: torch.Tensor | None = None) -> list[float]:
    """Mean cosine similarity along the DTW path (cost 1 - cos) between each pair of (T, D) vector sequences.

    All pairs run together: one loop over anti-diagonals of a padded (P, N, M) cost tensor.
    """
    if not generated:
        return []
    p = len(generated)
    n = max(g.shape[0] for g in generated)
    m = max(r.shape[0] for r in real)
    cost = torch.full((p, n, m), math.inf, dtype=torch.float64)
    for i, (g, r) in enumerate(zip(generated, real)):
        if center is not None:
            g, r = g - center, r - center
        gn = torch.nn.functional.normalize(g.double(), dim=-1)
        rn = torch.nn.functional.normalize(r.double(), dim=-1)
        cost[i, : g.shape[0], : r.shape[0]] = 1 - gn @ rn.T
    acc = torch.full((p, n, m), math.inf, dtype=torch.float64)
    length = torch.zeros((p, n, m), dtype=torch.float64)
    acc[:, 0, 0] = cost[:, 0, 0]
    length[:, 0, 0] = 1
    inf = torch.full((p, 1), math.inf, dtype=torch.float64)
    for k in range(1, n + m - 1):
        i = torch.arange(max(0, k - m + 1), min(k, n - 1) + 1)
        j = k - i
        up = torch.where((i >= 1)[None], acc[:, (i - 1).clamp_min(0), j], inf)
        left = torch.where((j >= 1)[None], acc[:, i, (j - 1).clamp_min(0)], inf)
        diag = torch.where(((i >= 1) & (j >= 1))[None], acc[:, (i - 1).clamp_min(0), (j - 1).clamp_min(0)], inf)
        stacked = torch.stack([diag, up, left], -1)
        best, arg = stacked.min(-1)
        prev_len = torch.stack([length[:, (i - 1).clamp_min(0), (j - 1).clamp_min(0)], length[:, (i - 1).clamp_min(0), j],
                                length[:, i, (j - 1).clamp_min(0)]], -1).gather(-1, arg.unsqueeze(-1)).squeeze(-1)
        acc[:, i, j] = cost[:, i, j] + best
        length[:, i, j] = prev_len + 1
    out = []
    for idx, (g, r) in enumerate(zip(generated, real)):
        a, b = g.shape[0] - 1, r.shape[0] - 1
        out.append(float(1 - acc[idx, a, b] / length[idx, a, b]))
    return out


def _usage(codes: list[torch.Tensor], codebook_size: int) -> dict:
    from speechless.metrics import code_usage, usage_stats

    flat = torch.cat([c.T for c in codes if c.shape[1]]) if any(c.shape[1] for c in codes) else torch.zeros(0, codes[0].shape[0], dtype=torch.long)
    utilization, perplexity = usage_stats(code_usage(flat, codebook_size))
    return {"utilization": [round(u, 4) for u in utilization], "perplexity": [round(p, 1) for p in perplexity], "frames": int(flat.shape[0])}


def round_trip(model: T2SModel, probe: CTCProbe, rows: list[dict], speakers: dict[str, str], gen: GenerateConfig,
               ev: EvalConfig, stage1_folder: Path) -> tuple[dict, list[dict]]:
    """The semantic round trip on held-out rows: (eval metrics, generated token rows)."""
    from speechless.rvq import SpeechRVQ

    started = time.time()
    requests = [GenRequest(r["id"], r["text"], speakers.get(r["id"]) if ev.speakers == "each" and speakers.get(r["id"]) in model.speakers else None)
                for r in rows]
    generated = generate_rows(model, requests, gen)
    gen_seconds = time.time() - started
    real_codes = [row_codes(r) for r in rows]
    gen_codes = [row_codes(r) for r in generated]
    texts = [r["text"] for r in rows]
    hyp_real = probe.transcribe(real_codes)
    hyp_gen = probe.transcribe(gen_codes)
    real_frames = torch.tensor([c.shape[1] for c in real_codes], dtype=torch.float64)
    gen_frames = torch.tensor([c.shape[1] for c in gen_codes], dtype=torch.float64)
    ratio = gen_frames / real_frames
    rvq = SpeechRVQ.load(stage1_folder)

    def vectors(codes: list[torch.Tensor]) -> list[torch.Tensor]:
        return [rvq.decode(c.T) if c.shape[1] else torch.zeros(1, rvq.dim) for c in codes]

    real_vec, gen_vec = vectors(real_codes), vectors(gen_codes)
    center = torch.cat(real_vec).double().mean(0)
    cos = dtw_cosine(gen_vec, real_vec)
    ccos = dtw_cosine(gen_vec, real_vec, center)
    # references: real vs real of the same sentence from another speaker, and of a different sentence
    by_text: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        by_text.setdefault(t, []).append(i)
    same = [(i, next(j for j in by_text[t] if j != i)) for i, t in enumerate(texts) if len(by_text[t]) > 1]
    rng = random.Random(0)
    other = [(i, j) for i in range(len(texts)) for j in [rng.randrange(len(texts))] if texts[j] != texts[i]]
    ref_same = dtw_cosine([real_vec[i] for i, _ in same], [real_vec[j] for _, j in same], center) if same else []
    ref_other = dtw_cosine([real_vec[i] for i, _ in other], [real_vec[j] for _, j in other], center) if other else []
    per_speaker = {}
    for spk in sorted({speakers.get(r["id"]) for r in rows if speakers.get(r["id"])}):
        idx = [i for i, r in enumerate(rows) if speakers.get(r["id"]) == spk]
        per_speaker[spk] = {"utterances": len(idx), "probe_cer_real": round(cer([texts[i] for i in idx], [hyp_real[i] for i in idx]), 4),
                            "probe_cer_generated": round(cer([texts[i] for i in idx], [hyp_gen[i] for i in idx]), 4)}

    def mean(values) -> float | None:
        values = list(values)
        return round(sum(values) / len(values), 4) if values else None

    metrics = {
        "split": ev.split,
        "utterances": len(rows),
        "sentences": len(by_text),
        "probe_cer_real": round(cer(texts, hyp_real), 4),
        "probe_cer_generated": round(cer(texts, hyp_gen), 4),
        "probe_cer_ratio": round(cer(texts, hyp_gen) / max(cer(texts, hyp_real), 1e-9), 3),
        "per_speaker": per_speaker,
        "duration": {
            "real_frames_mean": round(float(real_frames.mean()), 2),
            "generated_frames_mean": round(float(gen_frames.mean()), 2),
            "ratio_mean": round(float(ratio.mean()), 4),
            "abs_relative_error_mean": round(float((ratio - 1).abs().mean()), 4),
            "correlation": round(float(torch.corrcoef(torch.stack([real_frames, gen_frames]))[0, 1]), 4) if len(rows) > 1 else None,
            "capped": sum(bool(r["capped"]) for r in generated),
        },
        "code_usage": {"generated": _usage(gen_codes, model.codebook_size), "real": _usage(real_codes, model.codebook_size)},
        "dtw_cosine": mean(cos),
        "dtw_centered_cosine": mean(ccos),
        "dtw_centered_cosine_reference": {"real_same_sentence_other_speaker": mean(ref_same),
                                          "real_different_sentence": mean(ref_other)},
        "generation": {"temperature": gen.temperature, "top_k": gen.top_k, "guidance": gen.guidance, "speakers": ev.speakers,
                       "seconds": round(gen_seconds, 2), "frames_per_second": round(float(gen_frames.sum()) / max(gen_seconds, 1e-9), 1)},
        "examples": [{"id": rows[i]["id"], "text": texts[i], "probe_real": hyp_real[i], "probe_generated": hyp_gen[i],
                      "frames_real": int(real_frames[i]), "frames_generated": int(gen_frames[i])} for i in range(min(5, len(rows)))],
    }
    return metrics, generated


# ---------------------------------------------------------------------------------------------------------- the stage

def train(cfg: Stage2Config) -> dict:
    """Run stage 2 end to end; returns a summary (paths, round-trip metrics, pushed version)."""
    started = time.time()
    job = distributed.setup()
    out = Path(cfg.run.out_dir)
    work = out / "work"
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    # Setup: stage-1 version and its tokens (checked before anything is written).
    stage1 = resolve_stage1(cfg.data.stage1, cfg.store)
    train_rows = load_split(stage1, cfg.data.train_split, cfg.data.max_frames)
    eval_rows = load_split(stage1, cfg.data.eval_split, cfg.data.max_frames)
    test_rows = load_split(stage1, cfg.eval.split)
    if cfg.eval.max_utterances is not None:
        test_rows = test_rows[: cfg.eval.max_utterances]
    overlap = {r["text"] for r in train_rows} & {r["text"] for r in test_rows}
    if overlap:
        log.warn(f"{len(overlap)} sentence(s) of split '{cfg.eval.split}' also occur in '{cfg.data.train_split}': the round trip is not fully held out")
    speakers = speaker_map(cfg.data, stage1)
    work.mkdir(parents=True, exist_ok=True)
    if job.is_main:
        write_text(out / "resolved_config.yaml", to_yaml(cfg))
    speaker_names = sorted({speakers[r["id"]] for r in train_rows if r["id"] in speakers}) if cfg.model.speaker_embedding else []
    if cfg.generate.speaker is not None and cfg.generate.speaker not in speaker_names:
        raise UsageError(f"generate.speaker {cfg.generate.speaker!r}: not a training speaker ({', '.join(speaker_names) or 'none'})")
    if cfg.generate.speaker is not None:  # the default voice is the first speaker
        speaker_names.remove(cfg.generate.speaker)
        speaker_names.insert(0, cfg.generate.speaker)
    log.info(f"stage 1: {stage1.version or stage1.ref} (revision {stage1.revision[:12]}, {stage1.num_levels} x {stage1.codebook_size}); "
             f"{len(train_rows)} train / {len(eval_rows)} eval / {len(test_rows)} round-trip utterances; speakers: {', '.join(speaker_names) or 'none'}")

    # Model: tokenizer + backbone + level embeddings/heads (deterministic for the seed; resumed weights replace them).
    model = build_model(cfg.model, [r["text"] for r in train_rows], stage1.num_levels, stage1.codebook_size, speaker_names,
                        stage1.record(), seed=cfg.run.seed, train_frames=[r["frames"] for r in train_rows],
                        train_speakers=[speakers.get(r["id"], "") for r in train_rows])
    train_items = _items(train_rows, model, speakers)
    eval_items = _items(eval_rows, model, speakers)

    # Train.
    state = train_model(cfg, model, train_items, eval_items, out, work)
    if not job.is_main:  # torchrun job: rank 0 evaluates and writes the checkpoint
        return {"out_dir": str(out), "eval": None, "pushed": None, "revision": None, "stage1": stage1.record(), "rank": job.rank}
    model.save(out, WEIGHT_FILES["final"])

    # The judge: a CTC probe on REAL tokens of the train split (cached in work/ for resumes).
    probe_dir = out / "probe"
    probe_key = config_fingerprint(cfg.probe) + stage1.revision
    probe_meta = probe_dir / "config.json"
    codebooks = stage1_codebooks(stage1) if cfg.probe.input == "vectors" else None
    if probe_meta.is_file() and read_json(probe_meta).get("key") == probe_key:
        probe = CTCProbe.load(probe_dir, codebooks)
        probe_summary = read_json(probe_meta)["summary"]
        log.info("probe: reusing the one already trained in this run")
    else:
        log.info(f"training the CTC probe on {len(train_rows)} real utterances ({cfg.probe.steps} steps)")
        probe, probe_summary = train_probe([row_codes(r) for r in train_rows], [r["text"] for r in train_rows], cfg.probe,
                                           stage1.num_levels, stage1.codebook_size, log_every=max(1, cfg.probe.steps // 4), log=log.info,
                                           codebooks=codebooks)
        probe.save(probe_dir, extra={"key": probe_key, "summary": probe_summary, "stage1_revision": stage1.revision})

    # Round trip on held-out sentences.
    eval_model = model if cfg.eval.weights == "final" else T2SModel.load(out, WEIGHT_FILES["best"])
    eval_model.to("cpu")
    log.info(f"round trip on {len(test_rows)} held-out utterances of split '{cfg.eval.split}'")
    metrics_eval, generated = round_trip(eval_model, probe, test_rows, speakers, cfg.generate, cfg.eval, stage1.folder)
    model_revision = sha256_file(out / WEIGHT_FILES["final"])
    for row in generated:
        row["stage2_revision"] = model_revision
    write_text(out / "tokens" / f"generated_{cfg.eval.split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generated))
    log.info(f"probe CER: real {metrics_eval['probe_cer_real']:.4f}, generated {metrics_eval['probe_cer_generated']:.4f}; "
             f"DTW centred cosine {metrics_eval['dtw_centered_cosine']}")

    # Save: metrics, provenance, model card.
    final_eval = state["history"][-1].get("eval") if state["history"] else None
    metrics = {
        "eval": metrics_eval,
        "eval_loss": final_eval,
        "best": state["best"],
        "probe": probe_summary,
        "model": {"parameters": count_parameters(model), "frame_mode": cfg.model.frame_mode, "delays": model.delays,
                  "backbone": model.backbone_source, "text_vocab": model.text.vocab_size, "speakers": model.speakers},
        "train": {"steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "utterances": len(train_rows),
                  "seconds": round(state["train_seconds"], 2), "frames_seen": state["frames"],
                  "frames_per_second": round(state["frames"] / max(state["train_seconds"], 1e-9), 1)},
        "history": state["history"],
        "wall_seconds": round(time.time() - started, 2),
    }
    write_json(out / "metrics.json", metrics)
    provenance = {
        "stage": "stage2",
        "stage1": {**stage1.record(), "num_levels": stage1.num_levels, "codebook_size": stage1.codebook_size},
        "data": {split: {"file": f"tokens/{split}.jsonl", "sha256": sha256_file(stage1.folder / "tokens" / f"{split}.jsonl"), "utterances": n}
                 for split, n in ((cfg.data.train_split, len(train_rows)), (cfg.data.eval_split, len(eval_rows)), (cfg.eval.split, len(test_rows)))},
        "backbone": model.backbone_source,
        "tokenizer_sha256": sha256_file(out / "tokenizer.json"),
        "weights_sha256": {name: sha256_file(out / file) for name, file in WEIGHT_FILES.items()},
        "probe_sha256": sha256_file(probe_dir / "model.safetensors"),
        "code_version": code_version(),
        "config_sha256": config_fingerprint(cfg),
        "created": utc_now(),
    }
    write_json(out / "provenance.json", provenance)
    write_text(out / "README.md", model_card(cfg, metrics, provenance))

    pushed = None
    if cfg.run.push:
        info = open_store(cfg.store).push("stage2", out, message=cfg.run.message)
        pushed = f"{info.stage}@{info.version}"
        log.info(f"pushed {pushed} (revision {info.revision[:12]})")
    return {"out_dir": str(out), "eval": metrics_eval, "pushed": pushed, "revision": model_revision, "stage1": stage1.record()}


# ----------------------------------------------------------------------------------------------- loading for commands

def load_stage2(ref: str, weights: str = "final", store_cfg: StoreConfig | None = None, device: str | None = None) -> tuple[T2SModel, str, Path]:
    """A stage-2 checkpoint (folder or `stage2@vN`) -> (model, weights revision, folder)."""
    from speechless.tokenizer import resolve_checkpoint

    if weights not in WEIGHT_FILES:
        raise UsageError(f"--weights {weights!r}: choose one of {', '.join(WEIGHT_FILES)}")
    folder = resolve_checkpoint(ref, store_cfg)
    revision = verify_weights(folder / WEIGHT_FILES[weights], weights)
    model = T2SModel.load(folder, WEIGHT_FILES[weights], device=device)
    return model, revision, folder


def evaluate_checkpoint(ref: str, stage1_ref: str | None, split: str, gen: GenerateConfig, ev: EvalConfig,
                        manifest: str | None = None, store_cfg: StoreConfig | None = None) -> dict:
    """`speechless stage2 eval`: the round trip of a stage-2 checkpoint (with its probe) on a stage-1 split."""
    model, _, folder = load_stage2(ref, ev.weights, store_cfg)
    stage1_ref = stage1_ref or model.stage1.get("version") or model.stage1.get("ref")
    check_stage1_match(model, stage1_ref, store_cfg)
    stage1 = resolve_stage1(stage1_ref, store_cfg)
    rows = load_split(stage1, split)
    if ev.max_utterances is not None:
        rows = rows[: ev.max_utterances]
    probe = load_probe(folder / "probe", stage1)
    speakers = speaker_map(DataConfig(stage1=stage1_ref, manifest=manifest), stage1)
    metrics, _ = round_trip(model, probe, rows, speakers, gen, ev.model_copy(update={"split": split}), stage1.folder)
    return metrics


# ----------------------------------------------------------------------------------------------------- model card

def model_card(cfg: Stage2Config, metrics: dict, provenance: dict) -> str:
    ev = metrics["eval"]
    s1 = provenance["stage1"]
    levels = "\n".join(f"| {i} | {g:.3f} | {r:.3f} | {gp:.0f} | {rp:.0f} |" for i, (g, r, gp, rp) in enumerate(zip(
        ev["code_usage"]["generated"]["utilization"], ev["code_usage"]["real"]["utilization"],
        ev["code_usage"]["generated"]["perplexity"], ev["code_usage"]["real"]["perplexity"])))
    eval_loss = metrics.get("eval_loss") or {}
    level_loss = " / ".join(f"{v:.2f}" for v in eval_loss.get("level_loss", []))
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

Model: decoder-only `{metrics['model']['backbone'].get('source')}` backbone ({metrics['model']['parameters'] / 1e6:.2f} M parameters
in all) fed through `inputs_embeds`: text tokens, then one position per audio step holding the sum of {s1['num_levels']} level
embeddings, one head per level out; frame layout `{metrics['model']['frame_mode']}` (level delays {metrics['model']['delays']});
speakers: {', '.join(metrics['model']['speakers']) or 'none'} (default: the first). Text tokenizer: {metrics['model']['text_vocab']} tokens.
Trained {metrics['train']['steps']} steps x {metrics['train']['batch_size']} utterances ({metrics['train']['seconds']:.0f} s).
Eval loss per level (split `{cfg.data.eval_split}`): {level_loss}.

## Semantic round trip (held-out split `{ev['split']}`: {ev['utterances']} utterances, {ev['sentences']} sentences never seen in training)

The judge is a CTC ASR probe ({metrics['probe']['parameters'] / 1e6:.2f} M parameters: summed code embeddings -> {metrics['probe'].get('layers', 'residual')} 1-D convolutions{' -> BiGRU' if cfg.probe.rnn else ''} -> characters, CTC)
trained on real stage-1 tokens of the train split. It reads the real tokens of the held-out audio and the tokens this
model generated from the same sentences' text ({'each utterance in its own speaker' if ev['generation']['speakers'] == 'each' else 'default speaker'},
{'greedy' if ev['generation']['temperature'] == 0 else f"temperature {ev['generation']['temperature']}, top-k {ev['generation']['top_k']}"}).

| metric | real tokens | generated tokens |
|---|---|---|
| probe CER | {ev['probe_cer_real']:.4f} | {ev['probe_cer_generated']:.4f} |
| frames (mean) | {d['real_frames_mean']:.1f} | {d['generated_frames_mean']:.1f} |

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
