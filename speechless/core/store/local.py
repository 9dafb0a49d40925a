"""The local store backend: versions in a folder, ROOT/<stage>/<vN>/{files/..., version.json} (see `base`)."""

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

from speechless.core.store.base import (
    STAGE_RE,
    VERSION_RE,
    _check_stage,
    collect_files,
    _copy_file_hashed,
    _copy_out,
    _listed_files,
    _now,
    parse_ref,
    _pick,
    tree_hash,
    _version_number,
    VersionInfo,
)
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
