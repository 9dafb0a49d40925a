"""Stage 3 recipe: adapt an LLM to speech with synthetic speech only, and prove it on real speech.

Read top to bottom: setup (stage-1 and stage-2 versions, checked against each other) -> instruction conversations
(the demo builds its task set from the corpus: transcribe, translate, closed questions) -> the base LLM (demo: a tiny
Gemma 4 whose audio tower IS the stage-1 encoder, first taught the demo tasks in text and saved, so it is reused) ->
speech for every user turn: stage-2 tokens of its text (model A: synthetic; cached, resumable) or the real stage-1
tokens of the same recording (model B, the topline), decoded to 1024-d vectors with the stage-1 codebooks -> train the
adapter (LoRA or depth up-scaling; loss on assistant tokens, length-bucketed batches, resumable) -> evaluate on held-out
REAL speech through the model's own audio tower (WER/CER, BLEU/chrF, exact match; text perplexity before/after; the
same requests as text) -> save the adapter only (+ lineage) -> push `stage3@vN`.

`work/` (caches, resume state, comparison variants) is never pushed.

Several processes (`torchrun --nproc_per_node N -m speechless stage3 train ...`): DDP over the adapter only, every rank
on its share of each global batch; speech synthesis and evaluation sharded by rank; rank 0 writes (see `train`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path

import torch
from pydantic import Field, model_validator

from speechless import distributed, log
from speechless.config import Section, to_yaml
from speechless.encoder import EncoderConfig
from speechless.errors import UsageError
from speechless.instructions import DEMO_TASKS, answer, as_text, demo_conversations, read_conversations, speech_parts
from speechless.io import read_json, read_jsonl, sha256_file, write_json, write_jsonl, write_text
from speechless.llm import (AdapterConfig, BaseConfig, Example, SpeechLM, build_demo_tokenizer, load_adapter, load_speech_lm,
                            resolve_device)
from speechless.runs import RunConfig, code_version, config_fingerprint, utc_now
from speechless.rvq import SpeechRVQ
from speechless.store import StoreConfig, is_store_ref, open_store
from speechless.training import lr_at, train_loop  # noqa: F401  (re-exported for callers of stages.stage3_llm)
from speechless.probe import CTCProbe, cer
from stages.stage2_t2s import (GenerateConfig, check_stage1_match, epoch_batches, generate_corpus, load_probe, load_split, load_stage2,
                               resolve_stage1)


class DataConfig(Section):
    stage1: str = "runs/demo/stage1"
    """Stage-1 version (folder or stage1@vN): its codebooks decode tokens to vectors, its encoder is the audio tower."""
    stage2: str = "runs/demo/stage2"
    """Stage-2 version (folder or stage2@vN) that speaks the user turns; refused if trained on another stage-1 version."""
    manifest: str = "runs/demo/corpus/all.jsonl"
    """Corpus manifest: recordings for the real-speech topline and the held-out evaluation (and speakers)."""
    sentences: str | None = None
    """Demo sentences with their parts (None = `sentences.jsonl` beside the manifest)."""
    instructions: str | None = None
    """Training conversations JSONL (see speechless/instructions.py); None = the demo task set built from the corpus."""
    eval_instructions: str | None = None
    """Held-out conversations whose speech parts carry real `audio` (and a `task`); None = the demo task set of
    `eval_split`."""
    tasks: list[str] = list(DEMO_TASKS)
    """Demo tasks: asr (transcribe), ast (translate to English), where/who (closed answers, exact match)."""
    train_split: str = "train"
    eval_split: str = "test"
    """Held-out split of the demo task set, or several joined by '+' ('dev+test': twice the sentences to measure on;
    no stage trains on them; stages 1 and 2 only report eval losses on dev)."""
    voices_per_sentence: int = Field(2, ge=1)
    """Training recordings (and stage-2 voices) per sentence."""
    eval_voices_per_sentence: int = Field(2, ge=1)
    """Held-out recordings per test sentence."""
    generate: GenerateConfig = GenerateConfig(max_seconds=20.0)
    """How stage 2 speaks the user turns (each in the voice of the recording it stands for)."""
    synthetic_draws: int = Field(1, ge=1)
    """Stage 2 speaks each user turn this many times and the draw its CTC probe (trained on REAL stage-1 tokens) reads
    closest to the text is kept: best-of-n filtering of synthetic speech by an ASR, which costs n x the generation and
    no real speech. 1 = one draw, no probe needed."""
    kept_draws: int = Field(1, ge=1)
    """Of those n draws, the k the probe reads best are all kept, and every conversation is trained on in each of
    them (k x the examples, as many steps): several takes of each turn, at no extra generation cost. At most n."""
    synthetic_levels: int | None = Field(None, ge=1)
    """Decode stage-2 speech from only its first L codebook levels (the coarse ones stage 2 predicts best); None = all.
    Real speech (the topline, evaluation) always uses every level."""

    @model_validator(mode="after")
    def _kept_draws_within_draws(self):
        if self.kept_draws > self.synthetic_draws:
            raise ValueError(f"kept_draws={self.kept_draws} is more than synthetic_draws={self.synthetic_draws}: keep at most "
                             "the draws that are generated")
        return self


class PretrainConfig(Section):
    enabled: bool = True
    """Demo only: teach the random-weight base the demo tasks in text first (saved to out_dir, reused when current)."""
    out_dir: str = "runs/demo/stage3_base"
    vocab_size: int = Field(600, ge=64)
    """BPE vocabulary of the demo tokenizer (trained on the demo text)."""
    steps: int = Field(800, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = 3e-3


class TrainConfig(Section):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = 2e-3
    warmup_steps: int = Field(20, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    """Resume checkpoints (work/): a killed run restarts from the last one."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30 % slower)."""
    threads: int | None = None
    """CPU threads (None = torch's default, all cores). Alone on a 2-core machine 2 threads were 1.7x faster than 1 for
    stage 2; on cores shared with other jobs 1 thread was faster (set 1 there)."""


