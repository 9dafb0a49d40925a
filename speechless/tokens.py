"""Semantic-token rows: the JSONL that stage 1 writes and stages 2-3 read.

One utterance a line: `id`, `text`, `codes` (one list of ints per codebook level, each `frames` long), `codes_str`
(the compact string form), `frames`, `windows` ([start_s, end_s, frames] per encoder window) and `stage1_revision`
(the stage-1 checkpoint the codes belong to: codes from another checkpoint mean nothing to it).

Compact string form: one space-separated group per 40 ms frame; a group is the frame's codes, level 0 first, each in
fixed-width lower-case hex (3 digits for 2048 codes). E.g. two frames of 8 levels: "00a1f3...07c 1b2...".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from speechless.errors import UsageError
from speechless.io import read_jsonl, write_jsonl


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
