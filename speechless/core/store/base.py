"""The versioned checkpoint store ("the Hub"): immutable numbered versions per stage, two backends, one interface.

A *version* is the set of files of a checkpoint folder, pushed once and never modified: `stage1@v1`, `stage1@v2`, ...
A *store ref* names one: `STAGE@vN`, `STAGE@latest`, `STAGE` (= latest) or `STAGE@<revision>` (a hex prefix of at
least 7 characters of the local tree hash or the Hub commit sha).

Backends (selected by `StoreConfig.backend`):

- `local` (default): a folder `ROOT/<stage>/<vN>/` holding `files/` (exactly the version's files, read-only) and
  `version.json` (stage, version, revision, created, message, and the sha256 and size of every file). A push copies
  into a hidden temp folder beside the versions, then claims the next number with an atomic rename under an exclusive
  lock: an interrupted push never leaves a visible half version, and two pushes never get the same number.
  The revision is a sha256 tree hash (see `tree_hash`).
- `hub`: one Hugging Face model repo per stage, `<hub_namespace>/<repo_prefix>-<stage>`. A push is one atomic commit
  holding all files of the version (files of the previous version that are not in this one are deleted in the same
  commit, so a commit's tree is exactly one version), then a tag `vN` on that commit. Versions resolve tag -> commit
  sha and the sha is what is recorded (tags can be moved). Downloads go through the huggingface_hub cache, so
  `HF_HUB_OFFLINE=1` serves versions already downloaded (refs `vN` in the cache).

The HF token is read by huggingface_hub from the environment (`HF_TOKEN`) or its own login; it is never taken from
the config and never logged, written, or put in an error message.

Which store is used (same rule for every command, see `store_config`): a command-line option, else the config file's
`store:` section when it sets the key, else the environment (`SPEECHLESS_STORE` for the root,
`SPEECHLESS_STORE_BACKEND`, `SPEECHLESS_HUB_NAMESPACE`), else the defaults below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol, TypeVar

from speechless.core.config import Section
from speechless.core.errors import RuntimeFailure, SpeechlessError, UsageError
from speechless.core.io import read_json, sha256_file, write_json
from speechless.core.log import info, warn

ENV_ROOT = "SPEECHLESS_STORE"
ENV_BACKEND = "SPEECHLESS_STORE_BACKEND"
ENV_NAMESPACE = "SPEECHLESS_HUB_NAMESPACE"

STAGE_RE = re.compile(r"[a-z0-9_-]+")
VERSION_RE = re.compile(r"v([1-9][0-9]*)")
REVISION_RE = re.compile(r"[0-9a-f]{7,64}")
REF_FORM = "STAGE@vN, STAGE@latest, STAGE or STAGE@<revision> (stage names: lowercase letters, digits, _ and -)"

#: Files never allowed in a version: pickles and code. Checkpoints are safetensors + JSON/YAML/MD/JSONL.
FORBIDDEN_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".py", ".pyc")
#: Top-level subfolder of a checkpoint folder that is not part of a version (resume state, caches).
WORK_DIR = "work"


class StoreConfig(Section):
    """Where versioned checkpoints are pushed to and pulled from."""

    backend: Literal["local", "hub"] = "local"
    """Store backend: 'local' (a folder, see root) or 'hub' (Hugging Face Hub repos, see hub_namespace). When the
    config does not set it, the SPEECHLESS_STORE_BACKEND environment variable is used, else 'local'."""

    root: str = "store"
    """Local store folder (relative paths are relative to the current directory). When the config does not set it,
    the SPEECHLESS_STORE environment variable is used, else 'store'."""

    hub_namespace: str | None = None
    """User or organisation owning the Hub repos (backend 'hub'). When the config does not set it, the
    SPEECHLESS_HUB_NAMESPACE environment variable is used. The HF token comes from HF_TOKEN or `hf auth login`, never
    from the config."""

    repo_prefix: str = "speechless"
    """Hub repo name prefix: a stage's repo is '<hub_namespace>/<repo_prefix>-<stage>', e.g. my-org/speechless-stage1."""

    private: bool = True
    """Create new Hub repos as private."""


@dataclass(frozen=True)
class VersionInfo:
    """One immutable version of a stage's checkpoint."""

    stage: str
    version: str
    """'v1', 'v2', ... (for a Hub commit pinned by sha that carries no version tag: the short sha)."""
    revision: str
    """local: sha256 tree hash of the files; hub: the commit sha."""
    files: tuple[str, ...]
    """Relative POSIX paths, sorted. Empty in Hub listings (use `resolve` for the files)."""
    created: str
    """ISO 8601 time of the push ('' when unknown, e.g. offline from the Hub cache)."""
    location: str
    """local: the folder holding the files; hub: the repo id."""
    message: str

    @property
    def ref(self) -> str:
        return f"{self.stage}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["files"] = list(self.files)
        data["ref"] = self.ref
        return data