class EvalConfig(Section):
    max_new_tokens: int = Field(40, ge=1)
    batch_size: int = Field(48, ge=1)
    quantize_real: bool = False
    """Quantize/dequantize real-audio vectors through stage 1 before the LLM, at the codebook levels the training
    speech had (`data.synthetic_levels` for model A). Both inputs are measured for the main model and its topline;
    this setting, kept in the adapter record, is what `stage3 infer|eval` and `chat` do without --[no-]quantize."""


class CompareConfig(Section):
    topline: bool = True
    """Also train model B: the same recipe on REAL speech tokens of the same training recordings."""
    adapters: list[str] = ["lora", "dus"]
    """Adapter kinds compared (with `adapter`'s other settings); `dus_all` = DUS updating every position."""


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

def stage1_encoder(stage1_folder: Path) -> tuple[EncoderConfig, str]:
    recorded = dict(read_json(stage1_folder / "config.json")["encoder"])
    sha = recorded.pop("weights_sha256")
    recorded.pop("source_commit", None)
    return EncoderConfig(**recorded), sha


def manifest_rows(path: Path) -> list[dict]:
    rows = []
    for number, row in read_jsonl(path, "data.manifest"):
        if not row.get("audio_filepath"):
            raise UsageError(f"{path}:{number}: missing field 'audio_filepath'; check the manifest with `speechless data validate`")
        row["audio_filepath"] = str((path.parent / row["audio_filepath"]).resolve())
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------- base pretraining

def demo_tokenizer_texts(rows: list[dict]) -> list[str]:
    """What the demo tokenizer is trained on: every text of the conversations (speech parts as their text) and the
    task instructions."""
    return [p["text"] for r in rows for m in as_text(r)["messages"]
            for p in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}])] + [d[0] for d in DEMO_TASKS.values()]


