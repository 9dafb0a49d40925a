"""speechless.data.audio: decoding, mono mix, resampling, every bad-input case, window bounds."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from speechless.core.errors import UsageError
from speechless.data.audio import MAX_WINDOW_S, SAMPLE_RATE, decode_audio, load_audio, window_bounds


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_hz(audio: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return float(np.fft.rfftfreq(audio.size, 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize(
    ("suffix", "subtype"), [(".wav", "PCM_16"), (".wav", "FLOAT"), (".flac", "PCM_16"), (".ogg", "VORBIS")]
)
def test_formats_decode_to_float32_mono_16k(tmp_path, suffix, subtype):
    path = tmp_path / f"tone{suffix}"
    sf.write(path, sine(440, 1.0, SAMPLE_RATE), SAMPLE_RATE, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.flags.c_contiguous
    assert abs(audio.size - SAMPLE_RATE) <= 1
    assert abs(dominant_hz(audio) - 440) < 5


def test_stereo_is_mixed_to_mono(tmp_path):
    left, right = sine(440, 0.5, SAMPLE_RATE, 0.4), sine(440, 0.5, SAMPLE_RATE, 0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.shape == (SAMPLE_RATE // 2,)
    np.testing.assert_allclose(audio, (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("rate", [44100, 8000, 22050])
def test_other_rates_are_resampled(tmp_path, rate):
    path = tmp_path / f"tone_{rate}.wav"
    sf.write(path, sine(1000, 2.0, rate), rate, subtype="FLOAT")
    audio = load_audio(path)
    assert abs(audio.size - 2 * SAMPLE_RATE) <= 2
    assert abs(dominant_hz(audio) - 1000) < 5
    assert 0.45 < np.abs(audio[1000:-1000]).max() < 0.55  # amplitude survives


def test_decode_audio_from_bytes(tmp_path):
    path = tmp_path / "tone.flac"
    sf.write(path, sine(300, 0.5, 22050), 22050)
    audio = decode_audio(path.read_bytes(), "row 3")
    assert abs(audio.size - SAMPLE_RATE // 2) <= 1
    with pytest.raises(UsageError, match="row 4"):
        decode_audio(b"not audio at all", "row 4")


def write_bad(tmp_path, kind: str):
    path = tmp_path / f"bad_{kind}.wav"
    if kind == "missing":
        pass
    elif kind == "corrupt":
        path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage" + bytes(range(256)))
    elif kind == "empty":
        sf.write(path, np.zeros(0, np.float32), SAMPLE_RATE)
    elif kind == "nan":
        audio = sine(440, 0.1, SAMPLE_RATE)
        audio[10] = np.nan
        sf.write(path, audio, SAMPLE_RATE, subtype="FLOAT")
    elif kind == "inf":
        audio = sine(440, 0.1, SAMPLE_RATE)
        audio[10] = np.inf
        sf.write(path, audio, SAMPLE_RATE, subtype="FLOAT")
    elif kind == "silent":
        sf.write(path, np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    return path


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("missing", "not found"),
        ("corrupt", "cannot decode"),
        ("empty", "empty"),
        ("nan", "NaN"),
        ("inf", "infinite"),
        ("silent", "silent"),
    ],
)
def test_bad_audio_is_a_usage_error_naming_the_file(tmp_path, kind, words):
    path = write_bad(tmp_path, kind)
    with pytest.raises(UsageError) as info:
        load_audio(path)
    message = str(info.value)
    assert path.name in message and words in message
    assert "\n" not in message


def test_folder_is_not_audio(tmp_path):
    with pytest.raises(UsageError, match="folder"):
        load_audio(tmp_path)


def test_quiet_but_not_silent_audio_loads(tmp_path):
    path = tmp_path / "quiet.wav"
    sf.write(path, sine(440, 0.2, SAMPLE_RATE, amplitude=0.01), SAMPLE_RATE, subtype="FLOAT")
    assert load_audio(path).size == int(0.2 * SAMPLE_RATE)


def seconds(n: float) -> int:
    return int(n * SAMPLE_RATE)


@pytest.mark.parametrize("length_s", [0.5, 10, 30])
def test_short_audio_is_one_window(length_s):
    assert window_bounds(seconds(length_s)) == [(0, seconds(length_s))]


@pytest.mark.parametrize(("length_s", "count"), [(61, 3), (95, 4), (60, 2), (30.001, 2)])
def test_long_audio_is_split_into_equal_windows(length_s, count):
    total = seconds(length_s)
    bounds = window_bounds(total)
    assert len(bounds) == count
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, no gaps or overlaps
    sizes = [end - start for start, end in bounds]
    assert max(sizes) <= seconds(MAX_WINDOW_S)
    assert max(sizes) - min(sizes) <= 1  # equal, no tiny tail


def test_window_bounds_61s_gives_three_windows_of_about_20s():
    sizes = [(end - start) / SAMPLE_RATE for start, end in window_bounds(seconds(61))]
    assert sizes == pytest.approx([61 / 3] * 3, abs=1e-3)


def test_window_bounds_edge_cases():
    assert window_bounds(0) == []
    assert window_bounds(seconds(20), max_window_s=10) == [(0, seconds(10)), (seconds(10), seconds(20))]
    with pytest.raises(ValueError):
        window_bounds(-1)
    with pytest.raises(ValueError):
        window_bounds(100, max_window_s=0)
