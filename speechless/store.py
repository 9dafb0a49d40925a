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

from speechless.config import Section
from speechless.errors import RuntimeFailure, SpeechlessError, UsageError
from speechless.io import read_json, sha256_file, write_json
from speechless.log import info, warn

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
# Local backend

META_NAME = "version.json"
FILES_DIR = "files"
INCOMING_RE = re.compile(r"\.incoming-(?P<host>.+)\.(?P<pid>\d+)\.[^.]+")
"""Temp folder of a push in progress: `.incoming-<host>.<pid>.<random>`, so a later push can tell an abandoned one."""
META_FORMAT = 1
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Exclusive lock across threads (a per-path mutex) and processes (flock on a lock file, where available)."""
    with _THREAD_LOCKS_GUARD:
        mutex = _THREAD_LOCKS.setdefault(str(lock_path), threading.Lock())
    with mutex:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): the failing rename onto an existing version is the guard
            yield
            return
        with open(lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class LocalStore:
    """Versions in a folder: ROOT/<stage>/<vN>/{files/..., version.json}."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()

    def describe(self) -> str:
        return f"local store {self.root}"

    # -- reading

    def _stage_dir(self, stage: str) -> Path:
        return self.root / _check_stage(stage)

    def _read_version(self, vdir: Path) -> VersionInfo | None:
        meta_path = vdir / META_NAME
        if not meta_path.is_file():
            return None
        meta = read_json(meta_path)
        if meta.get("version") != vdir.name or meta.get("stage") != vdir.parent.name:
            warn(f"{meta_path}: records {meta.get('stage')}@{meta.get('version')}, not {vdir.parent.name}@{vdir.name}; ignored (folder copied by hand?)")
            return None
        return VersionInfo(
            stage=meta["stage"],
            version=meta["version"],
            revision=meta["revision"],
            files=tuple(sorted(meta["files"])),
            created=meta.get("created", ""),
            location=str(vdir / FILES_DIR),
            message=meta.get("message", ""),
        )

    def _versions(self, stage: str) -> list[VersionInfo]:
        sdir = self._stage_dir(stage)
        if not sdir.is_dir():
            return []
        found = []
        for child in sdir.iterdir():
            if child.is_dir() and VERSION_RE.fullmatch(child.name):
                version = self._read_version(child)
                if version is not None:
                    found.append(version)
        return sorted(found, key=lambda v: _version_number(v.version))

    def stages(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and STAGE_RE.fullmatch(p.name))

    def list(self, stage: str | None = None) -> list[VersionInfo]:
        stages = [_check_stage(stage)] if stage is not None else self.stages()
        return [v for s in stages for v in self._versions(s)]

    def resolve(self, ref: str) -> VersionInfo:
        stage, version = parse_ref(ref)
        versions = self._versions(stage)
        if not versions:
            known = ", ".join(self.stages()) or "none"
            raise UsageError(
                f"{stage}: no versions in {self.describe()} (stages there: {known}); "
                f"push one with `speechless hub push FOLDER --stage {stage}` or pick another store (--store-root)"
            )
        return _pick(stage, version, versions, self.describe())

    def download(self, ref: str, to: str | os.PathLike | None = None) -> Path:
        """Verify every file of the version against its recorded sha256; return the store's read-only folder, or copy
        the files to `to` and return that."""
        version = self.resolve(ref)
        vdir = Path(version.location).parent
        meta = read_json(vdir / META_NAME)
        expected = {rel: entry["sha256"] for rel, entry in meta["files"].items()}
        files_dir = Path(version.location)
        if to is not None:
            return _copy_out(files_dir, sorted(expected), Path(to), expected, version.ref)
        present = _listed_files(files_dir)
        missing = sorted(set(expected) - present)
        if missing:
            raise RuntimeFailure(f"{files_dir / missing[0]}: missing from {version.ref} (store is damaged); re-push the version")
        extra = sorted(present - set(expected))
        if extra:
            raise RuntimeFailure(f"{files_dir / extra[0]}: not part of {version.ref} (store was modified); remove it")
        for rel in sorted(expected):
            if sha256_file(files_dir / rel) != expected[rel]:
                raise RuntimeFailure(f"{files_dir / rel}: sha256 mismatch in {version.ref} (stored file is corrupt); re-push the version")
        return files_dir

    # -- writing

    def push(self, stage: str, folder: str | os.PathLike, *, message: str = "") -> VersionInfo:
        stage = _check_stage(stage)
        folder = Path(folder)
        files = collect_files(folder)
        sdir = self._stage_dir(stage)
        try:
            sdir.mkdir(parents=True, exist_ok=True)
            _remove_abandoned_pushes(sdir)
            tmp = Path(tempfile.mkdtemp(prefix=f".incoming-{socket.gethostname()}.{os.getpid()}.", dir=sdir))
            os.chmod(tmp, 0o755)  # mkdtemp makes 0o700
        except OSError as exc:
            raise RuntimeFailure(f"{sdir}: cannot create folder ({exc.strerror or exc}); check permissions") from exc
        try:
            entries: dict[str, dict[str, Any]] = {}
            for rel in files:
                dst = tmp / FILES_DIR / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                digest, size = _copy_file_hashed(folder / rel, dst)
                os.chmod(dst, 0o444)
                entries[rel] = {"sha256": digest, "size": size}
            revision = tree_hash({rel: e["sha256"] for rel, e in entries.items()})
            created = _now()
            with _exclusive(sdir / ".lock"):
                number = max((_version_number(p.name) for p in sdir.iterdir() if p.is_dir()), default=0) + 1
                while True:
                    version = f"v{number}"
                    write_json(tmp / META_NAME, {
                        "format": META_FORMAT,
                        "stage": stage,
                        "version": version,
                        "revision": revision,
                        "created": created,
                        "message": message,
                        "files": entries,
                    })
                    os.chmod(tmp / META_NAME, 0o444)
                    try:
                        os.rename(tmp, sdir / version)  # fails if the version folder exists: never overwrites
                        break
                    except OSError:
                        if not (sdir / version).exists():
                            raise
                        os.chmod(tmp / META_NAME, 0o644)
                        number += 1
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeFailure(f"{sdir}: push failed ({exc.strerror or exc}); free disk space or fix permissions, then re-run") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        result = self._read_version(sdir / version)
        assert result is not None
        return result