def pretrain_base(cfg: Stage3Config, train_rows: list[dict], encoder_cfg: EncoderConfig, encoder_sha: str, texts: list[str]) -> BaseConfig:
    """Demo: teach the tiny random-weight Gemma the demo tasks in text; save it (save_pretrained) and reuse it.
    Several processes: every rank trains (DDP), rank 0 decides on reuse and saves."""
    job = distributed.group()
    out = Path(cfg.pretrain.out_dir)
    fingerprint = json.dumps({"base": cfg.base.model_dump(mode="json"), "pretrain": cfg.pretrain.model_dump(mode="json", exclude={"out_dir"}),
                              "encoder": encoder_sha, "rows": len(train_rows), "tasks": cfg.data.tasks}, sort_keys=True)
    record = out / "speechless_base.json"
    based = BaseConfig(kind=cfg.base.kind, source=str(out), device=cfg.base.device, dtype=cfg.base.dtype)
    if distributed.broadcast_json(job.is_main and record.is_file() and read_json(record).get("fingerprint") == fingerprint):
        log.info(f"text-pretrained base: reusing {out}")
        return based
    tokenizer = build_demo_tokenizer(texts, cfg.pretrain.vocab_size)
    distributed.check_same(hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(), "the demo tokenizer's sha256")
    model = load_base(cfg.base, encoder_cfg, encoder_sha, tokenizer)
    for name, p in model.lm.named_parameters():
        p.requires_grad_(not name.startswith(("model.audio_tower", "model.embed_audio")))
    examples = [model.encode(as_text(r)["messages"], []) for r in train_rows]
    work = out.with_name(out.name + ".work")
    history = train_loop(model, examples, cfg.pretrain.steps, cfg.pretrain.batch_size, cfg.pretrain.learning_rate, 50, work,
                         fingerprint, cfg.run.seed, cfg.pretrain.steps, "text pretraining")
    if not job.is_main:
        distributed.barrier()  # until rank 0 has saved the base
        return based
    tmp = out.with_name(f".{out.name}.tmp")
    model.lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "speechless_base.json", {"fingerprint": fingerprint, "history": history, "created": utc_now(),
                                              "audio_tower_sha256": encoder_sha, "code_version": code_version()})
    from speechless.io import replace_dir

    replace_dir(tmp, out)
    distributed.barrier()
    return based


def load_base(base: BaseConfig, encoder_cfg: EncoderConfig, encoder_sha: str, tokenizer=None) -> SpeechLM:
    """The base LLM; in a job every rank loads it itself, and all must hold the same weights (DDP does not sync them)."""
    model = load_speech_lm(base, encoder_cfg, encoder_sha, tokenizer)
    distributed.check_same(model.base_sha256, f"the sha256 of base {base.source}")
    return model


def adapted_model(base: BaseConfig, encoder_cfg: EncoderConfig, encoder_sha: str, adapter: AdapterConfig, seed: int,
                  tokenizer=None) -> SpeechLM:
    """The base with a new adapter whose random initial weights come from `seed` alone, not from whatever ran before in
    this process (text pre-training, other variants): so models A and B start from the same adapter and the same
    dropout stream, and differ only in the speech they learn from."""
    model = load_base(base, encoder_cfg, encoder_sha, tokenizer)
    torch.manual_seed(seed)
    model.attach(adapter)
    return model


# -------------------------------------------------------------------------------------------------- speech vectors

