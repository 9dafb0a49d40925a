"""Training loops the stage recipes and the benchmarks share (library code: `stages/` and `benchmarks/` import them).

- `epoch_batches`: length-bucketed batches of one epoch in a seeded order (stage 2 and stage 3).
- `lr_at`: warmup + cosine to 0.1 (stage 3).
- `train_loop`: the stage-3 adapter loop `speechless stage3 train` runs (AdamW on the trainable parameters,
  length-bucketed batches, resumable, DDP over the adapter).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from speechless import distributed, log
from speechless.io import read_json
from speechless.llm import Example, SpeechLM
from speechless.runs import load_checkpoint, save_checkpoint


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches of one epoch, in a random order that depends only on (seed, epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    idx.sort(key=lambda i: lengths[i])
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


def lr_at(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def train_loop(model: SpeechLM, examples: list[Example], steps: int, batch_size: int, lr: float, warmup: int, work: Path,
               fingerprint: str, seed: int, checkpoint_every: int, what: str, gradient_checkpointing: bool = False) -> list[dict]:
    """AdamW on the trainable parameters, length-bucketed batches, warmup + cosine; resumable from `work/`.

    Several processes (torchrun): DDP over the trainable parameters only; every rank takes its share of each global
    batch (`batch_size` conversations in all) and divides its summed loss by the target tokens of the whole global
    batch, so N ranks take the step one process would take; rank 0 alone writes the resume checkpoints."""
    job = distributed.group()
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    state = {"fingerprint": fingerprint, "history": []}
    start = 0
    if (work / "state.json").is_file():
        saved = read_json(work / "state.json")
        if saved.get("fingerprint") == fingerprint and saved.get("step"):
            tensors = load_checkpoint(work, saved["step"], optimizer)
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(tensors[name])
            state, start = saved, saved["step"]
            log.info(f"{what}: resuming at step {start}")
    distributed.barrier()  # every rank has read the resume state before rank 0 writes again
    if gradient_checkpointing:
        model._inner().gradient_checkpointing_enable()
    model.train()
    loss_fn = distributed.data_parallel(model, "loss", trainable_only=True)
    lengths = [len(e.ids) for e in examples]
    per_epoch = math.ceil(len(examples) / batch_size)
    began = time.time()
    for step in range(start, steps):
        epoch, index = divmod(step, per_epoch)
        batch = [examples[i] for i in epoch_batches(lengths, batch_size, seed, epoch)[index]]
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_at(step, steps, warmup)
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
            state["history"].append({"step": step + 1, "loss": round(mean_loss, 4), "seconds": round(time.time() - began, 1)})
            log.info(f"{what}: step {step + 1}/{steps} loss {mean_loss:.4f}")
        if job.is_main and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(work, step + 1, {n: p.detach() for n, p in params.items()}, optimizer, state, keep=1)
    model.eval()
    return state["history"]
