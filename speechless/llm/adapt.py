"""Stage-3 library: adapting a speech LLM and measuring it on real speech.

* Data: corpus manifests, the stage-1 encoder record, stage-2 speech for every user turn (`synthetic_tokens`: cached,
  resumable, best of n draws by stage 2's CTC probe), speech tokens decoded to 1024-d vectors (`speech_examples`).
* Training: `train_loop` (AdamW on the adapter, length-bucketed batches, warmup + cosine to `min_lr_ratio`; resumable
  through `speechless.core.training.resume_state`, DDP over the adapter under torchrun).
* Demo base: `pretrain_base` teaches the tiny random-weight Gemma the demo tasks in text first (`PretrainConfig`).
* Evaluation: per-task scores (WER/CER, BLEU/chrF, exact match) of greedy answers to requests in REAL speech through
  the model's own audio tower (`evaluate`), text perplexity, and the ratio of a model's scores to a topline's.
* Inference: `load_for_inference`, `answer_requests`, and the entry points of the commands that do not train:
  `infer_file` (`stage3 infer`), `evaluate_file` (`stage3 eval`), `chat` (`speechless chat`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import torch
from pydantic import Field

from speechless.core import distributed, log
from speechless.core.config import Section
from speechless.core.errors import UsageError
from speechless.core.io import read_json, read_jsonl, replace_dir, write_json, write_jsonl
from speechless.core.metrics import cer
from speechless.core.runs import code_version, config_fingerprint, load_checkpoint, save_checkpoint, utc_now
from speechless.core.store import StoreConfig, is_store_ref, open_store
from speechless.core.training import length_batches, lr_factor, resolve_device, resume_state
from speechless.llm.adapters import AdapterConfig
from speechless.llm.base import BaseConfig, build_demo_tokenizer
from speechless.llm.instructions import (
    DEMO_TASKS,
    answer,
    as_text,
    demo_conversations,
    read_conversations,
    speech_parts,
)
from speechless.llm.model import Example, SpeechLM, load_adapter, load_speech_lm
from speechless.speech.encoders import EncoderConfig
from speechless.speech.rvq import SpeechRVQ
from speechless.speech.tokens import check_stage1_match, resolve_stage1
from speechless.t2s.generate import GenerateConfig, generate_corpus, load_stage2
from speechless.t2s.probe import CTCProbe
from speechless.t2s.roundtrip import load_probe

DEMO_MANIFEST = "runs/demo/corpus/all.jsonl"


class PretrainConfig(Section):
    enabled: bool = False
    """Demo only: first teach a random-weight base (a config-JSON `base.source`) the demo tasks in text, save it to
    `out_dir` and adapt that; reused while its settings are unchanged. Leave off for a real (pretrained) base."""
    out_dir: str = "runs/demo/stage3_base"
    """Folder of the text-pretrained demo base (a `save_pretrained` model + tokenizer)."""
    vocab_size: int = Field(600, ge=64)
    """BPE vocabulary of the demo tokenizer (trained on the demo text)."""
    steps: int = Field(800, ge=1)
    """Optimizer steps of the text pre-training."""
    batch_size: int = Field(32, ge=1)
    """Conversations (as text) per step."""
    learning_rate: float = Field(3e-3, gt=0.0)
    """Peak AdamW learning rate (50 warmup steps, cosine decay to 0.1 x)."""
    seed: int = 0
    """Seed of the text pre-training's data order: the demo's stand-in for a pretrained LLM is the same base whatever
    seed (`run.seed`) the adaptation runs with."""


class EvalConfig(Section):
    max_new_tokens: int = Field(40, ge=1)
    """Longest generated answer, in tokens (greedy decoding)."""
    batch_size: int = Field(48, ge=1)
    """Requests answered together."""
    quantize_real: bool = False
    """Put real-audio vectors through stage 1 (quantize, then decode at the codebook levels of the training speech)
    before the LLM. Kept in the adapter record: what `stage3 infer|eval` and `chat` do without --[no-]quantize. The
    main model and its topline are measured both ways in any case."""
    udhr_languages: list[str] = []
    """Also measure text perplexity on the Universal Declaration of Human Rights in these languages (eng, swh,
    twi_asante, twi_akuapem: real text never trained on; `scripts/install.sh` fetches it) for the base and every
    variant. [] = off."""


# ------------------------------------------------------------------------------------------------------------- data

def stage1_encoder(stage1_folder: Path) -> tuple[EncoderConfig, str]:
    """The encoder config a stage-1 version was trained on, and its weights sha256."""
    recorded = dict(read_json(stage1_folder / "config.json")["encoder"])
    sha = recorded.pop("weights_sha256")
    recorded.pop("source_commit", None)
    return EncoderConfig(**recorded), sha


def manifest_rows(path: Path) -> list[dict]:
    """A corpus manifest's rows, with `audio_filepath` resolved against the manifest's folder."""
    rows = []
    for number, row in read_jsonl(path, "data.manifest"):
        if not row.get("audio_filepath"):
            raise UsageError(f"{path}:{number}: missing field 'audio_filepath'; check the manifest with `speechless data validate`")
        row["audio_filepath"] = str((path.parent / row["audio_filepath"]).resolve())
        rows.append(row)
    return rows


def demo_eval_rows(manifest: Path, split: str, voices: int, tasks: list[str] | None = None, seed: int = 0,
                   sentences: Path | None = None) -> list[dict]:
    """The demo task set of a split of the demo corpus (`sentences.jsonl` beside the manifest unless given)."""
    return demo_conversations(sentences or manifest.parent / "sentences.jsonl", manifest_rows(manifest), split,
                              list(tasks or DEMO_TASKS), voices, seed)


def real_speech_conversations(path: str | Path) -> list[dict]:
    """Held-out conversations whose every speech part carries a real recording (`audio`, relative to the file)."""
    return read_conversations(path, require_audio=True)


# -------------------------------------------------------------------------------------------------------- training

def train_loop(model: SpeechLM, examples: list[Example], steps: int, batch_size: int, lr: float, warmup: int, work: Path,
               fingerprint: str, seed: int, checkpoint_every: int, what: str, gradient_checkpointing: bool = False,
               min_lr_ratio: float = 0.1, curves=None) -> list[dict]:
    """AdamW on the trainable parameters, length-bucketed batches, warmup + cosine to `min_lr_ratio` x `lr`; resumable
    from `work/` when the fingerprint matches (otherwise a warning says why it starts again). Every history record
    (every 50 steps and the last) also goes to `curves` (`speechless.core.loggers`), with the learning rate.

    Several processes (torchrun): DDP over the trainable parameters only; every rank takes its share of each global
    batch (`batch_size` conversations in all) and divides its summed loss by the target tokens of the whole global
    batch, so N ranks take the step one process would take; rank 0 alone writes the resume checkpoints."""
    job = distributed.group()
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    state, start = {"fingerprint": fingerprint, "history": []}, 0
    saved = resume_state(work, fingerprint, what)
    if saved is not None and saved.get("step"):
        tensors = load_checkpoint(work, saved["step"], optimizer)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        state, start = saved, saved["step"]
        log.info(f"{what}: resuming at step {start}")
    distributed.barrier()  # every rank has read the resume state before rank 0 writes again
    if gradient_checkpointing:
        model._inner().activation_checkpointing_enable()
    model.train()
    loss_fn = distributed.data_parallel(model, "loss", trainable_only=True)
    lengths = [len(e.ids) for e in examples]
    per_epoch = math.ceil(len(examples) / batch_size)
    began, fed = time.time(), 0
    for step in range(start, steps):
        epoch, index = divmod(step, per_epoch)
        batch = [examples[i] for i in length_batches(lengths, batch_size, seed, epoch)[index]]
        fed += sum(len(e.ids) for e in batch)
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup, min_lr_ratio)
        local, scale = distributed.shard(batch, job), job.world_size / max(1, sum(e.targets for e in batch))
        if not local:  # a global batch smaller than the job: this rank computes one item with no weight
            local, scale = batch[-1:], 0.0
        loss = loss_fn(model.batch(local), reduction="sum") * scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            mean_loss = distributed.all_reduce_mean(loss.item())  # the global batch's mean loss
            state["history"].append({"step": step + 1, "loss": round(mean_loss, 4), "seconds": round(time.time() - began, 1),
                                     "tokens": fed})  # seconds and tokens (non-pad, the global batch's) since this process began
            if curves is not None:
                curves.log(step + 1, {**state["history"][-1], "lr": optimizer.param_groups[0]["lr"]})
            log.info(f"{what}: step {step + 1}/{steps} loss {mean_loss:.4f}")
        if job.is_main and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(work, step + 1, {n: p.detach() for n, p in params.items()}, optimizer, state, keep=1)
    model.eval()
    return state["history"]


def load_base(base: BaseConfig, encoder_cfg: EncoderConfig, encoder_sha: str, tokenizer=None) -> SpeechLM:
    """The base LLM; in a job every rank loads it itself, and all must hold the same weights (DDP does not sync them)."""
    model = load_speech_lm(base, encoder_cfg, encoder_sha, tokenizer)
    distributed.check_same(model.base_sha256, f"the sha256 of base {base.source}")
    return model


def adapted_model(base: BaseConfig, encoder_cfg: EncoderConfig, encoder_sha: str, adapter: AdapterConfig, seed: int,
                  tokenizer=None) -> SpeechLM:
    """The base with a new adapter whose random initial weights come from `seed` alone, not from whatever ran before in
    this process (text pre-training, other variants): so compared models start from the same adapter and the same
    dropout stream, and differ only in what they learn from."""
    model = load_base(base, encoder_cfg, encoder_sha, tokenizer)
    torch.manual_seed(seed)
    model.attach(adapter)
    return model


# ------------------------------------------------------------------------------------------------------- demo base

def demo_tokenizer_texts(rows: list[dict]) -> list[str]:
    """What the demo tokenizer is trained on: every text of the conversations (speech parts as their text) and the
    task instructions."""
    return [p["text"] for r in rows for m in as_text(r)["messages"]
            for p in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}])] + [d[0] for d in DEMO_TASKS.values()]


def pretrain_base(base: BaseConfig, pretrain: PretrainConfig, encoder_cfg: EncoderConfig, encoder_sha: str,
                  train_rows: list[dict], tasks: list[str], seed: int, curves=None) -> BaseConfig:
    """Demo: teach the tiny random-weight Gemma the training conversations in text; save it (save_pretrained) and
    reuse it while its settings are unchanged. Returns the config of the saved base. Several processes: every rank
    trains (DDP), rank 0 decides on reuse and saves. `curves`: where the training curve also goes (`train_loop`)."""
    job = distributed.group()
    out = Path(pretrain.out_dir)
    fingerprint = json.dumps({"base": base.model_dump(mode="json"), "pretrain": pretrain.model_dump(mode="json", exclude={"out_dir"}),
                              "encoder": encoder_sha, "rows": len(train_rows), "tasks": tasks}, sort_keys=True)
    record = out / "speechless_base.json"
    based = BaseConfig(kind=base.kind, source=str(out), device=base.device, dtype=base.dtype)
    if distributed.broadcast_json(job.is_main and record.is_file() and read_json(record).get("fingerprint") == fingerprint):
        log.info(f"text-pretrained base: reusing {out}")
        return based
    tokenizer = build_demo_tokenizer(demo_tokenizer_texts(train_rows), pretrain.vocab_size)
    distributed.check_same(hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(), "the demo tokenizer's sha256")
    model = load_base(base, encoder_cfg, encoder_sha, tokenizer)
    for name, p in model.lm.named_parameters():
        p.requires_grad_(not name.startswith(("model.audio_tower", "model.embed_audio")))
    examples = [model.encode(as_text(r)["messages"], []) for r in train_rows]
    history = train_loop(model, examples, pretrain.steps, pretrain.batch_size, pretrain.learning_rate, 50,
                         out.with_name(out.name + ".work"), fingerprint, seed, pretrain.steps, "text pretraining",
                         curves=curves)
    if not job.is_main:
        distributed.barrier()  # until rank 0 has saved the base
        return based
    tmp = out.with_name(f".{out.name}.tmp")
    model.lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "speechless_base.json", {"fingerprint": fingerprint, "history": history, "created": utc_now(),
                                              "audio_tower_sha256": encoder_sha, "code_version": code_version()})
    replace_dir(tmp, out)
    distributed.barrier()
    return based


# -------------------------------------------------------------------------------------------------- speech vectors

def synthetic_tokens(stage2_ref: str, stage1_ref: str, generate: GenerateConfig, draws: int, rows: list[dict], work: Path,
                     store: StoreConfig | None = None, device: str = "auto") -> tuple[dict[str, dict], dict]:
    """Stage-2 tokens {part: tokens} for every speech part (by its utterance id, in that recording's voice), cached in
    `work/speech/` and resumable, with the lineage record of the stage-2 version. With `draws` n > 1 every part is
    spoken n times (all cached) and the draw stage 2's CTC probe reads closest to the text is kept (`best_draws`); the
    record then holds n and the probe CER of the first and the best draws.

    Several processes: each rank speaks its share of the texts into its own resumable part file (on its own GPU),
    then rank 0 merges the parts into the cache in text order. With sampling the draws depend on which texts share a
    generation batch, so a cache made by N ranks is another (equally valid) sample than a one-process cache."""
    model, revision, folder = load_stage2(stage2_ref, store_cfg=store, device=str(resolve_device(device)))
    check_stage1_match(model.stage1, stage1_ref, store)
    if draws > 1 and not (folder / "probe" / "config.json").is_file():
        raise UsageError(f"data.synthetic_draws={draws}: the stage-2 checkpoint {folder} has no CTC probe (probe/) to choose "
                         "between draws; set data.synthetic_draws=1")
    texts, part_of = {}, {}  # generation requests (one per draw) and the speech part each draw is for
    for row in rows:
        for part in speech_parts(row):
            key = part.get("utterance") or part["text"]
            speaker = part.get("speaker") if part.get("speaker") in model.speakers else None
            for draw in range(draws):
                draw_id = key if draws == 1 else f"{key}#{draw}"
                texts[draw_id] = {"id": draw_id, "text": part["text"], "speaker": speaker}
                part_of[draw_id] = key
    # named by the stage-2 weights and every generation setting, so changed settings never reuse another sample's cache
    output = work / "speech" / f"stage2_{revision[:12]}_{config_fingerprint(generate)[:8]}.jsonl"
    _speak(model, revision, list(texts.values()), output, generate, work)
    tokens = {row["id"]: row for _, row in read_jsonl(output)}
    version = open_store(store).resolve(stage2_ref).ref if is_store_ref(stage2_ref) else None
    record = {"ref": stage2_ref, "version": version, "revision": revision, "stage1_revision": model.stage1["revision"]}
    if draws == 1:
        return tokens, record
    probe = load_probe(folder / "probe", resolve_stage1(stage1_ref, store))
    best, chosen = best_draws(tokens, texts, part_of, probe)
    record["draws"] = {"n": draws, **chosen}
    log.info(f"stage-2 speech: kept the best of {draws} draws per turn; probe CER {chosen['probe_cer_first_draw']:.4f} "
             f"(first draw) -> {chosen['probe_cer_best']:.4f} (best)")
    return best, record


def _speak(model, revision: str, texts: list[dict], output: Path, generate: GenerateConfig, work: Path) -> None:
    """Generate `texts` into the cache `output` unless it already holds exactly them (sharded over a torchrun job)."""
    job = distributed.group()

    def holds(path: Path, wanted: list[dict]) -> bool:
        return path.exists() and {row["id"] for _, row in read_jsonl(path)} == {row["id"] for row in wanted}

    def rank_file(path: Path, rank: int) -> Path:  # one process writes the cache itself
        return path.with_name(f"{path.stem}.part{rank}of{job.world_size}{path.suffix}") if job.world_size > 1 else path

    if distributed.broadcast_json(job.is_main and holds(output, texts)):
        return
    if job.is_main:
        output.unlink(missing_ok=True)  # made for other texts
    mine = distributed.shard(texts, job)
    if mine:
        if job.world_size > 1 and rank_file(output, job.rank).exists() and not holds(rank_file(output, job.rank), mine):
            rank_file(output, job.rank).unlink()  # a part made for other texts
        source = rank_file(work / "speech" / "stage2_texts.jsonl", job.rank)
        write_jsonl(source, mine)
        # each rank draws its own samples (seed + rank; one process: the configured seed)
        generate_corpus(model, revision, source, rank_file(output, job.rank), generate.model_copy(update={"seed": generate.seed + job.rank}))
    distributed.barrier()
    if job.is_main and job.world_size > 1:
        by_id = {row["id"]: row for rank in range(job.world_size) if rank_file(output, rank).exists()
                 for _, row in read_jsonl(rank_file(output, rank))}
        write_jsonl(output, [by_id[t["id"]] for t in texts])
        for leftover in output.parent.glob("*.part*of*"):  # this job's parts, and any of a job of another size
            leftover.unlink()
    distributed.barrier()


def best_draws(generated: dict[str, dict], texts: dict[str, dict], part_of: dict[str, str], probe: CTCProbe) -> tuple[dict[str, dict], dict]:
    """For each speech part, the draw whose probe transcript has the lowest CER against its text (ties: the earlier
    draw), as {part: tokens}; with the corpus probe CER of the first draws and of the best ones."""
    ids = list(texts)
    heard = dict(zip(ids, probe.transcribe([torch.tensor(generated[i]["codes"], dtype=torch.long) for i in ids])))
    error = {i: cer([texts[i]["text"]], [heard[i]]) for i in ids}
    by_part: dict[str, list[str]] = {}
    for i in ids:  # in draw order, so min() below breaks ties by the earlier draw
        by_part.setdefault(part_of[i], []).append(i)
    best = {part: min(draws, key=error.__getitem__) for part, draws in by_part.items()}

    def corpus_cer(chosen: list[str]) -> float:
        return round(cer([texts[i]["text"] for i in chosen], [heard[i] for i in chosen]), 4)

    summary = {"probe_cer_first_draw": corpus_cer([draws[0] for draws in by_part.values()]),
               "probe_cer_best": corpus_cer(list(best.values()))}
    return {part: {**generated[draw], "id": part, "draw": draw} for part, draw in best.items()}, summary


def vectors_from_tokens(rvq: SpeechRVQ, row: dict, levels: int | None = None) -> torch.Tensor:
    """A token row decoded to 1024-d vectors from its first `levels` codebook levels (None = all)."""
    return rvq.decode(torch.tensor(row["codes"], dtype=torch.long)[:levels].T)


def speech_examples(model: SpeechLM, rows: list[dict], tokens: dict[str, dict], rvq: SpeechRVQ, max_frames: int = 750,
                    levels: int | None = None) -> list[Example]:
    """Tokenized conversations with each speech part's decoded vectors (windows of at most `max_frames`)."""
    examples = []
    for row in rows:
        clips = []
        for part in speech_parts(row):
            key = part.get("utterance") or part["text"]
            if key not in tokens:
                raise UsageError(f"conversation {row['id']}: no speech tokens for {key!r}")
            vectors = vectors_from_tokens(rvq, tokens[key], levels)
            clips.append([vectors[i:i + max_frames] for i in range(0, len(vectors), max_frames)])
        examples.append(model.encode(row["messages"], clips))
    return examples


def real_vectors(model: SpeechLM, rows: list[dict], encoder_cfg: EncoderConfig) -> dict[str, list[torch.Tensor]]:
    """Real recordings through the model's own audio tower (input of output_proj), per window of <= 30 s."""
    from speechless.data.manifest import ManifestEntry
    from speechless.speech.features import encode_entries

    entries, seen = [], set()
    for row in rows:
        for part in speech_parts(row):
            key = part.get("utterance") or part["audio"]
            if key not in seen:
                seen.add(key)
                entries.append(ManifestEntry(id=key, audio_filepath=Path(part["audio"]), duration=0.0, text="", split=""))
    out = {}
    for utt in encode_entries(entries, model.encoder(), encoder_cfg):
        out[utt.id] = list(torch.split(utt.vectors, [int(w[2]) for w in utt.windows]))
    return out


def through_stage1(rvq: SpeechRVQ, vectors: torch.Tensor, levels: int | None = None) -> torch.Tensor:
    """Real-audio vectors quantized by stage 1 and decoded from their first `levels` codebook levels (None = all):
    the same form as the speech the model was trained on (`speech_levels` in its adapter record)."""
    return rvq.decode(rvq.encode(vectors)[:, :levels])


def quantized(rvq: SpeechRVQ, clips: dict[str, list[torch.Tensor]], levels: int | None = None) -> dict[str, list[torch.Tensor]]:
    """`through_stage1` of every window of every clip, in one call (encoding is batch-invariant, so the codes are the
    ones each window gets alone; a call per window would pad each to a whole `encode_chunk`)."""
    windows = [w for v in clips.values() for w in v]
    if not windows:
        return {k: [] for k in clips}
    parts = iter(torch.split(through_stage1(rvq, torch.cat(windows), levels), [w.shape[0] for w in windows]))
    return {k: [next(parts) for _ in v] for k, v in clips.items()}


# -------------------------------------------------------------------------------------------------------- evaluation

def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def score_task(task: str, closed: bool, hyps: list[str], refs: list[str]) -> dict:
    """asr: WER/CER (score 1 - CER); closed answers: exact match; any other task: BLEU and chrF (score chrF / 100)."""
    import jiwer
    import sacrebleu

    hyps_n, refs_n = [normalize(h) for h in hyps], [normalize(r) for r in refs]
    result = {"n": len(refs)}
    if task == "asr":
        safe = [h if h else "<empty>" for h in hyps_n]
        result.update(wer=round(jiwer.wer(refs_n, safe), 4), cer=round(jiwer.cer(refs_n, safe), 4))
        result["score"] = round(max(0.0, 1 - result["cer"]), 4)
        result["score_name"] = "1 - CER"
    else:
        bleu = sacrebleu.metrics.BLEU()
        chrf = sacrebleu.metrics.CHRF()
        result.update(bleu=round(bleu.corpus_score(hyps, [refs]).score, 2), chrf=round(chrf.corpus_score(hyps, [refs]).score, 2),
                      bleu_signature=str(bleu.get_signature()), chrf_signature=str(chrf.get_signature()))
        if closed:
            result["exact_match"] = round(sum(h == r for h, r in zip(hyps_n, refs_n)) / max(1, len(refs)), 4)
            result["score"], result["score_name"] = result["exact_match"], "exact match"
        else:
            result["score"], result["score_name"] = round(result["chrf"] / 100, 4), "chrF / 100"
    return result


def evaluate(model: SpeechLM, rows: list[dict], clips: dict[str, list[torch.Tensor]] | None, cfg: EvalConfig) -> dict:
    """Per-task scores of greedy answers; `clips` None = the same requests as text. Several processes: each rank
    answers its share of the batches and every rank gets all answers."""
    prompts = []
    for row in rows:
        audio = [] if clips is None else [clips[p.get("utterance") or p["audio"]] for p in speech_parts(row)]
        messages = (as_text(row) if clips is None else row)["messages"][:-1]
        prompts.append(model.encode(messages, audio, with_answer=False))
    # one task per batch where possible: a batch generates until its longest answer ends, and closed answers are short
    order = sorted(range(len(prompts)), key=lambda i: (rows[i]["task"], len(prompts[i].ids)))
    chunks = [order[start:start + cfg.batch_size] for start in range(0, len(order), cfg.batch_size)]
    mine = [[i, text] for chunk in distributed.shard(chunks)
            for i, text in zip(chunk, model.generate([prompts[i] for i in chunk], cfg.max_new_tokens))]
    hyps: list[str] = [""] * len(prompts)
    for i, text in (pair for answers in distributed.gather_json(mine, to_all=True) for pair in answers):
        hyps[i] = text
    result = {}
    for task in sorted({r["task"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["task"] == task]
        result[task] = score_task(task, rows[idx[0]]["closed"], [hyps[i] for i in idx], [answer(rows[i]) for i in idx])
        result[task]["examples"] = [{"id": rows[i]["id"], "reference": answer(rows[i]), "answer": hyps[i]} for i in idx[:3]]
    return result


def no_listening_baselines(train_rows: list[dict], eval_rows: list[dict], condition: dict[str, str] | None = None,
                           condition_name: str = "label") -> dict:
    """What the closed tasks score without listening, on `eval_rows`: always the commonest answer to that task in
    `train_rows` ('commonest_answer'); and with `condition` ({conversation id: a label known without the speech},
    e.g. the sentence's verb in the demo task set) the commonest training answer for that label, the overall one for
    a label never seen ('commonest_answer_for_<name>'). Scored like the models (exact match after normalising)."""
    result: dict[str, dict] = {}
    for task in sorted({r["task"] for r in eval_rows if r.get("closed")}):
        train = [r for r in train_rows if r["task"] == task]
        held = [r for r in eval_rows if r["task"] == task]
        if not train:
            continue
        overall = Counter(normalize(answer(r)) for r in train).most_common(1)[0][0]
        refs = [normalize(answer(r)) for r in held]
        scores = {"n": len(held), "commonest_answer": round(sum(ref == overall for ref in refs) / len(held), 4)}
        if condition:
            by_label: dict[str, Counter] = {}
            for r in train:
                by_label.setdefault(condition.get(r["id"], ""), Counter())[normalize(answer(r))] += 1
            guess = [by_label[condition.get(r["id"], "")].most_common(1)[0][0] if condition.get(r["id"], "") in by_label else overall
                     for r in held]
            scores[f"commonest_answer_for_{condition_name}"] = round(sum(g == ref for g, ref in zip(guess, refs)) / len(held), 4)
        result[task] = scores
    return result


def perplexity(model: SpeechLM, rows: list[dict]) -> float:
    """Text perplexity of the answers (each rank scores its share of the rows)."""
    parts = distributed.gather_json(model.nll([model.encode(as_text(r)["messages"], []) for r in distributed.shard(rows)]), to_all=True)
    return round(math.exp(sum(total for total, _ in parts) / max(1, sum(count for _, count in parts))), 4)


def ratio_to_topline(scores: dict, topline: dict, name: str = "synthetic_speech") -> dict:
    """Per task: the metric, a model's score (under `name`), the topline's (`real_speech_topline`) and their ratio
    (None where the topline scores 0). The ratios are reported; judging them is left to the reader."""
    return {task: {"metric": scores[task]["score_name"], name: scores[task]["score"], "real_speech_topline": topline[task]["score"],
                   "ratio_to_topline": round(scores[task]["score"] / topline[task]["score"], 4) if topline[task]["score"] else None}
            for task in scores}


# ---------------------------------------------------------------------------------------------------------- inference

def adapter_checkpoint(ref: str, store_cfg: StoreConfig | None = None) -> Path:
    """A stage-3 adapter folder or `stage3@vN` -> its local folder, refused when it holds no adapter."""
    from speechless.speech.tokenizer import resolve_checkpoint

    folder = resolve_checkpoint(ref, store_cfg)
    if not (folder / "adapter_config.json").is_file():
        raise UsageError(f"{folder}: no adapter_config.json; not a stage-3 adapter (train one with `speechless stage3 train`)")
    return folder


def load_for_inference(ref: str, store_cfg: StoreConfig | None = None) -> tuple[SpeechLM, dict, Path]:
    """A stage-3 adapter folder or `stage3@vN` -> (model on its base with the adapter, record, folder)."""
    folder = adapter_checkpoint(ref, store_cfg)

    def build(record: dict) -> SpeechLM:
        base = BaseConfig(kind=record["base"]["kind"], source=record["base"]["source"], revision=record["base"].get("revision"),
                          frame_stack=record["base"].get("frame_stack", 1))
        encoder_cfg = EncoderConfig.model_validate(record["encoder"])
        return load_speech_lm(base, encoder_cfg, None)

    model, record = load_adapter(folder, build)
    return model, record, folder


def stage1_round_trip(record: dict, quantize: bool | None, store_cfg: StoreConfig | None = None) -> tuple[SpeechRVQ | None, int | None]:
    """(stage-1 quantizer, levels) to put an adapter's real input through, or (None, None) for the native path.
    `quantize` None = the adapter's recorded `quantize_real`; levels are its training speech's (`speech_levels`)."""
    if not (record.get("quantize_real", False) if quantize is None else quantize):
        return None, None
    return SpeechRVQ.load(resolve_stage1(record["stage1"]["ref"], store_cfg).folder), record.get("speech_levels")


def answer_requests(model: SpeechLM, requests: list[dict], max_new_tokens: int = 40, batch_size: int = 16,
                    rvq: SpeechRVQ | None = None, levels: int | None = None) -> list[str]:
    """Requests {"text": instruction, "audio": path or None} -> answers. Audio longer than the encoder window is split
    into windows of at most 30 s, each its own audio block (as Gemma's processor would need). With `rvq`, the audio
    vectors go through stage 1 first (`through_stage1` at `levels`)."""
    from speechless.data.manifest import ManifestEntry
    from speechless.speech.features import encode_entries

    entries = [ManifestEntry(id=str(i), audio_filepath=Path(r["audio"]), duration=0.0, text="", split="") for i, r in enumerate(requests) if r.get("audio")]
    for entry in entries:
        if not Path(entry.audio_filepath).is_file():
            raise UsageError(f"{entry.audio_filepath}: audio file not found")
    clips = {}
    for utt in encode_entries(entries, model.encoder(), model.encoder_cfg) if entries else []:
        windows = list(torch.split(utt.vectors, [int(w[2]) for w in utt.windows]))
        if len(windows) > 1:
            log.warn(f"{requests[int(utt.id)]['audio']}: longer than {model.encoder_cfg.max_window_s:g} s; split into {len(windows)} windows")
        clips[utt.id] = windows
    if rvq is not None:
        clips = quantized(rvq, clips, levels)
    prompts = []
    for i, r in enumerate(requests):
        content = [{"type": "text", "text": r.get("text") or ""}]
        if r.get("audio"):
            content.append({"type": "speech", "text": ""})
        prompts.append(model.encode([{"role": "user", "content": content}], [clips[str(i)]] if r.get("audio") else [], with_answer=False))
    out = []
    for start in range(0, len(prompts), batch_size):
        out.extend(model.generate(prompts[start:start + batch_size], max_new_tokens))
    return out


def read_requests(path: Path, instruction: str) -> tuple[list[str], list[dict]]:
    """A request manifest (rows with `audio_filepath` relative to the file and/or `instruction`) -> (ids, requests)."""
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


def infer_file(model_ref: str, manifest: Path, instruction: str = "Transcribe the audio.", quantize: bool | None = None,
               max_new_tokens: int = 40, batch_size: int = 16, store_cfg: StoreConfig | None = None) -> list[dict]:
    """`speechless stage3 infer`: answer every request of a manifest -> rows {"id", "answer"}."""
    ids, requests = read_requests(Path(manifest), instruction)
    model, record, _ = load_for_inference(model_ref, store_cfg)
    answers = answer_requests(model, requests, max_new_tokens, batch_size, *stage1_round_trip(record, quantize, store_cfg))
    return [{"id": i, "answer": a} for i, a in zip(ids, answers)]


def evaluate_file(model_ref: str, conversations: Path | None = None, quantize: bool | None = None, demo_manifest: Path | None = None,
                  split: str = "test", voices: int = 2, max_new_tokens: int = 40, batch_size: int = 48,
                  store_cfg: StoreConfig | None = None) -> dict:
    """`speechless stage3 eval`: per-task scores of an adapter on held-out REAL speech: a conversation file whose
    speech parts carry real `audio`, or (without one) the demo task set of `split` of the demo corpus."""
    if conversations is not None and demo_manifest is not None:
        raise UsageError("stage3 eval: give --conversations FILE or --demo-manifest FILE, not both")
    folder = adapter_checkpoint(model_ref, store_cfg)  # a wrong model is refused before anything is read
    if conversations is not None:
        rows = real_speech_conversations(conversations)
    else:
        rows = demo_eval_rows(Path(demo_manifest or DEMO_MANIFEST), split, voices)
    model, record, _ = load_for_inference(str(folder), store_cfg)
    clips = real_vectors(model, rows, model.encoder_cfg)
    rvq, levels = stage1_round_trip(record, quantize, store_cfg)
    if rvq is not None:
        clips = quantized(rvq, clips, levels)
    return evaluate(model, rows, clips, EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size))


def chat(model_ref: str, audio: Path | None = None, text: str | None = None, quantize: bool | None = None,
         max_new_tokens: int = 60, store_cfg: StoreConfig | None = None) -> str:
    """`speechless chat`: one request (speech and/or text) -> the answer."""
    if audio is None and not text:
        raise UsageError("chat: give --audio FILE and/or --text 'question'")
    if audio is not None and not Path(audio).is_file():
        raise UsageError(f"--audio {audio}: file not found")
    model, record, _ = load_for_inference(model_ref, store_cfg)
    request = {"text": (text or "Transcribe the audio.") + ("\n" if audio else ""), "audio": str(audio) if audio else None}
    return answer_requests(model, [request], max_new_tokens, 1, *stage1_round_trip(record, quantize, store_cfg))[0]