def synthetic_tokens(cfg: Stage3Config, rows: list[dict], work: Path) -> tuple[list[dict[str, dict]], dict]:
    """Stage-2 tokens for every speech part (by its utterance id, in that recording's voice): cached and resumable.
    One {part: tokens} take per kept draw, the best first. With `data.synthetic_draws` n > 1 every part is spoken n
    times (all draws cached) and the `data.kept_draws` that stage 2's CTC probe reads closest to the text are kept
    (`best_draws`); the lineage records n, k and the probe CER of the first, best and kept draws.

    Several processes: each rank speaks its share of the texts into its own resumable part file (on its own GPU),
    then rank 0 merges the parts into the cache in text order. With sampling the draws depend on which texts share a
    generation batch, so a cache made by N ranks is another (equally valid) sample than a one-process cache."""
    job = distributed.group()
    model, revision, folder = load_stage2(cfg.data.stage2, device=str(resolve_device(cfg.base.device)))
    check_stage1_match(model, cfg.data.stage1, cfg.store)
    draws = cfg.data.synthetic_draws
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
    output = work / "speech" / f"stage2_{revision[:12]}_{config_fingerprint(cfg.data.generate)[:8]}.jsonl"

    def holds(path: Path, wanted: list[dict]) -> bool:
        return path.exists() and {row["id"] for _, row in read_jsonl(path)} == {row["id"] for row in wanted}

    def rank_file(path: Path, rank: int) -> Path:  # one process writes the cache itself
        return path.with_name(f"{path.stem}.part{rank}of{job.world_size}{path.suffix}") if job.world_size > 1 else path

    if not distributed.broadcast_json(job.is_main and holds(output, list(texts.values()))):
        if job.is_main:
            output.unlink(missing_ok=True)  # made for other texts
        mine = distributed.shard(list(texts.values()), job)
        if mine:
            if job.world_size > 1 and rank_file(output, job.rank).exists() and not holds(rank_file(output, job.rank), mine):
                rank_file(output, job.rank).unlink()  # a part made for other texts
            source = rank_file(work / "speech" / "stage2_texts.jsonl", job.rank)
            write_jsonl(source, mine)
            # each rank draws its own samples (seed + rank; one process: the configured seed)
            generate_corpus(model, revision, source, rank_file(output, job.rank),
                            cfg.data.generate.model_copy(update={"seed": cfg.data.generate.seed + job.rank}))
        distributed.barrier()
        if job.is_main and job.world_size > 1:
            by_id = {row["id"]: row for rank in range(job.world_size) if rank_file(output, rank).exists()
                     for _, row in read_jsonl(rank_file(output, rank))}
            write_jsonl(output, [by_id[key] for key in texts])
            for leftover in output.parent.glob("*.part*of*"):  # this job's parts, and any of a job of another size
                leftover.unlink()
        distributed.barrier()
    tokens = {row["id"]: row for _, row in read_jsonl(output)}
    version = open_store(cfg.store).resolve(cfg.data.stage2).ref if is_store_ref(cfg.data.stage2) else None
    record = {"ref": cfg.data.stage2, "version": version, "revision": revision, "stage1_revision": model.stage1["revision"]}
    if draws == 1:
        return [tokens], record
    probe = load_probe(folder / "probe", resolve_stage1(cfg.data.stage1, cfg.store))
    takes, chosen = best_draws(tokens, texts, part_of, probe, cfg.data.kept_draws)
    record["draws"] = {"n": draws, "kept": cfg.data.kept_draws, **chosen}
    log.info(f"stage-2 speech: kept the best {cfg.data.kept_draws} of {draws} draws per turn; probe CER "
             f"{chosen['probe_cer_first_draw']:.4f} (first draw) -> {chosen['probe_cer_best']:.4f} (best), "
             f"{chosen['probe_cer_kept']:.4f} (all kept)")
    return takes, record


def best_draws(generated: dict[str, dict], texts: dict[str, dict], part_of: dict[str, str], probe: CTCProbe,
               keep: int = 1) -> tuple[list[dict[str, dict]], dict]:
    """For each speech part, the `keep` draws whose probe transcripts have the lowest CER against its text (ties: the
    earlier draw), as `keep` takes {part: tokens}, the best first; with the corpus probe CER of the first draws, of the
    best ones and of all kept ones."""
    ids = list(texts)
    heard = dict(zip(ids, probe.transcribe([torch.tensor(generated[i]["codes"], dtype=torch.long) for i in ids])))
    error = {i: cer([texts[i]["text"]], [heard[i]]) for i in ids}
    by_part: dict[str, list[str]] = {}
    for i in ids:  # in draw order, so the stable sort below breaks ties by the earlier draw
        by_part.setdefault(part_of[i], []).append(i)
    ranked = {part: sorted(draws, key=error.__getitem__)[:keep] for part, draws in by_part.items()}

    def corpus_cer(chosen: list[str]) -> float:
        return round(cer([texts[i]["text"] for i in chosen], [heard[i] for i in chosen]), 4)

    summary = {"probe_cer_first_draw": corpus_cer([draws[0] for draws in by_part.values()]),
               "probe_cer_best": corpus_cer([draws[0] for draws in ranked.values()]),
               "probe_cer_kept": corpus_cer([i for draws in ranked.values() for i in draws])}
    takes = [{part: {**generated[draws[rank]], "id": part, "draw": draws[rank]} for part, draws in ranked.items()} for rank in range(keep)]
    return takes, summary


def vectors_from_tokens(rvq: SpeechRVQ, row: dict, levels: int | None = None) -> torch.Tensor:
    return rvq.decode(torch.tensor(row["codes"], dtype=torch.long)[:levels].T)


