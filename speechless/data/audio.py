"""Audio in: any soundfile format -> float32 mono at 16 kHz, with every bad-input case a clear one-line UsageError.

Also `window_bounds`, which splits long audio into equal windows of at most 30 s (the Gemma 4 feature extractor
silently truncates anything longer).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from speechless.core.errors import UsageError

SAMPLE_RATE = 16000
"""Sample rate of every waveform the project handles (Hz)."""

MAX_WINDOW_S = 30.0
"""Longest window the audio encoder sees at once (seconds)."""

SILENCE_PEAK = 1e-4
"""Audio whose absolute peak is below this (on a [-1, 1] scale) is treated as digital silence."""


def load_audio(path: str | os.PathLike) -> np.ndarray:
    """Read an audio file as float32 mono at 16 kHz.

    Any format libsndfile reads (wav, flac, ogg/vorbis, mp3, ...); several channels are averaged; any other rate is
    resampled with soxr. Raises UsageError naming the file for: missing, unreadable/corrupt, empty, NaN/inf samples,
    silent (peak below 1e-4).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not an audio file" if path.is_dir() else "audio file not found"
        raise UsageError(f"{path}: {what}; check the path (relative paths in a manifest are read from its folder)")
    return _decode(path, str(path))


def decode_audio(data: bytes | BinaryIO, name: str) -> np.ndarray:
    """Like `load_audio` for encoded bytes (or a binary file object); `name` is used in error messages."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = io.BytesIO(bytes(data))
    return _decode(data, name)


def _decode(source: Path | BinaryIO, name: str) -> np.ndarray:
    try:
        audio, rate = sf.read(source, dtype="float32", always_2d=False)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"{name}: cannot decode audio ({reason}); the file is corrupt or not an audio format libsndfile reads "
            "(wav, flac, ogg, mp3): re-export it or drop it from the manifest"
        ) from exc
    return _finish(audio, rate, name)


def _finish(audio: np.ndarray, rate: int, name: str) -> np.ndarray:
    """Mono mix, sanity checks, resample: shared by file and byte decoding."""
    if audio.ndim == 2:
        audio = audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1, dtype=np.float32)
    if audio.size == 0:
        raise UsageError(f"{name}: audio is empty (0 samples); re-export it or drop it from the manifest")
    # One pass each for min and max: cheaper than np.abs (which would allocate a full copy).
    low, high = float(audio.min()), float(audio.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise UsageError(f"{name}: audio contains NaN or infinite samples; re-export it or drop it from the manifest")
    if max(high, -low) < SILENCE_PEAK:
        raise UsageError(
            f"{name}: audio is silent (peak {max(high, -low):.1e} < {SILENCE_PEAK:.0e}); "
            "check the recording or drop it from the manifest"
        )
    if rate != SAMPLE_RATE:
        audio = soxr.resample(np.ascontiguousarray(audio), rate, SAMPLE_RATE)
    return np.ascontiguousarray(audio, dtype=np.float32)


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the file header (no decoding); UsageError if the file is missing or unreadable."""
    path = Path(path)
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, OSError) as exc:
        raise UsageError(f"{path}: cannot read audio header ({exc}); check the file") from exc
    return info.frames / info.samplerate


def written_duration(path: str | os.PathLike) -> float | None:
    """Duration of a non-empty 16 kHz file written by an earlier run (resume checks), or None if absent/unusable."""
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, OSError):
        return None
    if info.samplerate != SAMPLE_RATE or info.frames <= 0:
        return None
    return info.frames / SAMPLE_RATE


def window_bounds(num_samples: int, max_window_s: float = MAX_WINDOW_S) -> list[tuple[int, int]]:
    """Split `num_samples` (at 16 kHz) into contiguous (start, end) windows of at most `max_window_s` seconds.

    Audio up to the limit is one window; longer audio is cut into the fewest windows of EQUAL size (61 s -> three
    windows of ~20.3 s), never a long window plus a tiny tail. 0 samples -> no windows.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if not max_window_s > 0:
        raise ValueError(f"max_window_s must be > 0, got {max_window_s}")
    if num_samples == 0:
        return []
    max_len = max(1, int(max_window_s * SAMPLE_RATE))
    count = -(-num_samples // max_len)  # ceil
    edges = [(i * num_samples) // count for i in range(count + 1)]
    return [(edges[i], edges[i + 1]) for i in range(count)]
