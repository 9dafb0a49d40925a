"""Benchmark 5 (`benchmarks/run.py --only stage3`): stage-3 training throughput, this project's loop vs a plain
`transformers.Trainer` + peft, on the same model, data, LoRA and number of optimizer steps.

Data: the demo's stage-3 training conversations (transcribe / translate / where / who, 2 recordings per sentence) with
REAL speech in the audio slots (the topline's source: the stage-1 tokens of the training recordings, decoded to 1024-d
vectors by the stage-1 codebooks), a seeded sample of `--stage3-conversations`. Model: the demo's tiny random-weight
Gemma 4 (configs/llm/tiny_gemma4.json) with the stage-1 encoder as audio tower, the demo tokenizer, and the demo's
LoRA (rank 16, alpha 32, q/k/v/o/gate/up/down, speech-only) attached by the same `SpeechLM.attach` on every side.
Random weights: throughput does not depend on their values.

Sides, each `--stage3-steps` AdamW steps of `--stage3-batch` conversations (whole epochs: every side trains on every
conversation equally often, so all sides process the same real tokens), clipping at 1.0, warmup + cosine:
- ours: `speechless.core.training.train_loop`, the loop `speechless stage3 train` runs, on `SpeechLM.embed_audio_once`
  examples (the frozen output_proj + embed_audio run once, inside the timing) with its length-bucketed batches;
- Trainer: `transformers.Trainer` with its default random sampler; the frozen audio path runs at every step, as
  a model forward does. Trainer cannot feed 1024-d vectors into audio slots by itself, so its model is a thin
  module whose forward is `SpeechLM.loss` on the batch dict `SpeechLM.batch` collates: the same forward as ours;
- Trainer grouped: the same, with Trainer's own `group_by_length` sampler and the audio embedded once (inside the
  timing), i.e. given ours' two data-side choices: what is left is the loop itself.

Tokens are counted the same way on every side: the non-pad input positions (text tokens + audio slots) of the batches
the optimizer stepped on, divided by wall seconds; the padded positions fed to the model are reported beside.
"""

from __future__ import annotations

import math
import random
import tempfile
from functools import partial
from pathlib import Path

import torch
from _measure import alternate, table
from transformers import Trainer, TrainingArguments

from speechless.core.training import length_batches as epoch_batches
from speechless.llm.adapt import (
    PretrainConfig,
    demo_tokenizer_texts,
    manifest_rows,
    speech_examples,
    stage1_encoder,
    train_loop,
)
from speechless.llm.adapters import AdapterConfig
from speechless.llm.base import BaseConfig, build_demo_tokenizer
from speechless.llm.instructions import DEMO_TASKS, demo_conversations
from speechless.llm.model import load_speech_lm
from speechless.speech.rvq import SpeechRVQ
from speechless.speech.tokens import load_split, resolve_stage1

ROOT = Path(__file__).resolve().parent.parent