def speech_examples(model: SpeechLM, rows: list[dict], tokens: dict[str, dict], rvq: SpeechRVQ, max_frames: int = 750,
                    levels: int | None = None) -> list[Example]:
    """Tokenized conversations with each speech part's decoded vectors; the frozen audio embedding is computed once."""
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


# -------------------------------------------------------------------------------------------------------- evaluation

def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def score_task(task: str, closed: bool, hyps: list[str], refs: list[str]) -> dict:
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


def real_vectors(model: SpeechLM, rows: list[dict], encoder_cfg: EncoderConfig) -> dict[str, list[torch.Tensor]]:
    """Real recordings through the model's own audio tower (input of output_proj), per window of <= 30 s."""
    from speechless.data.manifest import ManifestEntry
    from speechless.features import encode_entries

    entries, seen = [], set()
    for row in rows:
        for part in speech_parts(row):
            key = part.get("utterance") or part["audio"]
            if key not in seen:
                seen.add(key)
                entries.append(ManifestEntry(id=key, audio_filepath=Path(part["audio"]), duration=0.0, text="", split=""))
    out = {}
    for utt in encode_entries(entries, model.encoder(), encoder_cfg):
        sizes = [int(w[2]) for w in utt.windows]
        out[utt.id] = list(torch.split(utt.vectors, sizes))
    return out


def through_stage1(rvq: SpeechRVQ, vectors: torch.Tensor, levels: int | None = None) -> torch.Tensor:
    """Real-audio vectors quantized by stage 1 and decoded from their first `levels` codebook levels (None = all):
    the same form as the speech the model was trained on (`speech_levels` in its adapter record)."""
    return rvq.decode(rvq.encode(vectors)[:, :levels])


def quantized(rvq: SpeechRVQ, clips: dict[str, list[torch.Tensor]], levels: int | None = None) -> dict[str, list[torch.Tensor]]:
    return {k: [through_stage1(rvq, w, levels) for w in v] for k, v in clips.items()}


def evaluate(model: SpeechLM, rows: list[dict], clips: dict[str, list[torch.Tensor]] | None, cfg: EvalConfig) -> dict:
    """Per-task scores of greedy answers; `clips` None = the same requests as text. Several processes: each rank
    answers its share of the batches and every rank gets all answers."""
    prompts = []
    for row in rows:
        audio = [] if clips is None else [clips[p.get("utterance") or p["audio"]] for p in speech_parts(row)]
        messages = (as_text(row) if clips is None else row)["messages"][:-1]
        prompts.append(model.encode(messages, audio, with_answer=False))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
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


def perplexity(model: SpeechLM, rows: list[dict]) -> float:
    """Text perplexity of the answers (each rank scores its share of the rows)."""
    parts = distributed.gather_json(model.nll([model.encode(as_text(r)["messages"], []) for r in distributed.shard(rows)]), to_all=True)
    return round(math.exp(sum(total for total, _ in parts) / max(1, sum(count for _, count in parts))), 4)


# ------------------------------------------------------------------------------------------------------------ recipe

def variant_folder(out: Path, name: str) -> Path:
    """Where variant `name` ("A_synthetic/lora") of the stage-3 run in `out` keeps its checkpoints."""
    return out / "work" / "variants" / name.replace("/", "_")


def adapter_folder(out: Path, name: str, main_name: str) -> Path:
    """Where the stage-3 run in `out` saved variant `name`'s adapter: the run folder itself for the main model."""
    return out if name == main_name else variant_folder(out, name) / "adapter"


