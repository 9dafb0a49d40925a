"""Where a stage's training curve goes besides its JSON history: `run.loggers`.

The JSON history (`state["history"]`, copied into metrics.json) is always written: the report and the metrics read
it. `run.loggers` names extra sinks; today `tensorboard`, which writes TensorBoard event files (scalars only) into
`<run.out_dir>/work/tensorboard/` (inside `work/`, so never pushed with the checkpoint). A logger only reads the
numbers it is given: weights and token files are the same with or without it.

    with open_loggers(cfg.run) as logger:
        logger.log(step, {"loss": 1.2, "lr": 3e-4, "eval": {"level_loss": [2.1, 3.0]}})

writes `train/loss`, `train/lr`, `eval/level_loss/0` and `eval/level_loss/1` at `step`. Only rank 0 of a torchrun
job writes. A resumed run appends a new event file: its first logged step purges that step and later ones of the earlier
files (steps logged before a kill, after the last checkpoint, are trained again), so TensorBoard shows each step once.
"""

from __future__ import annotations

from pathlib import Path

from speechless.core import distributed
from speechless.core.errors import UsageError

LOGGERS = ("json", "tensorboard")
"""The known names of `run.loggers` (checked by `RunConfig`)."""
TENSORBOARD_DIR = Path("work") / "tensorboard"
NO_TENSORBOARD = "run.loggers: 'tensorboard' needs the tensorboard package (pip install tensorboard), or leave it out"


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a history record as TensorBoard tags: nested dicts joined with '/', lists of numbers indexed
    (`eval/level_loss/0`); strings, booleans, None and other lists left out. Top-level keys other than `eval` go
    under `train/` (a `train_` prefix dropped: stage 1's `train_mse` is `train/mse`); `step` is the x axis."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key == "step":
            continue
        tag = f"{prefix}{key}" if prefix else ("eval" if key == "eval" else f"train/{str(key).removeprefix('train_')}")
        if isinstance(value, dict):
            out.update(scalars(value, f"{tag}/"))
        elif isinstance(value, (list, tuple)):
            if value and all(_number(v) for v in value):
                out.update({f"{tag}/{i}": float(v) for i, v in enumerate(value)})
        elif _number(value):
            out[tag] = float(value)
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # NaN kept: a diverged loss shows


class Loggers:
    """The sinks of one training curve. `log(step, record)` sends a history record (the JSON history itself is the
    stage's own list); `close()` flushes. A context manager."""

    def __init__(self, tensorboard_dir: Path | None):
        self.tensorboard_dir = tensorboard_dir
        self._writer = None

    def log(self, step: int, record: dict, purge: bool = True) -> None:
        """Send `record` at `step`. The first record sent purges, in TensorBoard's view, what earlier event files hold
        at `step` and after (a resumed run trains those steps again); `purge=False` for figures added to a step that
        is already logged (stage 3's evaluation after its last step)."""
        if self.tensorboard_dir is None:
            return
        if self._writer is None:
            self._writer = _summary_writer(self.tensorboard_dir, purge_step=int(step) if purge else None)
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, global_step=int(step))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _summary_writer(folder: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UsageError(NO_TENSORBOARD) from exc
    folder.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


def open_loggers(run_cfg, name: str | None = None) -> Loggers:
    """The loggers `run_cfg.loggers` asks for, writing under the run folder `run_cfg.out_dir` (`name`: a sub-run, e.g. one
    stage-3 variant, in its own TensorBoard folder so that TensorBoard overlays the variants). Ranks > 0 of a
    torchrun job get loggers that write nothing."""
    wanted = "tensorboard" in run_cfg.loggers and distributed.env().is_main
    if wanted:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it; say so now, not at the first step)
        except ImportError as exc:
            raise UsageError(NO_TENSORBOARD) from exc
    folder = Path(run_cfg.out_dir) / TENSORBOARD_DIR
    if name:
        folder = folder / name.replace("/", "_")
    return Loggers(folder if wanted else None)
