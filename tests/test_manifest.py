"""speechless.data.manifest and `speechless data validate`."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speechless.core.errors import UsageError
from speechless.data.audio import SAMPLE_RATE
from speechless.data.manifest import (
    MANIFEST_FIELDS,
    ManifestEntry,
    manifest_sha256,
    read_manifest,
    validate_manifest,
    write_manifest,
)


def tone(path: Path, seconds: float = 0.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SAMPLE_RATE)
    return path


def row(i: int, **changes) -> dict:
    base = {
        "id": f"utt{i}",
        "audio_filepath": f"audio/utt{i}.wav",
        "duration": 0.5,
        "text": f"sentence {i}",
        "language": "sw",
        "speaker_id": "spk1",
        "split": "train" if i % 2 else "dev",
        "source": "test",
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not ...}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A folder with audio/utt0..utt3.wav (0.5 s each)."""
    for i in range(4):
        tone(tmp_path / "audio" / f"utt{i}.wav")
    return tmp_path


def test_good_manifest_reads_with_absolute_paths(corpus):
    manifest = write_lines(corpus / "m.jsonl", [row(i, translation=f"t{i}") for i in range(4)])
    entries = read_manifest(manifest)
    assert [entry.id for entry in entries] == ["utt0", "utt1", "utt2", "utt3"]
    assert [entry.line for entry in entries] == [1, 2, 3, 4]
    for entry in entries:
        assert entry.audio_filepath.is_absolute() and entry.audio_filepath.is_file()
        assert entry.duration == 0.5 and entry.language == "sw"
        assert entry.extra == {"translation": f"t{entry.id[-1]}"}


def test_relative_paths_resolve_against_the_manifest_folder_not_cwd(corpus, tmp_path, monkeypatch):
    (corpus / "lists").mkdir()
    manifest = write_lines(corpus / "lists" / "m.jsonl", [row(0, audio_filepath="../audio/utt0.wav")])
    monkeypatch.chdir(tmp_path.parent)
    [entry] = read_manifest(manifest)
    assert entry.audio_filepath == corpus / "audio" / "utt0.wav"


def test_optional_fields_default_to_empty_and_splits_filter(corpus):
    lines = [row(i, language=..., speaker_id=..., source=None) for i in range(4)]
    manifest = write_lines(corpus / "m.jsonl", lines)
    entries = read_manifest(manifest, splits=["dev"])
    assert [entry.id for entry in entries] == ["utt0", "utt2"]
    assert all(entry.language == entry.speaker_id == entry.source == "" for entry in entries)
    with pytest.raises(UsageError, match="splits present: dev, train"):
        read_manifest(manifest, splits=["test"])


def test_write_then_read_round_trip_with_relative_paths(corpus):
    entries = read_manifest(write_lines(corpus / "m.jsonl", [row(i, translation="x") for i in range(4)]))
    out = write_manifest(corpus / "copy.jsonl", entries)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["audio_filepath"] == "audio/utt0.wav"  # relative: under the manifest's folder
    assert list(rows[0])[: len(MANIFEST_FIELDS)] == list(MANIFEST_FIELDS)
    assert read_manifest(out) == entries
    assert len(manifest_sha256(out)) == 64


def test_paths_outside_the_manifest_folder_stay_absolute(corpus, tmp_path):
    entries = read_manifest(write_lines(corpus / "m.jsonl", [row(0)]))
    out = write_manifest(tmp_path / "elsewhere" / "m.jsonl", entries)
    assert json.loads(out.read_text())["audio_filepath"] == str(corpus / "audio" / "utt0.wav")
    assert read_manifest(out) == entries


def test_write_manifest_rejects_duplicate_ids(corpus):
    entry = ManifestEntry(id="a", audio_filepath=corpus / "audio" / "utt0.wav", duration=0.5, text="", split="train")
    with pytest.raises(ValueError, match="duplicate"):
        write_manifest(corpus / "dup.jsonl", [entry, entry])
    assert not (corpus / "dup.jsonl").exists()


# Each bad line kind: (line content, field named in the message, words in the message).
BAD_LINES = {
    "bad json": ('{"id": "x", "duration": ', None, "not valid JSON"),
    "not an object": ("[1, 2]", None, "expected a JSON object"),
    "missing field": (row(9, text=...), "text", "missing required field"),
    "wrong type": (row(9, text=5), "text", "expected a string, got 5"),
    "duration not a number": (row(9, duration="abc"), "duration", "expected a positive number, got 'abc'"),
    "negative duration": (row(9, duration=-1.5), "duration", "expected a positive number, got -1.5"),
    "zero duration": (row(9, duration=0), "duration", "expected a positive number, got 0"),
    "empty id": (row(9, id=""), "id", "non-empty"),
    "duplicate id": (row(9, id="utt0", audio_filepath="audio/utt0.wav"), "id", "duplicate id 'utt0' (first on line 1)"),
    "missing audio": (row(9), "audio_filepath", "audio file not found"),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_read_manifest_stops_at_the_first_bad_line_with_its_number(corpus, kind):
    bad, field, words = BAD_LINES[kind]
    manifest = write_lines(corpus / "m.jsonl", [row(0), row(1), bad, row(3)])
    with pytest.raises(UsageError) as info:
        read_manifest(manifest)
    message = str(info.value)
    assert message.startswith(f"{manifest}:3: ")
    if field:
        assert f"field '{field}'" in message
    assert words in message


def test_empty_or_missing_manifest_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        read_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UsageError, match="no entries"):
        read_manifest(tmp_path / "empty.jsonl")


