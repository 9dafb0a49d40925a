"""What every stage's run shares: the run section of its config, its fingerprint, and the code version it records."""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator

import speechless
from speechless.core.config import Section
from speechless.core.loggers import LOGGERS


def logger_names(value):
    """`run.loggers` as given (a list, or one string 'json,tensorboard') checked against the known loggers."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [name for name in value if name not in LOGGERS] if isinstance(value, list) else []
    if unknown:
        raise ValueError(f"unknown logger {unknown[0]!r}; known loggers: {', '.join(LOGGERS)}")
    return value


LoggerNames = Annotated[list[str], BeforeValidator(logger_names)]
"""A `loggers` list (`run.loggers`, the pipeline's `run.loggers`): names checked by `logger_names`."""


class RunConfig(Section):
    out_dir: str = "runs/demo/stage"
    """The run folder: the checkpoint files, plus `work/` (caches, resume state; never pushed)."""
    seed: int = 0
    """Seed for initialisation, batch sampling and any sampling inside training (a resumed run repeats the same steps)."""
    push: bool = False
    """Push the finished checkpoint to the store as the stage's next version (`stageN@vK`)."""
    message: str = ""
    """Version message recorded with a push."""
    loggers: LoggerNames = ["json"]
    """Where the training curve goes: 'json' (the history in metrics.json, always written) and optionally 'tensorboard'
    (event files in `<out_dir>/work/tensorboard/`, never pushed). Changes no output and no resume."""


NOT_FINGERPRINTED = {"push", "message", "loggers"}
"""Run keys that change no output: left out of a resume's fingerprint and of the pipeline's step stamp."""


def config_fingerprint(config: Section) -> str:
    """sha256 of what a resume must agree on: the whole resolved config except push settings, loggers and the store."""
    relevant = config.model_dump(mode="json", exclude={"run": NOT_FINGERPRINTED, "store": True})
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def code_version() -> str:
    """'speechless X.Y.Z (git abc1234)' — the git part when running from a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"speechless {speechless.__version__}" + (f" (git {sha})" if sha else "")


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def checkpoint_path(work: Path, step: int) -> Path:
    return work / "checkpoints" / f"step-{step:06d}.safetensors"


def save_checkpoint(work: Path, step: int, model_tensors: dict, optimizer, state: dict, keep: int) -> None:
    """Write a resume checkpoint (model tensors + optimizer slots, safetensors) and `work/state.json`; keep the last K.

    `state` is updated in place: `step`, the list of kept `checkpoints` (the averaging window of stage 1) and their
    `checkpoint_sha256` (verified by `load_checkpoint`: a damaged checkpoint is never resumed from).
    """
    import torch

    from speechless.core.io import save_tensors, sha256_file, write_json

    tensors = {f"model.{k}": v for k, v in model_tensors.items()}
    if optimizer is not None:
        for index, slots in optimizer.state_dict()["state"].items():
            tensors.update({f"optim.{index}.{name}": torch.as_tensor(value) for name, value in slots.items()})
    save_tensors(checkpoint_path(work, step), tensors)
    state["checkpoints"] = (state.get("checkpoints", []) + [step])[-keep:]
    digests = {**state.get("checkpoint_sha256", {}), str(step): sha256_file(checkpoint_path(work, step))}
    state["checkpoint_sha256"] = {str(kept): digests[str(kept)] for kept in state["checkpoints"] if str(kept) in digests}
    state["step"] = step
    write_json(work / "state.json", state)
    for old in (work / "checkpoints").glob("step-*.safetensors"):
        if int(old.stem.split("-")[1]) not in state["checkpoints"]:
            old.unlink(missing_ok=True)


def load_checkpoint(work: Path, step: int, optimizer=None, device=None) -> dict:
    """Restore the optimizer slots of a resume checkpoint (when given) and return its model tensors. The file must
    match the sha256 that `work/state.json` records for it."""
    from speechless.core.errors import RuntimeFailure
    from speechless.core.io import load_tensors, read_json, sha256_file

    path = checkpoint_path(work, step)
    recorded = read_json(work / "state.json").get("checkpoint_sha256", {}).get(str(step)) if (work / "state.json").is_file() else None
    if recorded is not None and path.is_file() and sha256_file(path) != recorded:
        raise RuntimeFailure(f"{path}: sha256 differs from the one recorded in {work / 'state.json'} (damaged resume checkpoint); "
                             f"delete {work / 'state.json'} to restart training (features are kept)")
    tensors = load_tensors(path)
    if optimizer is not None:
        saved = optimizer.state_dict()
        slots: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                slots.setdefault(int(index), {})[name] = value.to(device) if device is not None else value
        saved["state"] = slots
        optimizer.load_state_dict(saved)
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}



def verify_weights(path: Path, variant: str) -> str:
    """sha256 of a checkpoint's weight file, checked against the digest its provenance.json records for `variant`
    (when it records one). safetensors only notices damage to its header: a flipped bit in the tensor bytes would
    load silently."""
    from speechless.core.errors import RuntimeFailure
    from speechless.core.io import read_json, sha256_file

    path = Path(path)
    digest = sha256_file(path) if path.is_file() else ""
    provenance = path.parent / "provenance.json"
    recorded = (read_json(provenance).get("weights_sha256") or {}).get(variant) if provenance.is_file() and digest else None
    if recorded is not None and recorded != digest:
        raise RuntimeFailure(f"{path}: sha256 {digest[:12]} differs from {recorded[:12]} recorded in provenance.json (file corrupt, "
                             "or the folder mixes two runs); download or re-create the checkpoint")
    return digest
