"""The token string format and token JSONL rows."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speechless.core.errors import UsageError
from speechless.speech.tokens import (
    codes_to_string,
    hex_width,
    read_token_jsonl,
    string_to_codes,
    token_row,
    write_token_jsonl,
)


@pytest.mark.parametrize("size, width", [(2, 1), (16, 1), (17, 2), (256, 2), (2048, 3), (4096, 3), (4097, 4)])
def test_hex_width(size, width):
    assert hex_width(size) == width


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8).flatmap(lambda q: st.integers(2, 5000).flatmap(
    lambda k: st.tuples(st.just(q), st.just(k), st.lists(st.lists(st.integers(0, k - 1), min_size=q, max_size=q), max_size=20)))))
def test_string_round_trip(case):
    levels, size, frames = case
    text = codes_to_string(frames, size)
    assert string_to_codes(text, levels, size) == frames
    assert len(text.split()) == len(frames)


@pytest.mark.parametrize("text, needle", [("0a", "characters"), ("zzz" * 8, "hexadecimal"), ("fff" * 8, ">= codebook size")])
def test_malformed_strings(text, needle):
    with pytest.raises(UsageError, match=needle):
        string_to_codes(text, 8, 2048)


def test_rows_round_trip_and_revision_check(tmp_path):
    codes = torch.randint(0, 2048, (5, 8))
    row = token_row("u1", "hello", codes, [[0.0, 0.2, 5]], 2048, "abc123")
    assert row["codes"] == codes.T.tolist() and len(row["codes"]) == 8 and row["frames"] == 5
    assert string_to_codes(row["codes_str"], 8, 2048) == codes.tolist()
    path = tmp_path / "t.jsonl"
    write_token_jsonl(path, [row])
    assert read_token_jsonl(path, expect_revision="abc123") == [json.loads(json.dumps(row))]
    with pytest.raises(UsageError, match=r"t.jsonl:1: tokens come from stage-1 revision abc123"):
        read_token_jsonl(path, expect_revision="other")


def test_half_written_token_file_names_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    good = json.dumps(token_row("u1", "x", torch.zeros(2, 8, dtype=torch.long), [], 2048, "r"))
    path.write_text(good + "\n" + good[: len(good) // 2])
    with pytest.raises(UsageError, match=r"t.jsonl:2: not valid JSON"):
        read_token_jsonl(path)


def test_tokenize_audio_ids_are_unique_when_two_folders_hold_the_same_file_name(tmp_path):
    from speechless.core.errors import UsageError
    from speechless.speech.tokenizer import entries_for_files

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.wav").write_bytes(b"")
    (tmp_path / "a" / "x.flac").write_bytes(b"")
    (tmp_path / "y.wav").write_bytes(b"")
    entries = entries_for_files([tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav", tmp_path / "y.wav"])
    assert [e.id for e in entries] == ["a/x", "b/x", "y"]
    same_folder = entries_for_files([tmp_path / "a" / "x.wav", tmp_path / "a" / "x.flac"])
    assert [e.id for e in same_folder] == ["x.wav", "x.flac"]
    with pytest.raises(UsageError, match="given twice"):
        entries_for_files([tmp_path / "y.wav", tmp_path / "y.wav"])