def train(cfg: Stage3Config) -> dict:
    """Run stage 3 end to end; returns a summary (its `eval` is None on ranks > 0 of a torchrun job).

    Several processes (`torchrun ... speechless stage3 train`): every rank holds the frozen base, trains the adapter
    with DDP on its share of each global batch (`train_loop`), speaks and scores its share of the texts, and gets
    every answer back; rank 0 alone writes files and pushes."""
    began = time.time()
    job = distributed.setup()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.run.out_dir)
    work = out / "work"
    if job.is_main:
        write_text(out / "resolved_config.yaml", to_yaml(cfg))

    # Setup: stage 1 (codebooks + encoder) and stage 2, checked against each other.
    stage1 = resolve_stage1(cfg.data.stage1, cfg.store)
    rvq = SpeechRVQ.load(stage1.folder)
    if (cfg.data.synthetic_levels or 0) > rvq.num_quantizers:
        raise UsageError(f"data.synthetic_levels={cfg.data.synthetic_levels}: stage 1 ({stage1.folder}) has "
                         f"{rvq.num_quantizers} codebook levels; set at most {rvq.num_quantizers}")
    encoder_cfg, encoder_sha = stage1_encoder(stage1.folder)

    # Conversations.
    manifest = manifest_rows(Path(cfg.data.manifest))
    sentences = Path(cfg.data.sentences) if cfg.data.sentences else Path(cfg.data.manifest).parent / "sentences.jsonl"
    if cfg.data.instructions:
        train_rows = read_conversations(cfg.data.instructions)
    else:
        train_rows = demo_conversations(sentences, manifest, cfg.data.train_split, cfg.data.tasks, cfg.data.voices_per_sentence, cfg.run.seed)
    if cfg.data.eval_instructions:
        eval_rows = read_conversations(cfg.data.eval_instructions)
    else:
        eval_rows = demo_conversations(sentences, manifest, cfg.data.eval_split, cfg.data.tasks, cfg.data.eval_voices_per_sentence, cfg.run.seed)
    if job.is_main:
        write_jsonl(work / "data" / "train.jsonl", train_rows)
        write_jsonl(work / "data" / "eval.jsonl", eval_rows)
    log.info(f"conversations: {len(train_rows)} train, {len(eval_rows)} held-out ({cfg.data.eval_split})")

    # Base LLM (demo: text-pretrained first, reused when current).
    base_cfg = cfg.base
    if cfg.pretrain.enabled:
        base_cfg = pretrain_base(cfg, train_rows, encoder_cfg, encoder_sha, demo_tokenizer_texts(train_rows))

    # Speech for the user turns: synthetic (stage 2) for model A, real stage-1 tokens for the topline B.
    # Each source is a list of takes ({part: tokens}); every conversation is trained on once per take.
    synthetic, stage2_record = synthetic_tokens(cfg, train_rows, work)
    sources = {"A_synthetic": synthetic}
    if cfg.compare.topline:
        sources["B_real"] = [{r["id"]: r for r in load_split(stage1, cfg.data.train_split)}]

    timings = {}
    base = load_base(base_cfg, encoder_cfg, encoder_sha)
    clips = real_vectors(base, eval_rows, encoder_cfg)
    base_ppl = perplexity(base, eval_rows)
    base_text = evaluate(base, eval_rows, None, cfg.eval)
    timings["setup_s"] = round(time.time() - began, 1)
    lineage = {"stage1": stage1.record(), "stage2": stage2_record, "code_version": code_version()}

    variants = {}
    main_name = f"A_synthetic/{cfg.adapter.kind}"
    kinds = list(dict.fromkeys([cfg.adapter.kind] + cfg.compare.adapters))
    for source_name, takes in sources.items():
        for kind in kinds:
            name = f"{source_name}/{kind}"
            t0 = time.time()
            adapter = cfg.adapter.model_copy(update={"kind": "dus" if kind == "dus_all" else kind,
                                                     "speech_only": cfg.adapter.speech_only and kind != "dus_all"})
            model = adapted_model(base_cfg, encoder_cfg, encoder_sha, adapter, cfg.run.seed)
            levels = cfg.data.synthetic_levels if source_name == "A_synthetic" else None
            examples = model.embed_audio_once([e for tokens in takes for e in speech_examples(model, train_rows, tokens, rvq, levels=levels)])
            fingerprint = f"{config_fingerprint(cfg)} {name} {model.dus_after}"
            history = train_loop(model, examples, cfg.train.steps, cfg.train.batch_size, cfg.train.learning_rate, cfg.train.warmup_steps,
                                 variant_folder(out, name), fingerprint, cfg.run.seed, cfg.train.checkpoint_every,
                                 name, cfg.train.gradient_checkpointing)
            result = {"adapter": adapter.model_dump(mode="json"), "parameters": model.parameter_counts(), "history": history,
                      "speech": evaluate(model, eval_rows, clips, cfg.eval)}
            # The same requests as text. A speech-only adapter leaves text-only inputs exactly the base (tested), so
            # its text answers are the base's; they are generated again only for the main model and for DUS on all positions.
            if name == main_name or not adapter.speech_only:
                result["text"] = evaluate(model, eval_rows, None, cfg.eval)
            ppl = perplexity(model, eval_rows)
            result["text_perplexity"] = {"before": base_ppl, "after": ppl, "relative_change": round((ppl - base_ppl) / base_ppl, 6)}
            # Real input put through stage 1 at the levels this model's training speech had; for the main model and
            # its topline, so A and B are also compared with both inputs in the form each was trained on.
            if kind == cfg.adapter.kind:
                result["speech_quantized"] = evaluate(model, eval_rows, quantized(rvq, clips, levels), cfg.eval)
            if job.is_main:
                model.save_adapter(adapter_folder(out, name, main_name),
                                   {**lineage, "speech_levels": levels, "quantize_real": cfg.eval.quantize_real})
            result["seconds"] = round(time.time() - t0, 1)
            variants[name] = result
            log.info(f"{name}: " + ", ".join(f"{t} {v['score']:.3f}" for t, v in result["speech"].items()))

    summary = summarize(variants, base_text, main_name, kinds, list(sources))
    metrics = {"eval": {**summary, "base_text": base_text, "base_text_perplexity": base_ppl, "variants": variants,
                        "held_out": {"split": cfg.data.eval_split, "conversations": len(eval_rows), "recordings": len(clips),
                                     "speech": "real espeak recordings through the model's own audio tower"}},
               "timings": {**timings, "total_s": round(time.time() - began, 1)}, "created": utc_now()}
    if not job.is_main:  # torchrun job: rank 0 writes, pushes and reports
        distributed.barrier()
        return {"out_dir": str(out), "eval": None, "pushed": None, "rank": job.rank}
    write_json(out / "metrics.json", metrics)
    provenance = {**lineage, "base": {"source": base_cfg.source, "weights_sha256": load_adapter_record(out)["base"]["weights_sha256"]},
                  "encoder_sha256": encoder_sha, "manifest_sha256": sha256_file(cfg.data.manifest), "created": utc_now()}
    write_json(out / "provenance.json", provenance)
    write_text(out / "README.md", model_card(cfg, metrics, provenance))
    pushed = None
    if cfg.run.push:
        info = open_store(cfg.store).push("stage3", out, message=cfg.run.message)
        pushed = f"{info.stage}@{info.version}"
        log.info(f"pushed {pushed} (revision {info.revision[:12]})")
    distributed.barrier()  # the other ranks return once the outputs are written
    return {"out_dir": str(out), "eval": summary, "pushed": pushed}


