"""The training toolkit every stage uses: device and dtype, the learning-rate schedule, length-bucketed batches, the
resume rules, and the end of a run (provenance, model card, push).

One implementation each, so that stages 1-3 and the probe behave alike:

* `resolve_device` / `autocast_dtype`: 'auto' means CUDA when available; bf16 autocast only where asked or where the
  GPU supports it (the CPU default is fp32).
* `lr_factor`: linear warmup, then cosine decay to `floor` x the peak (the floor is each stage's `min_lr_ratio`).
* `length_batches`: one epoch of batches of similar lengths, in an order that depends only on (seed, epoch), so a
  resumed run sees exactly the batches an uninterrupted one would.
* `resume_state`: a run resumes from `work/state.json` only when it was made with the same config (its fingerprint)
  and its checkpoint is there; otherwise it says why and starts from step 0 (never silently). The checkpoint's
  sha256 is verified when it is loaded (`speechless.core.runs.load_checkpoint`).
* `finish_run`: provenance.json (with the code version, config fingerprint and time), the model card README.md, and
  the push to the store as the stage's next version.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from speechless.core import distributed, log
from speechless.core.config import Section
from speechless.core.errors import UsageError
from speechless.core.io import read_json, write_json, write_text
from speechless.core.runs import checkpoint_path, code_version, config_fingerprint, utc_now
from speechless.core.store import StoreConfig, open_store


def resolve_device(name: str, key: str = "device") -> torch.device:
    """'auto' = CUDA when available, else the CPU; any other name as torch reads it ('cpu', 'cuda', 'cuda:1'). In a
    torchrun job a bare 'cuda' (or 'auto' on a GPU) means this process's GPU (LOCAL_RANK). An unknown name, or CUDA
    asked for where there is none, is a UsageError naming the config `key`."""
    if name == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"{key}: unknown device {name!r}; use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{key}: {name!r} requested but CUDA is not available; use auto or cpu")
    return distributed.local_device(device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting: 'bf16' -> bf16; 'auto' -> bf16 on a GPU that supports it; else None
    (fp32)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, no_decay_names: tuple[str, ...] = ()) -> torch.optim.AdamW:
    """AdamW (betas 0.9 / 0.98) over the trainable parameters, with weight decay on matrices only: not on norms and
    biases (fewer than 2 dimensions) nor on parameters whose name contains one of `no_decay_names` (e.g. "embed")."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and not any(part in name for part in no_decay_names) else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-8)


def lr_factor(step: int, steps: int, warmup: int, floor: float) -> float:
    """Share of the peak learning rate at `step` (counted from 0): linear warmup over `warmup` steps, then cosine decay
    to `floor` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def length_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches of one epoch (indices into `lengths`), in a random order that depends only on
    (seed, epoch)."""
    return bucketed_batches(lengths, batch_size, random.Random(seed * 1_000_003 + epoch))


def bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches drawn with `rng`: sort a shuffled index by length, cut it into batches, shuffle them."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    idx.sort(key=lambda i: lengths[i])
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


def resume_state(work: Path, fingerprint: str, what: str) -> dict | None:
    """The resume state in `work/state.json` when training can go on from it, else None with a warning saying why.

    A state made with another config (fingerprint) or whose checkpoint is missing is not resumed from: training
    starts again from step 0, and the warning says so. A state at step 0 is resumed from like any other."""
    state_file = Path(work) / "state.json"
    if not state_file.is_file():
        return None
    state = read_json(state_file)
    if state.get("fingerprint") != fingerprint:
        log.warn(f"{what}: {work} holds the resume state of another config; training restarts from step 0")
        return None
    if not checkpoint_path(Path(work), int(state.get("step", 0))).is_file():
        log.warn(f"{what}: the resume checkpoint of step {state.get('step')} is missing in {work}; training restarts from step 0")
        return None
    return state


def provenance(stage: str, cfg: Section, **fields) -> dict:
    """A run's provenance record: the stage, what it was made from (`fields`), the code version, the fingerprint of
    its resolved config and the time."""
    return {"stage": stage, **fields, "code_version": code_version(), "config_sha256": config_fingerprint(cfg),
            "created": utc_now()}


def finish_run(out: Path, stage: str, record: dict, card: str, push: bool, store: StoreConfig, message: str = "") -> str | None:
    """Write provenance.json and the model card README.md into the run folder `out`; with `push`, push the folder
    (without `work/`) as the stage's next store version. Returns the pushed ref (`stage1@v3`) or None."""
    write_json(Path(out) / "provenance.json", record)
    write_text(Path(out) / "README.md", card)
    if not push:
        return None
    info = open_store(store).push(stage, Path(out), message=message)
    pushed = f"{info.stage}@{info.version}"
    log.info(f"pushed {pushed} (revision {info.revision[:12]})")
    return pushed