# --------------------------------------------------------------------------------------------------------------------
# Refs


def _check_stage(stage: str, where: str = "stage") -> str:
    if not isinstance(stage, str) or not STAGE_RE.fullmatch(stage):
        raise UsageError(f"{where} {stage!r}: stage names use lowercase letters, digits, '_' and '-' (e.g. stage1)")
    return stage


def parse_ref(text: str) -> tuple[str, str | None]:
    """Split a store ref into (stage, version): `stage1@v2` -> ('stage1', 'v2'); `stage1@latest` and `stage1` ->
    ('stage1', None); `stage1@3f2a9c1` -> ('stage1', '3f2a9c1') (a revision prefix). Anything else is a UsageError."""
    text = str(text).strip()
    stage, sep, version = text.partition("@")
    if not STAGE_RE.fullmatch(stage) or (sep and not version):
        raise UsageError(f"store ref {text!r}: expected {REF_FORM}, e.g. stage1@v2")
    if not sep or version == "latest":
        return stage, None
    if VERSION_RE.fullmatch(version) or REVISION_RE.fullmatch(version):
        return stage, version
    raise UsageError(f"store ref {text!r}: bad version {version!r}; expected {REF_FORM}, e.g. stage1@v2")


def is_store_ref(text: str) -> bool:
    """True for `name@vN`, `name@latest` (and `name@<revision>`). A plain name or path is not a ref: callers treat an
    existing folder as a local folder and anything `@`-shaped as a store ref."""
    text = str(text)
    if "@" not in text or "/" in text or os.sep in text:
        return False
    try:
        parse_ref(text)
    except UsageError:
        return False
    return True


def _version_number(version: str) -> int:
    match = VERSION_RE.fullmatch(version)
    return int(match.group(1)) if match else 0


# --------------------------------------------------------------------------------------------------------------------
# Files of a version