def load_adapter_record(folder: Path) -> dict:
    return read_json(Path(folder) / "adapter_config.json")


def a_vs_b(a: dict, b: dict) -> dict:
    """Per task: A's and B's score, their ratio and whether A >= 0.9 x B (the issue's bar)."""
    return {task: {"metric": a[task]["score_name"], "A_synthetic": a[task]["score"], "B_real": b[task]["score"],
                   "ratio": round(a[task]["score"] / b[task]["score"], 4) if b[task]["score"] else None,
                   "meets_0.9": bool(b[task]["score"] == 0 or a[task]["score"] >= 0.9 * b[task]["score"])}
            for task in a}


def summarize(variants: dict, base_text: dict, main_name: str, kinds: list[str], sources: list[str]) -> dict:
    """The figures of the closing note: A vs B per task, and the adapter table."""
    summary: dict = {"main": main_name}
    if "B_real" in sources:
        summary["a_vs_b"] = {kind: a_vs_b(variants[f"A_synthetic/{kind}"]["speech"], variants[f"B_real/{kind}"]["speech"])
                             for kind in kinds}
        main_kind = main_name.split("/")[1]
        # Both models with real input put through stage 1 as their training speech was (A at data.synthetic_levels).
        summary["a_vs_b_quantized"] = {main_kind: a_vs_b(variants[main_name]["speech_quantized"],
                                                         variants[f"B_real/{main_kind}"]["speech_quantized"])}
    summary["adapters"] = {name: {"tasks": {t: v["score"] for t, v in r["speech"].items()},
                                  "text_perplexity_change": r["text_perplexity"]["relative_change"],
                                  "trainable_parameters": r["parameters"]["trainable"]} for name, r in variants.items()}
    summary["base_text_scores"] = {t: v["score"] for t, v in base_text.items()}
    # the shape `speechless report` plots
    summary["comparison"] = {name: {"scores": {t: {"score": v["score"]} for t, v in r["speech"].items()},
                                    "text_perplexity": r["text_perplexity"]} for name, r in variants.items()}
    return summary


