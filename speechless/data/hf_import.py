"""Import a speech dataset (Hugging Face Hub id or a local `save_to_disk` folder) as 16 kHz wav files + manifests.

Audio is never decoded by `datasets` (>= 4 would need torchcodec): the audio column is cast to `Audio(decode=False)`
and its bytes (or file path) are decoded with soundfile through `speechless.data.audio`.

Output layout of `import_hf_dataset(cfg, out_dir)`:

    out_dir/
      all.jsonl                     every imported utterance (the returned manifest)
      <split>.jsonl                 one per target split (the values of `splits`)
      audio/<split>/<safe id>.wav   16 kHz mono PCM-16
      import_report.json            rows written / resumed / skipped (with reasons) per source split
      resolved_config.yaml          the settings used

File names come from a sanitised id (letters, digits, '.', '_', '-'; a hash suffix when anything was changed), so a
dataset can never make us write outside `out_dir`. Re-running skips rows whose wav file already exists.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from pydantic import Field, field_validator
from rich.markup import escape

from speechless.core import log
from speechless.core.config import Section, to_yaml
from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.io import atomic_path, write_json, write_text
from speechless.data.audio import SAMPLE_RATE, decode_audio, load_audio, written_duration
from speechless.data.manifest import ManifestEntry, summarize, write_manifest

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class ImportConfig(Section):
    """`speechless data import`: one speech dataset from the Hub (or a local folder) -> wav files + manifests."""

    dataset: str
    """Hub dataset id (e.g. google/WaxalNLP), a local folder written by `save_to_disk`, or a local metadata table
    (.csv/.tsv/.json/.jsonl/.parquet) whose audio column holds file paths relative to the table's folder."""
    config: str | None = None
    """Dataset configuration name (e.g. aka_asr); None for the default one."""
    revision: str | None = None
    """Hub revision (branch, tag or commit sha); pin a commit sha for reproducible imports."""
    splits: dict[str, str] = Field(default_factory=lambda: {"train": "train"})
    """Source split -> our split, e.g. {train: train, validation: dev, test: test}."""
    audio_column: str = "audio"
    """Column holding the audio: an Audio feature, a {bytes, path} struct, or a file path (relative paths are read
    from the local dataset's folder)."""
    text_column: str = "text"
    """Column holding the transcription."""
    id_column: str | None = None
    """Column with a per-row id (file names and manifest ids); None = '<source split>-<row number>'."""
    speaker_column: str | None = None
    """Column with a speaker id; None = no speaker information."""
    language: str = ""
    """Language code written to every manifest row (e.g. 'ak' or 'tw')."""
    source: str = ""
    """Source tag written to every manifest row; empty = the dataset id."""
    licence: str = ""
    """Licence / terms of the source (recorded in the resolved config; check it before redistributing)."""
    max_items: int | None = Field(default=None, ge=1)
    """Import at most this many utterances per source split (None = all)."""
    normalize_text: bool = True
    """Unify apostrophes and quotes, map Greek look-alikes to the Twi letters ɛ/ɔ, NFC, collapse whitespace."""
    streaming: bool = False
    """Stream from the Hub instead of downloading whole splits first (useful with max_items)."""

    @field_validator("splits")
    @classmethod
    def _check_splits(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("map at least one source split, e.g. {train: train}")
        for target in value.values():
            if not _SPLIT_NAME.match(target):
                raise ValueError(f"target split {target!r}: use letters, digits, '_' and '-' only")
        return value


# ------------------------------------------------------------------------------------------------------------------
# Text and names
# ------------------------------------------------------------------------------------------------------------------

_TEXT_TABLE = str.maketrans(
    {
        **{ch: "'" for ch in "\u2018\u2019\u201a\u201b\u02bc\u02bb\u0060\u00b4\u2032"},
        **{ch: '"' for ch in "\u201c\u201d\u201e\u201f\u00ab\u00bb\u2033"},
        "\u03b5": "\u025b",  # Greek small epsilon -> Latin open e (ɛ)
        "\u037b": "\u0254",  # Greek small reversed lunate sigma -> Latin open o (ɔ)
        "\u1d10": "\u0254",  # Latin small capital open o -> ɔ
    }
)


def normalize_text(text: str) -> str:
    """NFC; curly/backtick apostrophes -> ', curly/angle quotes -> "; ε -> ɛ, ͻ -> ɔ; whitespace collapsed.

    Case and the Twi letters ɛ/ɔ (and Ɛ/Ɔ) are kept; no punctuation is removed (that is for the WER/CER scorer).
    """
    return " ".join(unicodedata.normalize("NFC", text).translate(_TEXT_TABLE).split())


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(raw: str, max_len: int = 80) -> str:
    """A file-name-safe version of `raw`: no separators, no leading dots, bounded length; a short hash is appended
    whenever anything had to change, so distinct ids stay distinct."""
    cleaned = re.sub(r"\.{2,}", ".", _UNSAFE.sub("_", raw)).strip("._-")[:max_len]
    if cleaned == raw and cleaned:
        return cleaned
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{cleaned}-{digest}" if cleaned else digest


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------------


def _local_folder(cfg: ImportConfig) -> Path | None:
    """The local folder named by `dataset`, None for a Hub id; a path-like name that does not exist is an error."""
    path = Path(cfg.dataset).expanduser()
    if path.exists():
        return path
    looks_local = cfg.dataset.startswith((".", "/", "~")) or cfg.dataset.count("/") > 1 or os.sep != "/" and os.sep in cfg.dataset
    if looks_local:
        raise UsageError(f"dataset {cfg.dataset!r}: local folder not found (Hub ids look like owner/name); check the path")
    return None


_TABLE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _load_split(cfg: ImportConfig, hf_split: str, local: Path | None, cache: dict[str, Any]) -> Any:
    """The source split as a (possibly streaming) datasets object; clear errors for the common mistakes."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    where = f"dataset {cfg.dataset!r}" + (f" config {cfg.config!r}" if cfg.config else "")
    try:
        if local is not None and local.is_file():
            builder = _TABLE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise UsageError(f"{where}: a local file must be a table ({', '.join(_TABLE_BUILDERS)}) or a save_to_disk folder")
            if len(cfg.splits) != 1:
                raise UsageError(f"{where}: a local table is one split; map exactly one source split in 'splits'")
            if "table" not in cache:
                extra = {"delimiter": "\t"} if local.suffix.lower() == ".tsv" else {}
                cache["table"] = datasets.load_dataset(builder, data_files=str(local), split="train", **extra)
            return cache["table"]
        if local is not None and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            if "disk" not in cache:
                cache["disk"] = datasets.load_from_disk(str(local))
            loaded = cache["disk"]
            if isinstance(loaded, datasets.DatasetDict):
                if hf_split not in loaded:
                    raise UsageError(f"{where}: no split {hf_split!r}; it has {', '.join(loaded)}: fix 'splits' in the config")
                return loaded[hf_split]
            if len(cfg.splits) != 1:
                raise UsageError(f"{where}: a single saved split; map exactly one source split in 'splits'")
            return loaded
        return datasets.load_dataset(
            str(local) if local is not None else cfg.dataset,
            cfg.config,
            split=hf_split,
            revision=cfg.revision,
            streaming=cfg.streaming,
        )
    except UsageError:
        raise
    except DatasetNotFoundError as exc:
        raise UsageError(f"{where}: not found on the Hub (or gated: accept its terms and log in with `hf auth login`); {exc}") from exc
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise UsageError(f"{where} split {hf_split!r}: {exc}; check 'dataset', 'config', 'revision' and 'splits'") from exc
    except Exception as exc:  # network, auth, cache, a missing decoder: the config was fine, the work failed
        cause = _root_cause(exc)
        hint = "check the files" if local is not None else "check the network and HF_TOKEN"
        if isinstance(cause, ImportError) and "torchcodec" in str(cause):
            hint = "this loader needs torchcodec; use a save_to_disk folder or a metadata table with file paths instead"
        raise RuntimeFailure(f"{where} split {hf_split!r}: cannot load ({type(cause).__name__}: {cause}); {hint}") from exc


def _prepare(ds: Any, cfg: ImportConfig, where: str) -> Any:
    """Check the columns exist, keep only the ones we read, switch audio decoding off."""
    from datasets import Audio

    columns = getattr(ds, "column_names", None)
    wanted = [cfg.audio_column, cfg.text_column] + [c for c in (cfg.id_column, cfg.speaker_column) if c]
    if columns is not None:
        for key in ("audio_column", "text_column", "id_column", "speaker_column"):
            column = getattr(cfg, key)
            if column and column not in columns:
                raise UsageError(f"{where}: {key} {column!r} not in the dataset; its columns: {', '.join(columns)}")
        ds = ds.select_columns(list(dict.fromkeys(wanted)))
    features = getattr(ds, "features", None) or {}
    if isinstance(features.get(cfg.audio_column), Audio):
        ds = ds.cast_column(cfg.audio_column, Audio(decode=False))
    return ds


def _decode_value(value: Any, name: str, local: Path | None) -> np.ndarray:
    """Audio from a column value: {bytes, path} (bytes first) or a path string."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return decode_audio(data, name)
        value = value.get("path")
    if isinstance(value, (str, os.PathLike)) and str(value):
        path = Path(value)
        base = None if local is None else (local if local.is_dir() else local.parent)
        if not path.is_absolute() and base is not None and (base / path).is_file():
            path = base / path
        return load_audio(path)
    raise UsageError(f"{name}: no audio bytes or path in this row")


# ------------------------------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------------------------------


def import_hf_dataset(cfg: ImportConfig, out_dir: str | os.PathLike) -> Path:
    """Import the configured splits into `out_dir` (layout in the module docstring); return the all.jsonl path.

    Rows with undecodable/empty/silent audio or no transcription are skipped and counted (import_report.json).
    Resumable: a row whose wav file exists is not decoded again.
    """
    out_dir = Path(out_dir)
    audio_root = out_dir / "audio"
    local = _local_folder(cfg)
    entries: list[ManifestEntry] = []
    used_ids: set[str] = set()
    report: dict[str, Any] = {"dataset": cfg.dataset, "config": cfg.config, "revision": cfg.revision, "splits": {}}
    cache: dict[str, Any] = {}
    warned = 0

    for hf_split, split in cfg.splits.items():
        where = f"{cfg.dataset}:{hf_split}"
        ds = _prepare(_load_split(cfg, hf_split, local, cache), cfg, where)
        counts, warned = _import_split(ds, cfg, hf_split, split, audio_root / split, local, entries, used_ids, warned)
        report["splits"][hf_split] = {"target": split, **dict(counts)}
        log.info(f"{escape(where)} -> {split}: " + ", ".join(f"{key} {value}" for key, value in counts.items()))

    if not entries:
        skipped = {k: v for per in report["splits"].values() for k, v in per.items() if k.startswith("skipped")}
        raise UsageError(f"{cfg.dataset}: no usable rows ({skipped or 'the splits are empty'}); check the columns and splits in the config")
    for split in dict.fromkeys(cfg.splits.values()):
        subset = [entry for entry in entries if entry.split == split]
        if subset:
            write_manifest(out_dir / f"{split}.jsonl", subset)
    write_json(out_dir / "import_report.json", report)
    write_text(out_dir / "resolved_config.yaml", to_yaml(cfg))
    manifest = write_manifest(out_dir / "all.jsonl", entries)
    stats = summarize(entries)
    log.info(f"wrote {stats['utterances']} utterances ({stats['hours']:.2f} h) to {escape(str(manifest))}")
    return manifest


def _import_split(ds: Any, cfg: ImportConfig, hf_split: str, split: str, split_dir: Path, local: Path | None,
                  entries: list[ManifestEntry], used_ids: set[str], warned: int) -> tuple[Counter[str], int]:
    """Import one source split's rows into `split_dir`, appending their manifest entries to `entries` (ids unique over
    `used_ids`); return the row counts and the number of skip warnings shown so far (at most 5 per import)."""
    where = f"{cfg.dataset}:{hf_split}"
    split_dir.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    try:
        total = len(ds)
    except TypeError:
        total = None
    if total is not None and cfg.max_items is not None:
        total = min(total, cfg.max_items)
    with log.progress() as bar:
        task = bar.add_task(f"importing {escape(where)} -> {split}", total=total)
        for row_index, row in enumerate(ds):
            if cfg.max_items is not None and counts["written"] + counts["resumed"] >= cfg.max_items:
                break
            bar.advance(task)
            text = row.get(cfg.text_column)
            if not isinstance(text, str) or not text.strip():
                counts["skipped: no transcription"] += 1
                continue
            if cfg.normalize_text:
                text = normalize_text(text)
            raw_id, uid = _row_id(row, cfg, hf_split, row_index, used_ids)
            target = split_dir / f"{uid}.wav"
            if not _inside(target, split_dir):  # cannot happen after safe_name; belt and braces
                raise RuntimeFailure(f"{where} row {row_index}: id {raw_id!r} maps outside {split_dir}; refusing to write")
            duration = written_duration(target)
            if duration is not None:
                counts["resumed"] += 1
            else:
                try:
                    audio = _decode_value(row.get(cfg.audio_column), f"{where} row {row_index} (id {raw_id!r})", local)
                except UsageError as exc:
                    counts[f"skipped: {_reason(str(exc))}"] += 1
                    if warned < 5:
                        log.warn(f"skipping {escape(str(exc))}")
                        warned += 1
                    continue
                duration = _write_wav(audio, target)
                counts["written"] += 1
            entries.append(_entry(row, cfg, uid, raw_id, target, duration, text, split))
    return counts, warned


def _row_id(row: dict, cfg: ImportConfig, hf_split: str, row_index: int, used_ids: set[str]) -> tuple[str, str]:
    """(raw id, file-safe id unique among `used_ids`, which it joins) of a row: its id column, else split + index."""
    raw_id = row.get(cfg.id_column) if cfg.id_column else None
    raw_id = f"{hf_split}-{row_index:07d}" if raw_id is None or str(raw_id) == "" else str(raw_id)
    uid = safe_name(raw_id)
    if uid in used_ids:
        uid = safe_name(f"{raw_id}-{hf_split}-{row_index}")
    used_ids.add(uid)
    return raw_id, uid


def _write_wav(audio: np.ndarray, target: Path) -> float:
    """Write decoded 16 kHz audio (clipped to [-1, 1] in place) as PCM-16 wav, atomically; return its duration."""
    np.clip(audio, -1.0, 1.0, out=audio)
    with atomic_path(target) as tmp:
        sf.write(str(tmp), audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return audio.shape[0] / SAMPLE_RATE


def _entry(row: dict, cfg: ImportConfig, uid: str, raw_id: str, target: Path, duration: float, text: str,
           split: str) -> ManifestEntry:
    """The manifest entry of an imported row."""
    extra: dict[str, Any] = {}
    if cfg.id_column and uid != raw_id:
        extra["orig_id"] = raw_id
    speaker = row.get(cfg.speaker_column) if cfg.speaker_column else None
    return ManifestEntry(
        id=uid,
        audio_filepath=target.absolute(),
        duration=round(duration, 4),
        text=text,
        split=split,
        language=cfg.language,
        speaker_id="" if speaker is None else str(speaker),
        source=cfg.source or cfg.dataset,
        extra=extra,
    )


def _reason(message: str) -> str:
    """A short category for the skip counts in import_report.json."""
    for key, reason in (("silent", "silent audio"), ("empty", "empty audio"), ("NaN", "NaN/inf samples"),
                        ("not found", "audio file missing"), ("cannot decode", "undecodable audio"), ("no audio", "no audio")):
        if key in message:
            return reason
    return "bad audio"