def collect_files(folder: str | os.PathLike) -> list[str]:
    """The relative POSIX paths a push takes from `folder`: everything except hidden files/folders and the top-level
    `work/` folder. Refuses pickles and code (UsageError) and an empty selection."""
    folder = Path(folder)
    if not folder.exists():
        raise UsageError(f"{folder}: folder not found")
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder; push a checkpoint folder")
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = Path(dirpath).relative_to(folder)
        keep = []
        for name in sorted(dirnames):
            if name.startswith(".") or (rel_dir == Path(".") and name == WORK_DIR):
                continue
            if (Path(dirpath) / name).is_symlink():
                warn(f"{Path(dirpath) / name}: symlinked folder not pushed")
                continue
            keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if not path.is_file():
                warn(f"{path}: not a regular file, not pushed")
                continue
            files.append((rel_dir / name).as_posix())
    bad = [f for f in files if f.lower().endswith(FORBIDDEN_SUFFIXES)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UsageError(
            f"{folder}: refusing to push pickles or code ({shown}); checkpoints are safetensors + JSON/YAML/MD/JSONL "
            "only: convert weights with safetensors and remove the other files"
        )
    if not files:
        raise UsageError(f"{folder}: nothing to push (no files outside hidden files and {WORK_DIR}/)")
    return sorted(files)


def tree_hash(file_hashes: dict[str, str]) -> str:
    """sha256 over the sorted lines '<file sha256> <relative path>\\n': the revision of a local version."""
    digest = hashlib.sha256()
    for rel in sorted(file_hashes):
        digest.update(f"{file_hashes[rel]} {rel}\n".encode())
    return digest.hexdigest()


def _copy_file_hashed(src: Path, dst: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """Copy src to dst (dst's folder must exist), return (sha256 of the bytes written, size)."""
    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(chunk):
            digest.update(block)
            fout.write(block)
            size += len(block)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest(), size


def _listed_files(folder: Path) -> set[str]:
    """Non-hidden files under `folder` (relative POSIX paths), following file symlinks (Hub cache snapshots)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(folder)
        for name in filenames:
            if not name.startswith("."):
                found.add((rel_dir / name).as_posix())
    return found


def _copy_out(src_root: Path, files: list[str] | tuple[str, ...], to: Path, expected: dict[str, str] | None, what: str) -> Path:
    """Copy `files` from src_root into the folder `to` (atomically: a temp folder renamed into place), checking sha256
    against `expected` when given. `to` must be new or empty, or already hold exactly these files (then kept)."""
    to = Path(to).expanduser().absolute()
    escaping = [f for f in files if PurePosixPath(f).is_absolute() or ".." in PurePosixPath(f).parts]
    if escaping:
        raise UsageError(f"{what}: file path {escaping[0]!r} points outside the version's folder; refusing to download")
    if to.exists() and not to.is_dir():
        raise UsageError(f"--to {to}: exists and is not a folder; pick a new or empty folder")
    if to.is_dir() and any(to.iterdir()):
        if _listed_files(to) == set(files) and not any(p.name.startswith(".") for p in to.iterdir()):
            if all(expected is None or sha256_file(to / f) == expected[f] for f in files):
                info(f"{to} already holds {what}")
                return to
        raise UsageError(f"--to {to}: folder is not empty; pick a new or empty folder (nothing was changed)")
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{to.name}.", suffix=".tmp", dir=to.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0o700
    except OSError as exc:
        raise RuntimeFailure(f"{to}: cannot create folder ({exc.strerror or exc}); check permissions") from exc
    try:
        for rel in files:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            digest, _ = _copy_file_hashed(src_root / rel, dst)
            if expected is not None and digest != expected[rel]:
                raise RuntimeFailure(
                    f"{src_root / rel}: sha256 mismatch in {what} (stored file is corrupt); nothing was written to {to}"
                )
        if to.is_dir():
            to.rmdir()  # empty (checked above)
        os.replace(tmp, to)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeFailure(f"{to}: copy failed ({exc.strerror or exc}); free disk space or fix permissions") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return to


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------------------------
# Interface


class Store(Protocol):
    """What every backend offers. Versions are immutable; refs are parsed by `parse_ref`."""

    def push(self, stage: str, folder: str | os.PathLike, *, message: str = "") -> VersionInfo: ...

    def list(self, stage: str | None = None) -> list[VersionInfo]: ...

    def resolve(self, ref: str) -> VersionInfo: ...

    def download(self, ref: str, to: str | os.PathLike | None = None) -> Path: ...

    def describe(self) -> str: ...


def _pick(stage: str, version: str | None, versions: list[VersionInfo], where: str) -> VersionInfo:
    """Select the version `version` (None = latest, 'vN', or a revision prefix) among `versions` of `stage`."""
    if not versions:
        raise UsageError(f"{stage}: no versions in {where}; push one with `speechless hub push FOLDER --stage {stage}`")
    available = ", ".join(v.version for v in versions)
    if version is None:
        return max(versions, key=lambda v: _version_number(v.version))
    if VERSION_RE.fullmatch(version):
        for v in versions:
            if v.version == version:
                return v
        raise UsageError(f"{stage}@{version}: no such version in {where}; available: {available}")
    matches = [v for v in versions if v.revision.startswith(version)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1 and len({m.revision for m in matches}) == 1:
        return max(matches, key=lambda v: _version_number(v.version))  # same content pushed more than once
    if len(matches) > 1:
        raise UsageError(f"{stage}@{version}: revision prefix is ambiguous ({', '.join(m.version for m in matches)}); give more characters")
    raise UsageError(f"{stage}@{version}: no version with that revision in {where}; available: {available}")


# --------------------------------------------------------------------------------------------------------------------
# Opening a store


def store_config(
    cfg: StoreConfig | None = None,
    *,
    root: str | os.PathLike | None = None,
    backend: str | None = None,
    hub_namespace: str | None = None,
) -> StoreConfig:
    """The effective store config. Precedence per key: explicit argument (command-line option) > value set in the
    config file (`cfg`, only keys it actually sets) > environment (SPEECHLESS_STORE, SPEECHLESS_STORE_BACKEND,
    SPEECHLESS_HUB_NAMESPACE) > StoreConfig defaults. Every command that takes a store ref goes through this."""
    cfg = cfg if cfg is not None else StoreConfig()
    data = cfg.model_dump()
    explicit = cfg.model_fields_set
    for key, env in (("root", ENV_ROOT), ("backend", ENV_BACKEND), ("hub_namespace", ENV_NAMESPACE)):
        if key not in explicit and os.environ.get(env):
            data[key] = os.environ[env]
    for key, value in (("root", root), ("backend", backend), ("hub_namespace", hub_namespace)):
        if value is not None:
            data[key] = str(value)
    from speechless.core.config import validate

    return validate(StoreConfig, data, "store settings")


def open_store(cfg: StoreConfig | None = None, **overrides: Any) -> Store:
    """Open the store described by `cfg` (see `store_config` for how options, config and environment combine)."""
    cfg = store_config(cfg, **overrides)
    if cfg.backend == "hub":
        from speechless.core.store.hub import HubStore

        return HubStore(cfg)
    from speechless.core.store.local import LocalStore

    return LocalStore(cfg.root)