def model_card(cfg: Stage3Config, metrics: dict, provenance: dict) -> str:
    ev = metrics["eval"]
    lines = ["# speechless stage 3 adapter", "",
             f"Adapter `{cfg.adapter.kind}` for base `{provenance['base']['source']}` (weights sha256 {provenance['base']['weights_sha256'][:12]}), "
             f"trained on stage-2 synthetic speech only (stage 1 {provenance['stage1'].get('version') or provenance['stage1']['ref']}, "
             f"stage 2 {provenance['stage2'].get('version') or provenance['stage2']['ref']}).", "",
             f"Evaluated on held-out REAL speech ({ev['held_out']['conversations']} requests, {ev['held_out']['recordings']} recordings).", "",
             "| variant | " + " | ".join(cfg.data.tasks) + " | text ppl change | trainable params |", "|---" * (len(cfg.data.tasks) + 3) + "|"]
    for name, row in ev["adapters"].items():
        lines.append(f"| {name} | " + " | ".join(str(row["tasks"].get(t, "")) for t in cfg.data.tasks)
                     + f" | {row['text_perplexity_change']:+.4%} | {row['trainable_parameters']:,} |")
    for key, label in (("a_vs_b", "native input"), ("a_vs_b_quantized", "input through stage 1 as in training")):
        for kind, rows in ev.get(key, {}).items():
            lines.append(f"\nA (synthetic) / B (real-speech topline), {kind}, {label}: "
                         + ", ".join(f"{t} {r['A_synthetic']} / {r['B_real']}" + ("" if r["meets_0.9"] else " (A < 0.9 x B)") for t, r in rows.items()))
    lines += ["", "Scores: asr 1 - CER, ast chrF/100, where/who exact match. Text-only base on the same requests as text: "
              + ", ".join(f"{t} {v}" for t, v in ev["base_text_scores"].items()), "",
              "Files: `adapter.safetensors` + `adapter_config.json` (adapter weights only; lineage inside), metrics.json, provenance.json."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- inference

def load_for_inference(ref: str, store_cfg: StoreConfig | None = None) -> tuple[SpeechLM, dict, Path]:
    """A stage-3 adapter folder or `stage3@vN` -> (model on its base with the adapter, record, folder)."""
    from speechless.tokenizer import resolve_checkpoint

    folder = resolve_checkpoint(ref, store_cfg)
    if not (folder / "adapter_config.json").is_file():
        raise UsageError(f"{folder}: no adapter_config.json; not a stage-3 adapter (train one with `speechless stage3 train`)")

    def build(record: dict) -> SpeechLM:
        base = BaseConfig(kind=record["base"]["kind"], source=record["base"]["source"], revision=record["base"].get("revision"))
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
    from speechless.features import encode_entries

    entries = [ManifestEntry(id=str(i), audio_filepath=Path(r["audio"]), duration=0.0, text="", split="") for i, r in enumerate(requests) if r.get("audio")]
    for entry in entries:
        if not Path(entry.audio_filepath).is_file():
            raise UsageError(f"{entry.audio_filepath}: audio file not found")
    clips = {}
    for utt in encode_entries(entries, model.encoder(), model.encoder_cfg) if entries else []:
        windows = list(torch.split(utt.vectors, [int(w[2]) for w in utt.windows]))
        if len(windows) > 1:
            log.warn(f"{requests[int(utt.id)]['audio']}: longer than {model.encoder_cfg.max_window_s:g} s; split into {len(windows)} windows")
        clips[utt.id] = [through_stage1(rvq, w, levels) for w in windows] if rvq is not None else windows
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
