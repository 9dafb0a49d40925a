"""Killed runs lose nothing: each long step runs as a real `python -m speechless` subprocess, is killed with SIGKILL at
a random (seeded) point inside the step, and the SAME command is run again. The resumed run must finish, never read a
half-written file, and (where the work is deterministic) write exactly the files of an uninterrupted run.

A step is one `KillStep` entry of `STEPS`: how to run it, which progress marker says it is under way, how long after
the marker the kill may land, and what a finished run must hold. Stage 3 becomes one more entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import stage1_overrides
from test_stage2 import overrides as stage2_overrides
from test_t2s import TEXTS

HERE = Path(__file__).resolve().parent
SPEECHLESS = [sys.executable, "-m", "speechless"]
FAKEHUB = [sys.executable, str(HERE / "fakehub_cli.py")]


# ------------------------------------------------------------------------------------------------------------ helpers

def digests(folder: Path, names: list[str] | None = None) -> dict[str, str]:
    """sha256 of the files under `folder` (all but work/ and hidden temp files, or just `names`)."""
    paths = [folder / n for n in names] if names else [
        p for p in sorted(folder.rglob("*"))
        if p.is_file() and "work" not in p.relative_to(folder).parts and not p.name.startswith(".")]
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def assert_nothing_half_written(folder: Path) -> None:
    """Every visible file under `folder` is complete: safetensors load, JSON and JSONL parse. Only hidden temp
    files (`.name.XXXX.tmp`, `.incoming-*`) may hold partial bytes, and no reader looks at hidden names."""
    from safetensors import safe_open

    for path in folder.rglob("*"):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl" and not path.name.endswith(".partial"):
            [json.loads(line) for line in path.read_text().split("\n") if line]


def subprocess_env() -> dict[str, str]:
    # Same thread count as the in-process reference runs: float reductions then add up in the same order.
    import torch

    return {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": str(torch.get_num_threads())}


def run_and_kill(argv: list[str], cwd: Path, env: dict, under_way: Callable[[], bool], delay_s: float,
                 timeout: float = 120) -> tuple[int, str]:
    """Start `argv`, poll `under_way()` every 5 ms, SIGKILL `delay_s` after it first holds. Returns (exit status,
    stderr); the status is -SIGKILL when the kill landed before the process ended."""
    with open(cwd / "killed.stderr", "w+") as err:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not under_way():
            assert time.monotonic() < deadline, "progress marker never appeared"
            time.sleep(0.005)
        time.sleep(delay_s)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        err.seek(0)
        return proc.returncode, err.read()


@dataclass(frozen=True)
class KillStep:
    """One long step to kill. Callables get `ctx`: {'tmp': Path, 'run': Path, fixture name: value, ...}."""

    command: Callable[[dict], list[str]]
    """The speechless arguments (after `launcher`)."""
    kills: tuple[tuple[Callable[[dict], bool], float], ...]
    """(progress marker, max delay): the command is started, the marker polled every 5 ms, and the process SIGKILLed
    uniform(0, max delay) seconds after it holds; then the same command again for the next kill point."""
    check: Callable[[dict], None]
    """After the resumed run: its outputs are valid (and identical to the reference where deterministic)."""
    fixtures: tuple[str, ...] = ()
    prepare: Callable[[dict], None] = lambda ctx: None
    after_kill: Callable[[dict], None] = lambda ctx: None
    """Checks on the killed state (e.g. no visible half version)."""
    launcher: Callable[[dict], list[str]] = lambda ctx: SPEECHLESS
    resume_in_process: bool = True
    """Resume with the same arguments in this process (no second import of torch; same thread count as the
    in-process reference runs). False: a subprocess (state that lives outside this process, like the fake Hub)."""
    env: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- stage 1

def stage1_command(ctx: dict) -> list[str]:
    args = ["stage1", "train"]
    for item in stage1_overrides(ctx["corpus"], ctx["encoder_json"], ctx["run"], ctx["tmp"] / "store"):
        args += ["--set", item]
    return args


def train_shards(ctx: dict) -> int:
    return len(list((ctx["run"] / "work" / "features" / "train").glob("shard-*.safetensors")))


def state_step(ctx: dict) -> int:
    try:
        return json.loads((ctx["run"] / "work" / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet (it is only ever replaced atomically)
        return -1


STAGE1_DETERMINISTIC = ["model.safetensors", "model.best.safetensors", "model.averaged.safetensors", "config.json",
                        "tokens/train.jsonl", "tokens/dev.jsonl", "tokens/test.jsonl"]


def same_as_reference(reference_fixture: str, names: list[str]) -> Callable[[dict], None]:
    def check(ctx: dict) -> None:
        assert digests(ctx["run"], names) == digests(ctx[reference_fixture], names)
    return check


def copy_train_features(ctx: dict) -> None:
    """Start from the reference run's feature cache, so the kill lands in training."""
    shutil.copytree(ctx["stage1_trained"] / "work" / "features", ctx["run"] / "work" / "features")