def test_validate_lists_every_problem(corpus):
    lines = [row(0)] + [bad for bad, _, _ in BAD_LINES.values()] + [row(3)]
    manifest = write_lines(corpus / "m.jsonl", lines)
    problems = validate_manifest(manifest)
    assert sorted({problem.line for problem in problems}) == list(range(2, 2 + len(BAD_LINES)))
    by_line = {problem.line: problem for problem in problems}
    for offset, (_bad, field, words) in enumerate(BAD_LINES.values()):
        problem = by_line[2 + offset]
        assert problem.field == field and words in problem.message


def test_validate_reports_several_problems_on_one_line(corpus):
    manifest = write_lines(corpus / "m.jsonl", [row(0, id=3, duration=-1, split=...)])
    assert {(p.line, p.field) for p in validate_manifest(manifest)} == {(1, "id"), (1, "duration"), (1, "split")}


def test_validate_check_audio_compares_durations_and_decodes(corpus):
    tone(corpus / "audio" / "long.wav", seconds=1.0)
    sf.write(corpus / "audio" / "silent.wav", np.zeros(8000, np.float32), SAMPLE_RATE)
    lines = [row(0), row(1, audio_filepath="audio/long.wav"), row(2, audio_filepath="audio/silent.wav")]
    manifest = write_lines(corpus / "m.jsonl", lines)
    assert validate_manifest(manifest) == []
    problems = validate_manifest(manifest, check_audio=True)
    assert [(p.line, p.field) for p in problems] == [(2, "duration"), (3, "audio_filepath")]
    assert "1.000 s" in problems[0].message and "silent" in problems[1].message


def test_cli_validate_clean_manifest(cli, corpus):
    manifest = write_lines(corpus / "m.jsonl", [row(i) for i in range(4)])
    result = cli("data", "validate", manifest)
    assert result.exit_code == 0, result.stderr
    assert "4 utterances" in result.stdout and "train: 2 utterances" in result.stdout
    result = cli("data", "validate", manifest, "--format", "json", "--check-audio")
    summary = json.loads(result.stdout)
    assert result.exit_code == 0 and summary["ok"] is True
    assert summary["splits"]["dev"] == {"utterances": 2, "seconds": 1.0, "hours": round(1 / 3600, 4)}


def test_cli_validate_reports_every_bad_line_and_exits_2(cli, corpus):
    lines = [row(0)] + [bad for bad, _, _ in BAD_LINES.values()]
    manifest = write_lines(corpus / "m.jsonl", lines)
    result = cli("data", "validate", manifest)
    assert result.exit_code == 2
    for line in range(2, 2 + len(BAD_LINES)):
        assert f"{manifest}:{line}: " in result.stdout
    assert "field 'duration': expected a positive number, got 'abc'" in result.stdout
    assert f"{len(BAD_LINES)} line(s)" in result.stderr
    result = cli("data", "validate", manifest, "--format", "json")
    report = json.loads(result.stdout)
    assert result.exit_code == 2 and report["ok"] is False
    assert len({problem["line"] for problem in report["problems"]}) == len(BAD_LINES)


def test_cli_validate_missing_manifest_or_bad_format_exits_2(cli, tmp_path):
    result = cli("data", "validate", tmp_path / "nope.jsonl")
    assert result.exit_code == 2 and "not found" in result.stderr
    result = cli("data", "validate", tmp_path / "nope.jsonl", "--format", "yaml")
    assert result.exit_code == 2 and "--format" in result.stderr


# Property: write_manifest -> read_manifest returns the same entries (any text, ids, extras, splits).
text_st = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
name_st = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=12)
json_scalar = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text_st
entry_st = st.fixed_dictionaries(
    {
        "text": text_st,
        "duration": st.floats(min_value=1e-3, max_value=1e5, allow_nan=False, allow_infinity=False),
        "split": name_st,
        "language": st.sampled_from(["", "sw", "ak", "tw"]),
        "speaker_id": text_st,
        "source": text_st,
        "extra": st.dictionaries(st.sampled_from(["translation", "sentence_id", "note", "ünï"]), json_scalar, max_size=3),
        "audio": st.integers(0, 3),
    }
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(entry_st, min_size=1, max_size=6), st.lists(name_st, min_size=6, max_size=6, unique=True))
def test_write_read_round_trip_property(corpus, specs, ids):
    entries = [
        ManifestEntry(
            id=ids[i],
            audio_filepath=corpus / "audio" / f"utt{spec['audio']}.wav",
            duration=spec["duration"],
            text=spec["text"],
            split=spec["split"],
            language=spec["language"],
            speaker_id=spec["speaker_id"],
            source=spec["source"],
            extra=spec["extra"],
        )
        for i, spec in enumerate(specs)
    ]
    manifest = write_manifest(corpus / "prop.jsonl", entries)
    back = read_manifest(manifest)
    assert back == entries
    assert [entry.line for entry in back] == list(range(1, len(entries) + 1))


def test_eval_split_may_join_several_splits(corpus):
    from speechless.data.manifest import joined, manifest_splits

    path = write_lines(corpus / "all.jsonl", [row(0), row(1), row(2, split="test"), row(3, split="test")])
    by_split = manifest_splits(path, "train", "dev+test")
    assert list(by_split)[:3] == ["train", "dev", "test"]
    assert [e.id for e in joined(by_split, "dev+test")] == ["utt0", "utt2", "utt3"]
    with pytest.raises(UsageError, match="'nope' \\(data.eval_split\\)"):
        manifest_splits(path, "train", "dev+nope")
