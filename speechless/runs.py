"""What every stage's run shares: the run section of its config, its fingerprint, and the code version it records."""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import speechless
from speechless.config import Section


class RunConfig(Section):
    out_dir: str = "runs/demo/stage"
    """The run folder: the checkpoint files, plus `work/` (caches, resume state; never pushed)."""
    seed: int = 0
    """Seed for initialisation, batch sampling and any sampling inside training (a resumed run repeats the same steps)."""
    push: bool = False
    """Push the finished checkpoint to the store as the stage's next version (`stageN@vK`)."""
    message: str = ""
    """Version message recorded with a push."""


def config_fingerprint(config: Section) -> str:
    """sha256 of what a resume must agree on: the whole resolved config except push settings and the store."""
    relevant = config.model_dump(mode="json", exclude={"run": {"push", "message"}, "store": True})
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
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