# ---------------------------------------------------------------------------------------------------------- stage 2

def stage2_command(ctx: dict) -> list[str]:
    args = ["stage2", "train"]
    for item in stage2_overrides(ctx["stage2_base"], ctx["run"], "train.threads=1"):
        args += ["--set", item]
    return args


STAGE2_DETERMINISTIC = ["model.safetensors", "model.best.safetensors", "config.json", "tokenizer.json",
                        "probe/model.safetensors", "tokens/generated_test.jsonl"]
GENERATE_TEXTS = [f"{a} {b}" for a in TEXTS for b in TEXTS][:16]


def generate_args(ctx: dict, output: Path) -> list[str]:
    return ["stage2", "generate", "-i", str(ctx["tmp"] / "texts.jsonl"), "-o", str(output), "--model", str(ctx["stage2_reference"]),
            "--batch-size", "1", "--max-seconds", "2", "--temperature", "0"]


def write_generate_texts(ctx: dict) -> None:
    (ctx["tmp"] / "texts.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(GENERATE_TEXTS)))


def partial_rows(ctx: dict) -> int:
    partial = ctx["run"] / "out.jsonl.partial"
    return partial.read_bytes().count(b"\n") if partial.exists() else 0


def generated_like_uninterrupted(ctx: dict) -> None:
    from speechless.cli import run

    reference = ctx["tmp"] / "reference.jsonl"
    assert run(generate_args(ctx, reference)) == 0
    assert (ctx["run"] / "out.jsonl").read_bytes() == reference.read_bytes()  # greedy: deterministic
    assert not (ctx["run"] / "out.jsonl.partial").exists()


# ----------------------------------------------------------------------------------------------------- store pushes

def make_checkpoint(folder: Path, files: int = 300, size: int = 8 << 10) -> None:
    """A checkpoint-like folder with many files: a push fsyncs each, so it lasts long enough to be killed."""
    import torch

    from speechless.core.io import save_tensors

    generator = torch.Generator().manual_seed(0)
    (folder / "shards").mkdir(parents=True)
    (folder / "config.json").write_text('{"kind": "kill-test"}\n')
    for i in range(files):
        save_tensors(folder / "shards" / f"part-{i:04d}.safetensors", {"w": torch.randint(0, 255, (size,), generator=generator, dtype=torch.uint8)})


def prepare_push(ctx: dict) -> None:
    make_checkpoint(ctx["tmp"] / "ckpt")


def local_push_command(ctx: dict) -> list[str]:
    return ["hub", "push", str(ctx["tmp"] / "ckpt"), "--stage", "stage1", "--store-root", str(ctx["tmp"] / "store")]


def local_push_started(ctx: dict) -> bool:
    return any((ctx["tmp"] / "store" / "stage1").glob(".incoming-*/files/shards/part-0000.safetensors"))


def only_complete_versions(ctx: dict) -> None:
    """A killed push is never a visible half version: nothing is listed, or (when the kill landed after the rename)
    a version whose every file matches its recorded sha256."""
    from speechless.core.store import LocalStore

    store = LocalStore(ctx["tmp"] / "store")
    for version in store.list("stage1"):
        assert digests(store.download(version.ref)) == digests(ctx["tmp"] / "ckpt")


def local_push_complete(ctx: dict) -> None:
    from speechless.core.store import LocalStore

    store = LocalStore(ctx["tmp"] / "store")
    assert [v.version for v in store.list("stage1")][0] == "v1"
    assert digests(store.download("stage1@latest")) == digests(ctx["tmp"] / "ckpt")  # sha256 of every file verified too
    assert not list((ctx["tmp"] / "store" / "stage1").glob(".incoming-*")), "temp folder of the killed push left behind"


HUB_ARGS = ["--backend", "hub", "--hub-namespace", "my-org"]


def hub_push_command(ctx: dict) -> list[str]:
    return ["hub", "push", str(ctx["tmp"] / "ckpt"), "--stage", "stage1", *HUB_ARGS]


def hub_requests(ctx: dict) -> int:
    log = ctx["tmp"] / "hub.json.requests"
    return log.read_text().count("\n") if log.exists() else 0


def hub_commits(ctx: dict) -> int:
    """Commits the fake Hub has acknowledged beyond the repo's initial one."""
    try:
        repos = json.loads((ctx["tmp"] / "hub.json").read_text())["repos"]  # replaced atomically by the server side
    except FileNotFoundError:
        return 0
    return sum(len(repo["commits"]) - 1 for repo in repos.values())


def hub_push_complete(ctx: dict) -> None:
    sys.path.insert(0, str(HERE))
    from fakehub_cli import load_state

    repo = load_state(ctx["tmp"] / "hub.json").repos["my-org/speechless-stage1"]
    assert list(repo["tags"]) == ["v1"]  # the commit of the push killed before its tag is left untagged: never a version
    files = repo["commits"][repo["tags"]["v1"]]["files"]
    expected = {p.relative_to(ctx["tmp"] / "ckpt").as_posix(): p.read_bytes() for p in (ctx["tmp"] / "ckpt").rglob("*") if p.is_file()}
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == expected


# -------------------------------------------------------------------------------------------------------- the table

# Stage 3 is one more entry: e.g. "stage3 train": KillStep(command=stage3_command, fixtures=(...,), kills=((lambda ctx:
# state_step(ctx) >= 0, 0.3),), check=same_as_reference("stage3_reference", [...weights and outputs...])).
STEPS: dict[str, KillStep] = {
    "stage1 train (feature extraction, then training)": KillStep(
        command=stage1_command, fixtures=("corpus", "encoder_json", "stage1_trained"),
        kills=((lambda ctx: train_shards(ctx) >= 1, 1.5), (lambda ctx: state_step(ctx) >= 0, 0.15)),
        check=same_as_reference("stage1_trained", STAGE1_DETERMINISTIC)),
    "stage2 train": KillStep(
        command=stage2_command, fixtures=("stage2_base", "stage2_reference"),
        kills=((lambda ctx: state_step(ctx) >= 0, 0.3),),
        check=same_as_reference("stage2_reference", STAGE2_DETERMINISTIC)),
    "stage2 generate": KillStep(
        command=lambda ctx: generate_args(ctx, ctx["run"] / "out.jsonl"), fixtures=("stage2_reference",),
        prepare=lambda ctx: (ctx["run"].mkdir(), write_generate_texts(ctx)),
        kills=((lambda ctx: partial_rows(ctx) >= 1, 0.3),), check=generated_like_uninterrupted),
    "local store push": KillStep(
        command=local_push_command, prepare=prepare_push, kills=((local_push_started, 0.1),),
        after_kill=only_complete_versions, check=local_push_complete),
    "hub push (mock transport)": KillStep(
        command=hub_push_command, prepare=prepare_push, kills=((lambda ctx: hub_requests(ctx) >= 1, 0.3),  # before the commit (the 5th request)
               (lambda ctx: hub_commits(ctx) >= 1, 0.05)),  # then between the commit and its tag
        launcher=lambda ctx: [*FAKEHUB, str(ctx["tmp"] / "hub.json")], resume_in_process=False,
        check=hub_push_complete, env={"FAKEHUB_DELAY_S": "0.15", "HF_TOKEN": "hf_killTestToken"}),
}


def kill_at(step: KillStep, ctx: dict, env: dict, marker, max_delay: float, rng: random.Random) -> None:
    """Run the command and SIGKILL it once `marker` holds; a loaded machine may finish first: then start over in a
    fresh folder with a shorter delay (3 tries)."""
    for _attempt in range(3):
        delay = rng.uniform(0, max_delay)
        status, stderr = run_and_kill([*step.launcher(ctx), *step.command(ctx)], ctx["tmp"], env, lambda: marker(ctx), delay)
        if status == -signal.SIGKILL:
            print(f"killed {delay:.3f} s after the marker: resume step {state_step(ctx)}, {train_shards(ctx)} train shards, "
                  f"{partial_rows(ctx)} generated rows, {hub_requests(ctx)} Hub requests answered, {hub_commits(ctx)} Hub commits")  # where it landed (-rP)
            return
        assert status == 0, stderr
        for name in os.listdir(ctx["tmp"]):
            path = ctx["tmp"] / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        step.prepare(ctx)
        max_delay /= 4
    raise AssertionError("the run finished before the kill landed, 3 times")


@pytest.mark.parametrize("name", list(STEPS))
def test_killed_step_resumes_and_completes(name, request, tmp_path):
    from speechless.cli import run

    step = STEPS[name]
    rng = random.Random(f"kill:{name}")  # seeded: the same kill points on every run of the suite
    ctx = {"tmp": tmp_path, "run": tmp_path / "run", **{f: request.getfixturevalue(f) for f in step.fixtures}}
    env = {**subprocess_env(), **step.env}
    step.prepare(ctx)
    for marker, max_delay in step.kills:
        kill_at(step, ctx, env, marker, max_delay, rng)
        for folder in (ctx["run"], tmp_path / "store"):
            if folder.exists():
                assert_nothing_half_written(folder)
        step.after_kill(ctx)
    if step.resume_in_process:
        assert run(step.command(ctx)) == 0
    else:
        resumed = subprocess.run([*step.launcher(ctx), *step.command(ctx)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
    if ctx["run"].exists():
        assert_nothing_half_written(ctx["run"])
    step.check(ctx)