def _remove_abandoned_pushes(sdir: Path) -> None:
    """Delete temp folders of pushes whose process died on this host (a killed push leaves its copy behind)."""
    host = socket.gethostname()
    for tmp in sdir.glob(".incoming-*"):
        match = INCOMING_RE.fullmatch(tmp.name)
        if match is None or match["host"] != host:
            continue  # another host's push may still be running
        try:
            os.kill(int(match["pid"]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass  # the process exists (owned by someone else)


# --------------------------------------------------------------------------------------------------------------------
# Hub backend

T = TypeVar("T")


def _hub_error(exc: BaseException, repo: str, action: str) -> SpeechlessError | None:
    """One clear line for a huggingface_hub failure, or None when `exc` is not a Hub/HTTP failure."""
    from huggingface_hub import errors as hf_errors

    retry = "local state intact, retry the push" if action == "push" else "retry"
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return RuntimeFailure(f"{repo}: cannot {action} while offline (HF_HUB_OFFLINE is set); unset it, or use the local store")
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):
        return UsageError(f"{repo}: version not in the local Hub cache and the Hub is not reachable; download it once online")
    if isinstance(exc, hf_errors.HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if status in (401, 403):
            return UsageError(f"{repo}: Hub refused access (HTTP {status}); set HF_TOKEN / huggingface-cli login, check write access to {repo}")
        if status == 404 or isinstance(exc, (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError)):
            return UsageError(f"{repo}: repo/version not found on the Hub (HTTP 404); check --hub-namespace and the ref, and that your token can read {repo}")
        if status == 429 or (status is not None and status >= 500):
            return RuntimeFailure(f"{repo}: Hub unavailable (HTTP {status}) during {action}; {retry}")
        return RuntimeFailure(f"{repo}: Hub request failed (HTTP {status}) during {action}; {retry}")
    # Transport failures (timeouts, connection errors) come from the HTTP stack huggingface_hub uses; its base class is
    # re-exported by huggingface_hub.errors, which saves importing the HTTP library here.
    transport_base = getattr(hf_errors, "HTTPError", None)
    if (transport_base is not None and isinstance(exc, transport_base)) or isinstance(exc, (TimeoutError, ConnectionError)):
        kind = "timeout" if "timeout" in type(exc).__name__.lower() else type(exc).__name__
        return RuntimeFailure(f"{repo}: Hub unavailable ({kind}) during {action}; {retry}")
    return None


class HubStore:
    """Versions as tagged commits of one Hub model repo per stage."""

    def __init__(self, cfg: StoreConfig):
        if not cfg.hub_namespace:
            raise UsageError(
                "store backend 'hub' needs a namespace: set store.hub_namespace in the config, --hub-namespace, "
                f"or {ENV_NAMESPACE} (your user or organisation on the Hub)"
            )
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", cfg.hub_namespace):
            raise UsageError(f"hub_namespace {cfg.hub_namespace!r}: not a valid Hub user or organisation name")
        self.cfg = cfg
        from huggingface_hub import HfApi

        self.api = HfApi()  # token: HF_TOKEN or huggingface_hub's login, resolved per request by huggingface_hub

    def describe(self) -> str:
        return f"Hub namespace {self.cfg.hub_namespace}"

    def repo_id(self, stage: str) -> str:
        return f"{self.cfg.hub_namespace}/{self.cfg.repo_prefix}-{_check_stage(stage)}"

    def _call(self, repo: str, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except SpeechlessError:
            raise
        except ValueError as exc:  # huggingface_hub's own check of the model card's YAML header (/api/validate-yaml)
            if "README.md" not in str(exc):
                raise
            detail = " ".join(str(exc).split("\n", 1)[-1].split())[:200]
            raise UsageError(f"{repo}: the Hub rejected the metadata of README.md ({detail}); fix its YAML header, then push again") from None
        except Exception as exc:
            mapped = _hub_error(exc, repo, action)
            if mapped is None:
                raise
            raise mapped from None  # the chained exception may carry request details; the line says it all

    @staticmethod
    def _offline() -> bool:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())

    # -- reading

    def _tags(self, repo: str, action: str) -> tuple[dict[str, str], str | None]:
        """({'v1': sha, ...}, sha of main or None) from the repo's refs; {} when the repo does not exist yet."""
        from huggingface_hub import errors as hf_errors

        def fetch():
            try:
                return self.api.list_repo_refs(repo)
            except hf_errors.RepositoryNotFoundError:
                return None

        refs = self._call(repo, action, fetch)
        if refs is None:
            return {}, None
        tags = {t.name: t.target_commit for t in refs.tags if VERSION_RE.fullmatch(t.name)}
        main = next((b.target_commit for b in refs.branches if b.name == "main"), None)
        return tags, main

    def _cache_folder(self, repo: str) -> Path:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")

    def _cached_versions(self, stage: str) -> list[VersionInfo]:
        """Versions known from the local huggingface_hub cache (refs/vN files): what offline mode can serve."""
        repo = self.repo_id(stage)
        cache = self._cache_folder(repo)
        refs = cache / "refs"
        found = []
        if refs.is_dir():
            for ref in refs.iterdir():
                if ref.is_file() and VERSION_RE.fullmatch(ref.name):
                    sha = ref.read_text(encoding="utf-8").strip()
                    snap = cache / "snapshots" / sha
                    files = tuple(sorted(_listed_files(snap))) if snap.is_dir() else ()
                    found.append(VersionInfo(stage, ref.name, sha, files, "", repo, ""))
        return sorted(found, key=lambda v: _version_number(v.version))

    def _commit_meta(self, repo: str, revision: str) -> dict[str, tuple[str, str]]:
        """{commit sha: (ISO date, title)} for the history up to `revision` (one paginated listing)."""
        commits = self._call(repo, "read commits of", lambda: list(self.api.list_repo_commits(repo, revision=revision)))
        return {c.commit_id: (c.created_at.isoformat(), c.title) for c in commits}

    def list(self, stage: str | None = None) -> list[VersionInfo]:
        if stage is None:
            stages = self._stages()
        else:
            stages = [_check_stage(stage)]
        out: list[VersionInfo] = []
        for s in stages:
            if self._offline():
                out.extend(self._cached_versions(s))
                continue
            repo = self.repo_id(s)
            tags, main = self._tags(repo, "list")
            meta = self._commit_meta(repo, main) if (tags and main) else {}
            for name, sha in sorted(tags.items(), key=lambda kv: _version_number(kv[0])):
                created, title = meta.get(sha, ("", ""))
                out.append(VersionInfo(s, name, sha, (), created, repo, title))
        return out

    def _stages(self) -> list[str]:
        prefix = f"{self.cfg.repo_prefix}-"
        if self._offline():
            from huggingface_hub import constants

            cache = Path(constants.HF_HUB_CACHE)
            start = f"models--{self.cfg.hub_namespace}--{prefix}"
            names = [p.name[len(start):] for p in cache.glob(f"{start}*")] if cache.is_dir() else []
        else:
            ns = self.cfg.hub_namespace
            models = self._call(f"{ns}/{prefix}*", "list", lambda: list(self.api.list_models(author=ns, search=prefix)))
            names = [m.id.split("/", 1)[1][len(prefix):] for m in models if m.id.split("/", 1)[-1].startswith(prefix)]
        return sorted(n for n in set(names) if STAGE_RE.fullmatch(n))

    def resolve(self, ref: str) -> VersionInfo:
        stage, version = parse_ref(ref)
        repo = self.repo_id(stage)
        if self._offline():
            return self._resolve_cached(stage, version, repo)
        tags, main = self._tags(repo, "resolve")
        if version is not None and not VERSION_RE.fullmatch(version) and len(version) == 40 and version not in tags.values():
            sha, name = version, version[:12]  # a commit pinned by its full sha that carries no version tag
        else:
            versions = [VersionInfo(stage, n, s, (), "", repo, "") for n, s in tags.items()]
            picked = _pick(stage, version, versions, repo)
            sha, name = picked.revision, picked.version
        files = self._call(repo, "list files of", lambda: self.api.list_repo_files(repo, revision=sha))
        files = tuple(sorted(f for f in files if not any(part.startswith(".") for part in PurePosixPath(f).parts)))
        commits = self._call(repo, "read commits of", lambda: list(self.api.list_repo_commits(repo, revision=sha)))
        created, title = (commits[0].created_at.isoformat(), commits[0].title) if commits else ("", "")
        return VersionInfo(stage, name, sha, files, created, repo, title)

    def _resolve_cached(self, stage: str, version: str | None, repo: str) -> VersionInfo:
        versions = self._cached_versions(stage)
        if version is not None and not VERSION_RE.fullmatch(version):
            snaps = self._cache_folder(repo) / "snapshots"
            shas = [p.name for p in snaps.iterdir() if p.name.startswith(version)] if snaps.is_dir() else []
            if len(shas) == 1:
                tagged = [v for v in versions if v.revision == shas[0]]
                if tagged:
                    return tagged[0]
                files = tuple(sorted(_listed_files(snaps / shas[0])))
                return VersionInfo(stage, shas[0][:12], shas[0], files, "", repo, "")
        return _pick(stage, version, versions, f"the local Hub cache for {repo} (offline: HF_HUB_OFFLINE is set)")

    def download(self, ref: str, to: str | os.PathLike | None = None) -> Path:
        """snapshot_download of the version's commit (by sha) into the huggingface_hub cache; with `to`, copy the
        version's files there. Returns the folder."""
        version = self.resolve(ref)
        repo = version.location
        from huggingface_hub import snapshot_download

        patterns = [_glob_escape(f) for f in version.files] or None
        snapshot = self._call(repo, "download", lambda: snapshot_download(repo, revision=version.revision, allow_patterns=patterns))
        snapshot = Path(snapshot)
        files = sorted(version.files) if version.files else sorted(_listed_files(snapshot))
        unsafe = [f for f in files if f.lower().endswith(FORBIDDEN_SUFFIXES)]
        if unsafe:
            raise UsageError(f"{repo}@{version.version}: holds pickles or code ({', '.join(unsafe[:3])}); speechless never loads "
                             "them, refusing the version: push one with safetensors + JSON only")
        missing = [f for f in files if not (snapshot / f).is_file()]
        if missing:
            raise RuntimeFailure(f"{snapshot / missing[0]}: missing from the downloaded {version.ref}; re-run the download")
        if to is None:
            return snapshot
        return _copy_out(snapshot, files, Path(to), None, f"{version.ref} ({repo})")

    # -- writing

    def push(self, stage: str, folder: str | os.PathLike, *, message: str = "") -> VersionInfo:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub import errors as hf_errors

        stage = _check_stage(stage)
        folder = Path(folder)
        files = collect_files(folder)
        if self._offline():
            raise RuntimeFailure(f"{self.repo_id(stage)}: cannot push while offline (HF_HUB_OFFLINE is set); unset it, or use the local store")
        repo = self.repo_id(stage)
        self._call(repo, "push", lambda: self.api.create_repo(repo, private=self.cfg.private, exist_ok=True))
        tags, main = self._tags(repo, "push")
        stale: list[str] = []
        if main is not None:
            previous = self._call(repo, "push", lambda: self.api.list_repo_files(repo, revision=main))
            keep = set(files)
            stale = sorted(f for f in previous if f not in keep and not f.startswith("."))
        operations: list[Any] = [CommitOperationDelete(path_in_repo=f) for f in stale]
        operations += [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
        summary = message.strip().splitlines()[0][:200] if message.strip() else f"speechless push {stage}"
        info(f"pushing {len(files)} file(s) to {repo} as one commit")
        commit = self._call(repo, "push", lambda: self.api.create_commit(
            repo, operations, commit_message=summary, commit_description=message, parent_commit=main,
        ))
        sha = commit.oid
        for _attempt in range(5):
            number = max((_version_number(t) for t in tags), default=0) + 1
            tag = f"v{number}"

            def make_tag(tag: str = tag) -> bool:
                try:
                    self.api.create_tag(repo, tag=tag, revision=sha)
                    return True
                except hf_errors.HfHubHTTPError as exc:
                    if getattr(exc.response, "status_code", None) == 409:
                        return False
                    raise

            if self._call(repo, "push", make_tag):
                return VersionInfo(stage, tag, sha, tuple(files), _now(), repo, summary)
            tags, _ = self._tags(repo, "push")  # another push took that number: take the next one
        raise RuntimeFailure(f"{repo}: commit {sha} pushed but could not claim a version tag (concurrent pushes); tag it by hand")


def _glob_escape(path: str) -> str:
    """Escape fnmatch metacharacters so an allow pattern matches exactly one path."""
    return re.sub(r"([*?\[])", r"[\1]", path)


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
    from speechless.config import validate

    return validate(StoreConfig, data, "store settings")


def open_store(cfg: StoreConfig | None = None, **overrides: Any) -> Store:
    """Open the store described by `cfg` (see `store_config` for how options, config and environment combine)."""
    cfg = store_config(cfg, **overrides)
    if cfg.backend == "hub":
        return HubStore(cfg)
    return LocalStore(cfg.root)
