"""JSONL speech manifests (NeMo style): one utterance per line.

Each line is a JSON object with the fields in `MANIFEST_FIELDS`; any further keys (e.g. `translation` in synthetic
corpora) are kept in `ManifestEntry.extra` and written back unchanged. `audio_filepath` may be absolute or relative to
the manifest's folder; readers always get an absolute path.

- `read_manifest` is for consumers: it stops at the FIRST bad line with "{path}:{line}: field 'x': ..." (UsageError).
- `validate_manifest` is for `speechless data validate`: it returns EVERY problem.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speechless.core.errors import UsageError
from speechless.core.io import sha256_file, write_text

MANIFEST_FIELDS = ("id", "audio_filepath", "duration", "text", "language", "speaker_id", "split", "source")
REQUIRED_FIELDS = ("id", "audio_filepath", "duration", "text", "split")
OPTIONAL_FIELDS = ("language", "speaker_id", "source")

SPLIT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
"""A split names files and folders (tokens/<split>.jsonl, work/features/<split>/): no separators, no leading dot."""

DURATION_TOLERANCE_S = 0.1
"""`validate_manifest(check_audio=True)` flags entries whose decoded length differs from `duration` by more."""


@dataclass(frozen=True)
class ManifestEntry:
    """One utterance. `audio_filepath` is absolute after `read_manifest`; `line` is its 1-based manifest line."""

    id: str
    audio_filepath: Path
    duration: float
    text: str
    split: str
    language: str = ""
    speaker_id: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, hash=False)
    """Keys beyond MANIFEST_FIELDS (e.g. 'translation'), kept as read."""
    line: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.audio_filepath, Path):
            object.__setattr__(self, "audio_filepath", Path(self.audio_filepath))

    def to_row(self, base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
        """The JSON object for this entry; the audio path is made relative to `base_dir` when it lies under it."""
        audio = self.audio_filepath
        if base_dir is not None and audio.is_absolute():
            base = Path(os.path.abspath(base_dir))
            try:
                audio = Path(os.path.abspath(audio)).relative_to(base)
            except ValueError:
                pass
        row: dict[str, Any] = {
            "id": self.id,
            "audio_filepath": audio.as_posix(),
            "duration": float(self.duration),
            "text": self.text,
            "language": self.language,
            "speaker_id": self.speaker_id,
            "split": self.split,
            "source": self.source,
        }
        for key, value in self.extra.items():
            if key not in row:
                row[key] = value
        return row


@dataclass(frozen=True)
class Problem:
    """One manifest problem: 1-based line (0 = the file as a whole), the field at fault (None = the whole line)."""

    line: int
    field: str | None
    message: str

    def format(self, path: str | os.PathLike) -> str:
        where = f"{path}:{self.line}" if self.line else f"{path}"
        return f"{where}: field '{self.field}': {self.message}" if self.field else f"{where}: {self.message}"

    def __str__(self) -> str:
        return self.format("manifest")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _iter_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) for each non-blank line; text None when the line is not UTF-8."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: manifest not found; check the path") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"{path}: is a folder; pass a JSONL manifest file") from exc
    with handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None
                continue
            if text.strip():
                yield number, text


def _parse_line(text: str | None, number: int, base_dir: Path) -> tuple[ManifestEntry | None, list[Problem]]:
    """Parse and check one line (everything except cross-line checks and file existence)."""
    if text is None:
        return None, [Problem(number, None, "not valid UTF-8 text; re-save the manifest as UTF-8")]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [Problem(number, None, f"not valid JSON ({exc.msg} at column {exc.colno}); expected one JSON object per line")]
    if not isinstance(obj, dict):
        return None, [Problem(number, None, f"expected a JSON object, got {type(obj).__name__}")]
    problems: list[Problem] = []
    for name in REQUIRED_FIELDS:
        if name not in obj:
            problems.append(Problem(number, name, "missing required field"))

    def check_string(name: str, *, allow_empty: bool) -> None:
        if name not in obj:
            return
        value = obj[name]
        if not isinstance(value, str):
            problems.append(Problem(number, name, f"expected a string, got {_short(value)}"))
        elif not allow_empty and not value.strip():
            problems.append(Problem(number, name, "expected a non-empty string, got ''"))

    check_string("id", allow_empty=False)
    check_string("audio_filepath", allow_empty=False)
    check_string("text", allow_empty=True)
    check_string("split", allow_empty=False)
    if isinstance(obj.get("split"), str) and obj["split"].strip() and not SPLIT_RE.fullmatch(obj["split"]):
        problems.append(Problem(number, "split", f"{_short(obj['split'])} is not a plain name (letters, digits, '_', '-', '.'; "
                                "splits name output files such as tokens/<split>.jsonl)"))
    for name in OPTIONAL_FIELDS:
        if obj.get(name) is not None:
            check_string(name, allow_empty=True)
    if "duration" in obj:
        value = obj["duration"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            problems.append(Problem(number, "duration", f"expected a positive number, got {_short(value)}"))
    if problems:
        return None, problems
    audio = Path(obj["audio_filepath"])
    if not audio.is_absolute():
        audio = base_dir / audio
    entry = ManifestEntry(
        id=obj["id"],
        audio_filepath=Path(os.path.normpath(audio)),
        duration=float(obj["duration"]),
        text=obj["text"],
        split=obj["split"],
        language=obj.get("language") or "",
        speaker_id=obj.get("speaker_id") or "",
        source=obj.get("source") or "",
        extra={key: value for key, value in obj.items() if key not in MANIFEST_FIELDS},
        line=number,
    )
    return entry, []


def _scan(path: Path, *, stop_at_first: bool) -> tuple[list[ManifestEntry], list[Problem]]:
    base_dir = Path(os.path.abspath(path)).parent
    entries: list[ManifestEntry] = []
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for number, text in _iter_lines(path):
        entry, found = _parse_line(text, number, base_dir)
        if entry is not None:
            if entry.id in first_line:
                found.append(Problem(number, "id", f"duplicate id {_short(entry.id)} (first on line {first_line[entry.id]})"))
            else:
                first_line[entry.id] = number
            if not entry.audio_filepath.is_file():
                found.append(Problem(number, "audio_filepath", f"audio file not found: {entry.audio_filepath}"))
        if found:
            problems.extend(found)
            if stop_at_first:
                break
        elif entry is not None:
            entries.append(entry)
    if not problems and not entries:
        problems.append(Problem(0, None, "manifest has no entries"))
    return entries, problems


def read_manifest(path: str | os.PathLike, splits: list[str] | None = None) -> list[ManifestEntry]:
    """Read a manifest, raising UsageError ("{path}:{line}: field 'x': ...") at the first bad line.

    Checks types, positive durations, unique ids and that every audio file exists. `splits` keeps only those splits
    (an error if that leaves nothing).
    """
    path = Path(path)
    entries, problems = _scan(path, stop_at_first=True)
    if problems:
        raise UsageError(problems[0].format(path) + "; run `speechless data validate` to list every problem")
    if splits is not None:
        wanted = set(splits)
        kept = [entry for entry in entries if entry.split in wanted]
        if not kept:
            present = ", ".join(sorted({entry.split for entry in entries}))
            raise UsageError(f"{path}: no entries in split(s) {', '.join(sorted(wanted)) or '(none)'}; splits present: {present}")
        return kept
    return entries


def manifest_splits(path: str | os.PathLike, train_split: str, eval_split: str) -> dict[str, list[ManifestEntry]]:
    """A manifest's entries by split, the train and eval splits first; a missing one is a UsageError naming the key
    (`data.train_split` / `data.eval_split`) and the splits present. The eval split may join several with '+'
    ('dev+test': see `joined`)."""
    by_split: dict[str, list[ManifestEntry]] = {}
    for entry in read_manifest(path):
        by_split.setdefault(entry.split, []).append(entry)
    for role, names in (("train", train_split), ("eval", eval_split)):
        for name in names.split("+") if role == "eval" else [names]:
            if name not in by_split:
                raise UsageError(f"{path}: no utterances in split '{name}' (data.{role}_split); splits present: {', '.join(sorted(by_split))}")
    first = list(dict.fromkeys([train_split, *eval_split.split("+")]))
    return {name: by_split[name] for name in first + sorted(set(by_split) - set(first))}


def joined(by_split: dict[str, list], names: str) -> list:
    """The items of the splits named in `names`, joined by '+' ('dev+test'), in that order."""
    return [item for name in names.split("+") for item in by_split[name]]


def validate_manifest(path: str | os.PathLike, check_audio: bool = False) -> list[Problem]:
    """Every problem in a manifest (empty list = clean). With `check_audio`, each file is also decoded with
    `load_audio` and its length compared with `duration` (tolerance 0.1 s)."""
    path = Path(path)
    entries, problems = _scan(path, stop_at_first=False)
    if check_audio:
        from speechless.data.audio import SAMPLE_RATE, load_audio

        for entry in entries:
            try:
                audio = load_audio(entry.audio_filepath)
            except UsageError as exc:
                problems.append(Problem(entry.line, "audio_filepath", str(exc)))
                continue
            actual = audio.shape[0] / SAMPLE_RATE
            if abs(actual - entry.duration) > DURATION_TOLERANCE_S:
                problems.append(
                    Problem(entry.line, "duration", f"manifest says {entry.duration:.3f} s but the audio lasts {actual:.3f} s")
                )
        problems.sort(key=lambda problem: problem.line)
    return problems


def write_manifest(path: str | os.PathLike, entries: Iterable[ManifestEntry]) -> Path:
    """Write entries as JSONL atomically; audio paths under the manifest's folder are written relative to it.

    Relative `audio_filepath`s in `entries` are taken as already relative to the manifest's folder. Duplicate ids
    raise ValueError (nothing is written).
    """
    path = Path(path)
    base_dir = Path(os.path.abspath(path)).parent
    seen: set[str] = set()
    lines = []
    for entry in entries:
        if entry.id in seen:
            raise ValueError(f"duplicate manifest id {entry.id!r}")
        seen.add(entry.id)
        lines.append(json.dumps(entry.to_row(base_dir), ensure_ascii=False) + "\n")
    write_text(path, "".join(lines))
    return path


def write_split_manifests(out_dir: str | os.PathLike, entries: list[ManifestEntry], splits: Iterable[str]) -> None:
    """`<split>.jsonl` for each split (atomically); a split without entries has its stale file removed."""
    for split in splits:
        subset = [entry for entry in entries if entry.split == split]
        if subset:
            write_manifest(Path(out_dir) / f"{split}.jsonl", subset)
        else:
            (Path(out_dir) / f"{split}.jsonl").unlink(missing_ok=True)


def manifest_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the manifest file's bytes (for provenance records)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: manifest not found; check the path")
    return sha256_file(path)


def summarize(entries: Iterable[ManifestEntry]) -> dict[str, Any]:
    """Utterances, seconds and hours per split (and in total), splits in first-seen order."""
    per_split: dict[str, dict[str, Any]] = {}
    for entry in entries:
        stats = per_split.setdefault(entry.split, {"utterances": 0, "seconds": 0.0})
        stats["utterances"] += 1
        stats["seconds"] += entry.duration
    for stats in per_split.values():
        stats["seconds"] = round(stats["seconds"], 3)
        stats["hours"] = round(stats["seconds"] / 3600, 4)
    total_seconds = round(sum(stats["seconds"] for stats in per_split.values()), 3)
    return {
        "utterances": sum(stats["utterances"] for stats in per_split.values()),
        "seconds": total_seconds,
        "hours": round(total_seconds / 3600, 4),
        "splits": per_split,
    }


def corpus_record(path: str | os.PathLike) -> dict[str, Any]:
    """What a model card says about its corpus: the manifest's distinct `source` values (e.g. the Debian packages and
    versions) and `licence` values (an extra key importers write; '' where a row has none), with their utterances."""
    sources: dict[str, int] = {}
    licences: dict[str, int] = {}
    for entry in read_manifest(path):
        sources[entry.source] = sources.get(entry.source, 0) + 1
        licence = str(entry.extra.get("licence", ""))
        licences[licence] = licences.get(licence, 0) + 1
    return {"sources": dict(sorted(sources.items())), "licences": dict(sorted(licences.items()))}


def corpus_line(record: dict[str, Any] | None) -> str:
    """One line for a model card: sources and licences, with the utterances of each."""
    if not record:
        return ""

    def named(counts: dict[str, int], missing: str) -> str:
        return "; ".join(f"{name or missing} ({n})" for name, n in counts.items())

    return (f"Corpus sources: {named(record['sources'], 'unnamed')}. Licences: {named(record['licences'], 'not recorded')} "
            "(utterances in brackets; share-alike licences carry over to what is made from the recordings).")
