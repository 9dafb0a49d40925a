"""Semantic-token rows: the JSONL that stage 1 writes and stages 2-3 read, and the stage-1 version they belong to.

One utterance a line: `id`, `text`, `codes` (one list of ints per codebook level, each `frames` long), `codes_str`
(the compact string form), `frames`, `windows` ([start_s, end_s, frames] per encoder window) and `stage1_revision`
(the stage-1 checkpoint the codes belong to: codes from another checkpoint mean nothing to it).

Compact string form: one space-separated group per 40 ms frame; a group is the frame's codes, level 0 first, each in
fixed-width lower-case hex (3 digits for 2048 codes). E.g. two frames of 8 levels: "00a1f3...07c 1b2...".
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from speechless.core import log
from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.io import read_json, read_jsonl, sha256_file, write_jsonl
from speechless.core.store import StoreConfig, is_store_ref, open_store

HEX_GROUP = re.compile(r"[0-9a-fA-F]+")


def hex_width(codebook_size: int) -> int:
    return max(1, (codebook_size - 1).bit_length() + 3 >> 2)


def codes_to_string(codes: torch.Tensor | Sequence[Sequence[int]], codebook_size: int) -> str:
    """[frames, levels] codes -> compact string."""
    width = hex_width(codebook_size)
    rows = codes.tolist() if isinstance(codes, torch.Tensor) else codes
    return " ".join("".join(format(code, f"0{width}x") for code in frame) for frame in rows)


def string_to_codes(text: str, num_quantizers: int, codebook_size: int) -> list[list[int]]:
    """Compact string -> [frames, levels] codes; a malformed string is a UsageError saying what is wrong."""
    width = hex_width(codebook_size)
    frames = []
    for position, group in enumerate(text.split()):
        if len(group) != width * num_quantizers:
            raise UsageError(f"token string: frame {position} has {len(group)} characters, expected {width * num_quantizers} ({num_quantizers} codes x {width} hex digits)")
        if not HEX_GROUP.fullmatch(group):  # int(x, 16) alone also takes '-1', '+f', '0_1' and would yield negative codes
            raise UsageError(f"token string: frame {position} is not hexadecimal: {group!r}")
        frame = [int(group[i:i + width], 16) for i in range(0, len(group), width)]
        if max(frame) >= codebook_size:
            raise UsageError(f"token string: frame {position} has a code >= codebook size {codebook_size}")
        frames.append(frame)
    return frames


def token_row(utt_id: str, text: str, codes: torch.Tensor, windows: list, codebook_size: int, stage1_revision: str) -> dict:
    """codes: [frames, levels] -> one JSONL row (codes stored level-major: one list per codebook)."""
    return {
        "id": utt_id,
        "text": text,
        "frames": int(codes.shape[0]),
        "codes": codes.T.tolist(),
        "codes_str": codes_to_string(codes, codebook_size),
        "windows": windows,
        "stage1_revision": stage1_revision,
    }


def write_token_jsonl(path: Path, rows: list[dict]) -> None:
    write_jsonl(path, rows)


def read_token_jsonl(path: Path, expect_revision: str | None = None, codebook_size: int | None = None) -> list[dict]:
    """Read token rows, checking each line's shape, that codes are ints in [0, codebook_size) (when given) and
    (optionally) that it belongs to the expected stage-1 revision."""
    rows = []
    for number, row in read_jsonl(path, "token file", "; the file may be half-written, re-create it"):
        for key in ("id", "codes", "stage1_revision"):
            if key not in row:
                raise UsageError(f"{path}:{number}: missing field '{key}'")
        if expect_revision is not None and row["stage1_revision"] != expect_revision:
            raise UsageError(f"{path}:{number}: tokens come from stage-1 revision {str(row['stage1_revision'])[:12]}, expected {expect_revision[:12]}; re-tokenize with the matching stage-1 checkpoint")
        codes = row["codes"]
        if not isinstance(codes, list) or not codes or not all(isinstance(level, list) for level in codes):
            raise UsageError(f"{path}:{number}: field 'codes': expected one list of ints per codebook level")
        lengths = {len(level) for level in codes}
        if len(lengths) > 1:
            raise UsageError(f"{path}:{number}: field 'codes': levels have different lengths {sorted(lengths)}")
        try:
            values = torch.tensor(codes)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise UsageError(f"{path}:{number}: field 'codes': not integers ({exc})") from exc
        if values.numel() and values.dtype != torch.int64:
            raise UsageError(f"{path}:{number}: field 'codes': expected integers, got {values.dtype}")
        limit = codebook_size if codebook_size is not None else torch.iinfo(torch.int64).max
        outside = values[(values < 0) | (values >= limit)]
        if outside.numel():
            raise UsageError(f"{path}:{number}: field 'codes': code {outside[0].item()} is outside [0, {codebook_size or 'codebook size'})")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------- a stage-1 version and its splits

@dataclass
class Stage1:
    folder: Path
    ref: str
    revision: str
    """sha256 of the stage-1 `model.safetensors`: the identity of its codes."""
    num_levels: int
    codebook_size: int
    version: str | None
    """`stage1@vN` when the version is known (a store ref, or a folder matching a version in the local store)."""
    store_revision: str | None

    def record(self) -> dict:
        return {"ref": self.ref, "version": self.version, "store_revision": self.store_revision, "revision": self.revision}


def resolve_stage1(ref: str, store_cfg: StoreConfig | None = None) -> Stage1:
    """A stage-1 run folder or store ref -> its folder, weights revision and code layout."""
    version = store_revision = None
    if Path(ref).is_dir():
        folder = Path(ref)
    elif is_store_ref(ref):
        store = open_store(store_cfg)
        info = store.resolve(ref)
        folder = store.download(ref)
        version, store_revision = info.ref, info.revision
    else:
        raise UsageError(f"{ref}: not a stage-1 run folder nor a store ref like stage1@v1")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise UsageError(f"{folder}: no model.safetensors; not a finished stage-1 run (train it first)")
    meta = read_json(folder / "config.json")
    if "num_quantizers" not in meta or "codebook_size" not in meta:
        raise UsageError(f"{folder / 'config.json'}: not a stage-1 checkpoint config (no num_quantizers/codebook_size)")
    revision = sha256_file(weights)
    if version is None:
        version, store_revision = _find_in_store(revision, store_cfg)
    return Stage1(folder, ref, revision, int(meta["num_quantizers"]), int(meta["codebook_size"]), version, store_revision)


def _find_in_store(revision: str, store_cfg: StoreConfig | None) -> tuple[str | None, str | None]:
    """The local-store version of stage 1 whose weights have this sha256, if any (provenance for a folder ref)."""
    try:
        store = open_store(store_cfg)
        if not hasattr(store, "root"):
            return None, None
        for info in reversed(store.list("stage1")):
            weights = Path(info.location) / "model.safetensors"
            if weights.is_file() and sha256_file(weights) == revision:
                return info.ref, info.revision
    except (UsageError, RuntimeFailure, OSError):
        pass
    return None, None


def check_stage1_match(trained_on: dict, stage1_ref: str | None, store_cfg: StoreConfig | None = None) -> None:
    """Refuse a stage-1 version other than the one a stage-2 model was trained on (`trained_on`: its `stage1` record),
    whose codes would mean something else."""
    if stage1_ref is None:
        return
    other = resolve_stage1(stage1_ref, store_cfg)
    if other.revision != trained_on["revision"]:
        raise UsageError(
            f"stage-1 mismatch: this stage-2 model was trained on stage-1 codes of revision {trained_on['revision'][:12]} "
            f"({trained_on.get('version') or trained_on.get('ref')}), but {stage1_ref} has revision {other.revision[:12]}; "
            f"use the matching stage-1 version or retrain stage 2 on this one")


def load_split(stage1: Stage1, split: str, max_frames: int | None = None) -> list[dict]:
    path = stage1.folder / "tokens" / f"{split}.jsonl"
    if not path.is_file():
        present = sorted(p.stem for p in (stage1.folder / "tokens").glob("*.jsonl")) if (stage1.folder / "tokens").is_dir() else []
        raise UsageError(f"{path}: no token file for split '{split}' (splits present: {', '.join(present) or 'none'})")
    rows = read_token_jsonl(path, expect_revision=stage1.revision, codebook_size=stage1.codebook_size)
    for number, row in enumerate(rows, 1):
        if len(row["codes"]) != stage1.num_levels:
            raise UsageError(f"{path}: row {number} has {len(row['codes'])} levels, stage 1 has {stage1.num_levels}")
    kept = [r for r in rows if r.get("text") and r["frames"] > 0 and (max_frames is None or r["frames"] <= max_frames)]
    if len(kept) < len(rows):
        log.warn(f"{path}: left out {len(rows) - len(kept)} utterance(s) without text, without frames or over {max_frames} frames")
    if not kept:
        raise UsageError(f"{path}: no usable utterances (need text and frames)")
    return kept


def stage1_manifest(stage1: Stage1, manifest: str | None = None) -> str | None:
    """The manifest to read utterance fields from: `manifest` when given ('' = none), else the one recorded in the
    stage-1 provenance when it exists and is unchanged (else None, with a warning)."""
    if manifest is not None:
        if manifest and not Path(manifest).is_file():
            raise UsageError(f"data.manifest {manifest}: file not found")
        return manifest or None
    prov = stage1.folder / "provenance.json"
    recorded = read_json(prov).get("manifest", {}) if prov.is_file() else {}
    manifest = recorded.get("path")
    if manifest and not Path(manifest).is_file():
        log.warn(f"stage-1 manifest {manifest} not found: no speaker ids (set data.manifest)")
        return None
    # a relative path is read from the working folder, where another manifest may stand under the same name
    if manifest and recorded.get("sha256") and sha256_file(manifest) != recorded["sha256"]:
        log.warn(f"{manifest} is not the manifest stage 1 read (sha256 differs; a relative path is read from the "
                 "working folder): no speaker ids (set data.manifest)")
        return None
    return manifest or None


def speaker_map(stage1: Stage1, manifest: str | None = None, speaker_field: str = "speaker_id") -> dict[str, str]:
    """Utterance id -> speaker, from the manifest (lenient: only `id` and the speaker field are read). `manifest` None =
    the manifest recorded in the stage-1 provenance (when it exists and is unchanged); '' = no speakers."""
    manifest = stage1_manifest(stage1, manifest)
    if not manifest:
        return {}
    out = {}
    for line in Path(manifest).read_text(encoding="utf-8").split("\n"):  # not splitlines(): U+2028 in a text is no line end
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "id" in row and row.get(speaker_field) is not None:
                out[str(row["id"])] = str(row[speaker_field])
    return out


def stage1_codebooks(stage1: Stage1) -> torch.Tensor:
    """(Q, K, D) codebooks of the stage-1 version, in its standardised units (what a 'vectors' probe reads)."""
    from speechless.speech.rvq import SpeechRVQ

    return SpeechRVQ.load(stage1.folder).codebooks()


def row_codes(row: dict) -> torch.Tensor:
    return torch.tensor(row["codes"], dtype=torch.long)
