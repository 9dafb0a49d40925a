"""Property-based tests (hypothesis): manifest parsing never crashes and round-trips; token strings parse only in
their canonical form."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speechless.core.errors import UsageError
from speechless.data.manifest import ManifestEntry, read_manifest, validate_manifest, write_manifest
from speechless.speech.tokens import codes_to_string, hex_width, string_to_codes

AUDIO_NAMES = ["a.wav", "sub/b.flac"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("manifests")
    for name in AUDIO_NAMES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not decoded by the parser")
    return root


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12).filter(lambda s: s.strip())
splits = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,8}", fullmatch=True)
extra_values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8), st.lists(st.integers(), max_size=3))
entries = st.lists(st.builds(
    dict, id=names, audio=st.sampled_from(AUDIO_NAMES), duration=st.floats(0.001, 1e5, allow_nan=False), text=st.text(max_size=30),
    split=splits, language=st.text(max_size=3), speaker=st.text(max_size=5),
    extra=st.dictionaries(st.from_regex(r"x_[a-z]{1,5}", fullmatch=True), extra_values, max_size=2),
), max_size=8, unique_by=lambda e: e["id"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries)
def test_manifest_write_then_read_gives_the_same_entries(folder, rows):
    written = [ManifestEntry(id=r["id"], audio_filepath=folder / r["audio"], duration=r["duration"], text=r["text"], split=r["split"],
                             language=r["language"], speaker_id=r["speaker"], extra=r["extra"]) for r in rows]
    path = write_manifest(folder / "m.jsonl", written)
    if not written:
        with pytest.raises(UsageError, match="no entries"):
            read_manifest(path)
        return
    read = read_manifest(path)
    assert read == written and [e.extra for e in read] == [e.extra for e in written]
    assert all(json.loads(line)["audio_filepath"] in AUDIO_NAMES for line in path.read_text().split("\n")[:-1])  # stored relative


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6)),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
near_rows = st.fixed_dictionaries({}, optional={
    "id": st.one_of(names, json_values), "audio_filepath": st.one_of(st.sampled_from(AUDIO_NAMES + ["missing.wav", ""]), json_values),
    "duration": st.one_of(st.floats(), st.integers(-3, 3), json_values), "text": st.one_of(st.text(max_size=5), json_values),
    "split": st.one_of(splits, st.sampled_from(["../x", ".hidden", "a/b", ""]), json_values)})
lines = st.lists(st.one_of(near_rows.map(json.dumps), json_values.map(json.dumps), st.binary(max_size=20)), max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines)
def test_any_manifest_parses_or_fails_with_one_line_naming_the_line(folder, raw_lines):
    path = folder / "fuzz.jsonl"
    path.write_bytes(b"\n".join(line.encode() if isinstance(line, str) else line.replace(b"\n", b" ") for line in raw_lines))
    problems = validate_manifest(path)
    try:
        read = read_manifest(path)
    except UsageError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(str(path)) and problems
        assert message.split("; run")[0] == problems[0].format(path)
        return
    assert not problems and read
    for entry in read:
        assert entry.duration > 0 and math.isfinite(entry.duration) and entry.audio_filepath.is_file()
        assert "/" not in entry.split and not entry.split.startswith(".")


# ---------------------------------------------------------------------------------------------- token strings

token_text = st.text(st.sampled_from(string.hexdigits + " +-_xX\t\n0"), max_size=40)


@settings(max_examples=300, deadline=None)
@given(token_text, st.integers(1, 4), st.sampled_from([2, 16, 17, 256, 2048, 4097]))
def test_a_token_string_parses_only_when_it_is_canonical(text, levels, size):
    """Any string either parses to codes that print back to the same groups (hex case aside), or is a UsageError:
    signs, underscores or '0x' prefixes inside a group are not codes."""
    try:
        frames = string_to_codes(text, levels, size)
    except UsageError as exc:
        assert "\n" not in str(exc)
        return
    assert codes_to_string(frames, size) == " ".join(text.split()).lower()
    assert all(len(frame) == levels and all(0 <= code < size for code in frame) for frame in frames)
    assert all(len(group) == levels * hex_width(size) for group in text.split())
