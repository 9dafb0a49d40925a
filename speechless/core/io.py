"""Atomic file writes and checked reads: nothing half-written is ever visible under its final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from speechless.core.errors import RuntimeFailure, UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
"""Mode of written files: what the process's umask gives a new file (read once, at import)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it into place, on failure remove it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeFailure(f"{path.parent}: cannot create folder ({exc.strerror}); check permissions") from exc
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise RuntimeFailure(f"{path}: cannot write ({exc.strerror or exc}); free disk space or fix permissions, then re-run") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, FILE_MODE)  # mkstemp makes 0o600: the final file gets the mode a plain open() would give it
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RuntimeFailure(f"{path}: write failed ({exc.strerror or exc}); free disk space or fix permissions, then re-run") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: file not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RuntimeFailure(f"{path}: not valid JSON ({exc}); the file is corrupt, re-create it") from exc


def read_jsonl(path: str | os.PathLike, what: str = "JSONL file", fix: str = "") -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line. Lines end at "\n" only (str.splitlines() would also cut inside a
    text holding U+2028 or U+0085). A missing file, non-UTF-8 bytes, bad JSON or a non-object line is a UsageError
    naming the file and line; `fix` (e.g. "; re-create it") is appended to the unreadable-content messages."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise UsageError(f"{path}: {what} not found") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}){fix}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number}: not valid JSON ({exc.msg}){fix}") from exc
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save a safetensors file atomically and byte-reproducibly (same tensors + metadata -> same bytes).

    safetensors serialises metadata from a Rust HashMap whose order changes between processes, so the header is
    rebuilt here with sorted keys: weight files can then be identified by their sha256.
    """
    from safetensors.torch import save  # torch is imported lazily: commands that only write JSON start fast

    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    blob = save(cpu)
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_len])
    if metadata:
        header = {"__metadata__": dict(sorted(metadata.items())), **header}
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little"))
            handle.write(encoded)
            handle.write(memoryview(blob)[8 + header_len:])


def load_tensors(path: str | os.PathLike) -> dict:
    """Load a safetensors file; a missing or corrupt file is a clear error, never a pickle fallback."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RuntimeFailure(f"{path}: corrupt safetensors file ({exc}); delete it and re-run the step that wrote it") from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place, replacing an older one (rename is atomic per folder)."""
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_dir, final_dir)
