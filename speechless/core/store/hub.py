"""The Hub store backend: versions as tagged commits of one Hugging Face model repo per stage (see `base`)."""

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
    ENV_NAMESPACE,
    FORBIDDEN_SUFFIXES,
    STAGE_RE,
    VERSION_RE,
    _check_stage,
    collect_files,
    _copy_out,
    _listed_files,
    _now,
    parse_ref,
    _pick,
    StoreConfig,
    _version_number,
    VersionInfo,
)
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