def _data(args):
    """(model factory, raw examples, parameter counts): the demo base + LoRA, and the sampled conversations with
    real-speech vectors."""
    stage1 = resolve_stage1(str(args.stage1))
    encoder_cfg, encoder_sha = stage1_encoder(stage1.folder)
    manifest = manifest_rows(Path(args.corpus))
    rows = demo_conversations(Path(args.corpus).parent / "sentences.jsonl", manifest, "train", list(DEMO_TASKS), 2, seed=0)
    rows = random.Random(0).sample(rows, min(len(rows), args.stage3_conversations))
    tokenizer = build_demo_tokenizer(demo_tokenizer_texts(rows), PretrainConfig().vocab_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def model():
        speech_lm = load_speech_lm(BaseConfig(source=str(ROOT / "configs/llm/tiny_gemma4.json"), device=device),
                                   encoder_cfg, encoder_sha, tokenizer)
        speech_lm.attach(AdapterConfig(kind="lora"))
        return speech_lm

    first = model()
    examples = speech_examples(first, rows, {r["id"]: r for r in load_split(stage1, "train")}, SpeechRVQ.load(stage1.folder))
    return model, examples, first.parameter_counts()


class LossOf(torch.nn.Module):
    """What Trainer trains: a module whose forward is `SpeechLM.loss` on the batch dict `SpeechLM.batch` collates."""

    accepts_loss_kwargs = False  # Trainer: take the loss as returned (the mean over the batch's answer tokens)

    def __init__(self, speech_lm):
        super().__init__()
        self.speech_lm = speech_lm

    def forward(self, **batch):
        return {"loss": self.speech_lm.loss(batch)}


def _trainer(speech_lm, examples, args, steps: int, grouped: bool, counts: dict, work: str) -> Trainer:
    def collate(items):
        chosen = [examples[item["index"]] for item in items]
        counts["real"] += sum(len(e.ids) for e in chosen)
        counts["padded"] += len(chosen) * max(len(e.ids) for e in chosen)
        return speech_lm.batch(chosen)

    settings = TrainingArguments(
        output_dir=work, per_device_train_batch_size=args.stage3_batch, max_steps=steps,
        learning_rate=args.stage3_lr, warmup_steps=args.stage3_warmup, lr_scheduler_type="cosine", weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, seed=0,
        train_sampling_strategy="group_by_length" if grouped else "random")
    dataset = [{"input_ids": e.ids, "index": i} for i, e in enumerate(examples)]
    return Trainer(model=LossOf(speech_lm), args=settings, train_dataset=dataset, data_collator=collate)


def _ours_counts(examples, args) -> dict:
    """Real and padded positions of the batches `train_loop` steps on (the same plan it computes)."""
    lengths = [len(e.ids) for e in examples]
    per_epoch = math.ceil(len(examples) / args.stage3_batch)
    counts = {"real": 0, "padded": 0}
    for step in range(args.stage3_steps):
        epoch, index = divmod(step, per_epoch)
        batch = epoch_batches(lengths, args.stage3_batch, 0, epoch)[index]
        counts["real"] += sum(lengths[i] for i in batch)
        counts["padded"] += len(batch) * max(lengths[i] for i in batch)
    return counts


def run(args, report: dict) -> str:
    build, raw, parameters = _data(args)
    per_epoch = -(-len(raw) // args.stage3_batch)
    if args.stage3_steps % per_epoch:
        raise SystemExit(f"--stage3-steps {args.stage3_steps}: use a multiple of {per_epoch} (one epoch of "
                         f"{len(raw)} conversations in batches of {args.stage3_batch}), so every side sees the same tokens")
    models = {name: build() for name in ("ours", "trainer", "grouped")}
    counts = {"ours": _ours_counts(raw, args), "trainer": {"real": 0, "padded": 0}, "grouped": {"real": 0, "padded": 0}}

    def ours(steps: int) -> None:
        with tempfile.TemporaryDirectory() as work:
            train_loop(models["ours"], models["ours"].embed_audio_once(raw), steps, args.stage3_batch, args.stage3_lr,
                       args.stage3_warmup, Path(work), "bench", 0, steps, "bench: ours")

    def trainer(name: str, grouped: bool, steps: int) -> None:
        counts[name] = {"real": 0, "padded": 0}  # the last run's batches
        examples = models[name].embed_audio_once(raw) if grouped else raw
        with tempfile.TemporaryDirectory() as work:
            _trainer(models[name], examples, args, steps, grouped, counts[name], work).train()

    sides = {"ours": ours, "trainer": partial(trainer, "trainer", False), "grouped": partial(trainer, "grouped", True)}
    for side in sides.values():  # warm-up, one step each: no side pays the process's one-off allocations
        side(1)
    runs = alternate({name: partial(side, args.stage3_steps) for name, side in sides.items()}, args.rounds)
    labels = {"ours": "ours: `train_loop` (length-bucketed batches, audio embedded once)",
              "trainer": "`Trainer` + peft (random batches, audio path every step)",
              "grouped": "`Trainer` + peft, `group_by_length`, audio embedded once"}
    result = {"conversations": len(raw), "steps": args.stage3_steps, "batch": args.stage3_batch, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "lora_parameters": parameters["trainable"], "model_parameters": parameters["total"],
              "tokens_counted": "non-pad input positions (text tokens + audio slots) of the stepped batches"}
    rows = []
    ours_rate = counts["ours"]["real"] / runs["ours"][1]["seconds"]
    for name in sides:
        stats = runs[name][1]
        rate = counts[name]["real"] / stats["seconds"]
        pad = 1 - counts[name]["real"] / counts[name]["padded"]
        result[name] = {**stats, **counts[name], "tokens_per_s": round(rate), "pad_share": round(pad, 4),
                        "s_per_step": round(stats["seconds"] / args.stage3_steps, 4)}
        rows.append([labels[name], counts[name]["real"], counts[name]["padded"], f"{pad:.1%}", round(rate),
                     f"{stats['seconds'] / args.stage3_steps:.3f}", f"{rate / ours_rate:.2f}x", stats["peak_mib"]])
    same_tokens = len({counts[name]["real"] for name in sides}) == 1
    result["same_real_tokens"] = same_tokens
    report["stage3"] = result
    return (f"### 5. Stage-3 training vs `transformers.Trainer` + peft ({len(raw)} demo conversations with real-speech "
            f"vectors, {args.stage3_steps} steps x {args.stage3_batch}, LoRA rank 16 = {parameters['trainable']:,} of "
            f"{parameters['total']:,} parameters, {result['device']}, {torch.get_num_threads()} threads; fastest of "
            f"{args.rounds} alternating rounds)\n\n"
            + table(["path", "real tokens", "padded tokens fed", "padding", "real tokens/s", "s/step", "vs ours", "peak MiB"], rows)
            + f"\n\nours / Trainer **{ours_rate / result['trainer']['tokens_per_s']:.2f}x**, ours / Trainer grouped "
              f"{ours_rate / result['grouped']['tokens_per_s']:.2f}x; every side trained on the same real tokens: "
              f"{'yes' if same_tokens else 'NO'}\n")
