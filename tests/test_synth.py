"""speechless.data.synth: sentence grammar and a tiny espeak-ng corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from speechless.core.config import load_config
from speechless.core.errors import UsageError
from speechless.data import synth
from speechless.data.audio import SAMPLE_RATE
from speechless.data.manifest import read_manifest
from speechless.data.synth import SynthConfig, VoiceConfig, generate_sentences, split_counts, synthesize_corpus

ROOT = Path(__file__).resolve().parents[1]


def test_sentences_are_distinct_deterministic_and_translated():
    sentences = generate_sentences(300, seed=0)
    assert len({s.text for s in sentences}) == 300
    assert sentences == generate_sentences(300, seed=0)
    assert generate_sentences(20, seed=0) == sentences[:20]  # a smaller n is a prefix
    assert generate_sentences(20, seed=1) != sentences[:20]
    for s in sentences:
        assert s.language == "sw" and s.text.endswith(".") and s.translation.endswith(".")
        assert s.translation != s.text and s.subject and s.verb and s.object and s.tense in ("present", "past", "future")
        assert s.text[0].isupper() and s.translation[0].isupper()


def test_known_sentence_shapes():
    pairs = {(s.text, s.translation) for s in generate_sentences(47310, seed=0)}
    assert ("Mama anapika chakula.", "Mother is cooking food.") in pairs
    assert ("Watoto walikunywa maji jana.", "The children drank water yesterday.") in pairs
    assert ("Mimi nitakula wali nyumbani kesho.", "I will eat rice at home tomorrow.") in pairs


def test_english_sentences_translate_to_themselves():
    sentences = generate_sentences(10, seed=3, language="en")
    assert all(s.text == s.translation and s.language == "en" for s in sentences)
    assert [s.translation for s in sentences] == [s.translation for s in generate_sentences(10, seed=3, language="sw")]


def test_bad_sentence_requests():
    with pytest.raises(UsageError, match="num_sentences"):
        generate_sentences(10**6)
    with pytest.raises(UsageError, match="language"):
        generate_sentences(5, language="tw")


def test_split_counts():
    assert split_counts(400, (0.7, 0.15, 0.15)) == (280, 60, 60)
    assert split_counts(6, (0.7, 0.15, 0.15)) == (4, 1, 1)
    assert split_counts(10, (1.0, 0.0, 0.0)) == (10, 0, 0)


def test_config_validation():
    with pytest.raises(UsageError, match="split_ratios"):
        load_config(SynthConfig, None, ["split_ratios=[0.5, 0.2, 0.2]"])
    with pytest.raises(UsageError, match="distinct 'name'"):
        load_config(SynthConfig, None, ["voices=[{variant: m1}, {variant: m1, speed: 120}]"])
    with pytest.raises(UsageError, match="voices_per_sentence=3 but only 2 voice"):
        load_config(SynthConfig, None, ["voices=[{variant: m1}, {variant: f2}]", "voices_per_sentence=3"])
    demo = load_config(SynthConfig, ROOT / "configs" / "data" / "demo_synth.yaml")
    assert demo.num_sentences == 500 and demo.voices_per_sentence is None and len(demo.voices) == 2 and demo.language == "sw"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    voices = [VoiceConfig(variant="m1", speed=170), VoiceConfig(variant="f4", speed=160, pitch=70)]
    manifest = synthesize_corpus(out, num_sentences=6, voices=voices, seed=0)
    return out, manifest


def test_tiny_corpus_audio_matches_manifest(tiny):
    out, manifest = tiny
    assert manifest == out / "all.jsonl"
    entries = read_manifest(manifest)
    assert len(entries) == 12
    for entry in entries:
        info = sf.info(str(entry.audio_filepath))
        assert info.samplerate == SAMPLE_RATE and info.channels == 1
        assert abs(info.frames / SAMPLE_RATE - entry.duration) < 1e-3
        assert 0.5 < entry.duration < 10
        assert entry.extra["translation"] and entry.extra["sentence_id"]
        assert entry.source == "synthetic:espeak-ng" and entry.language == "sw"
        assert entry.audio_filepath.is_relative_to(out / "audio" / entry.speaker_id)


def test_tiny_corpus_splits_are_disjoint_by_sentence_and_every_voice_speaks_everything(tiny):
    out, manifest = tiny
    entries = read_manifest(manifest)
    texts_by_split: dict[str, set[str]] = {}
    for entry in entries:
        texts_by_split.setdefault(entry.split, set()).add(entry.text)
    assert set(texts_by_split) == {"train", "dev", "test"}
    assert sum(len(texts) for texts in texts_by_split.values()) == 6  # no text in two splits
    assert len(texts_by_split["train"]) == 4
    voices_by_text: dict[str, set[str]] = {}
    for entry in entries:
        voices_by_text.setdefault(entry.text, set()).add(entry.speaker_id)
    assert all(voices == {"m1", "f4"} for voices in voices_by_text.values())
    for split in ("train", "dev", "test"):
        assert {e.id for e in read_manifest(out / f"{split}.jsonl")} == {e.id for e in entries if e.split == split}
    sentences = [json.loads(line) for line in (out / "sentences.jsonl").read_text().splitlines()]
    assert len(sentences) == 6 and {s["split"] for s in sentences} == {"train", "dev", "test"}
    assert (out / "resolved_config.yaml").is_file()


def test_voices_per_sentence_takes_the_voices_in_turn(tmp_path):
    voices = [VoiceConfig(variant="m1", speed=170), VoiceConfig(variant="f4", speed=160), VoiceConfig(variant="m3", speed=180)]
    entries = read_manifest(synthesize_corpus(tmp_path, num_sentences=6, voices=voices, voices_per_sentence=2, seed=0))
    sentences = [json.loads(line) for line in (tmp_path / "sentences.jsonl").read_text().splitlines()]
    voices_of = {row["sentence_id"]: [e.speaker_id for e in entries if e.extra["sentence_id"] == row["sentence_id"]] for row in sentences}
    assert [sorted(voices_of[row["sentence_id"]]) for row in sentences] == [
        ["f4", "m1"], ["m1", "m3"], ["f4", "m3"], ["f4", "m1"], ["m1", "m3"], ["f4", "m3"]]
    assert {voice: sum(voice in spoken for spoken in voices_of.values()) for voice in ("m1", "f4", "m3")} == {"m1": 4, "f4": 4, "m3": 4}
    assert {e.split for e in entries} == {"train", "dev", "test"}


def test_rerun_resumes_without_resynthesizing(tiny, monkeypatch):
    out, manifest = tiny
    before = manifest.read_bytes()
    victim = read_manifest(manifest)[3].audio_filepath
    victim.unlink()
    calls = []
    real = synth._synthesize_one
    monkeypatch.setattr(synth, "_synthesize_one", lambda *args: calls.append(args[-1]) or real(*args))
    voices = [VoiceConfig(variant="m1", speed=170), VoiceConfig(variant="f4", speed=160, pitch=70)]
    assert synthesize_corpus(out, num_sentences=6, voices=voices, seed=0) == manifest
    assert calls == [victim]  # only the missing file was synthesized again
    assert manifest.read_bytes() == before


def test_cli_synth_json_summary(cli, tmp_path):
    result = cli(
        "data", "synth", "--out", tmp_path / "c", "--format", "json",
        "--set", "num_sentences=3", "--set", "voices=[{variant: m3, speed: 200}]", "--set", "language=en",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["utterances"] == 3 and set(summary["splits"]) == {"train", "dev", "test"}
    assert summary["manifest"] == str(tmp_path / "c" / "all.jsonl")
    assert "num_sentences: 3" in (tmp_path / "c" / "resolved_config.yaml").read_text()


def test_missing_espeak_is_exit_2_with_install_hint(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    result = cli("data", "synth", "--out", tmp_path / "c", "--set", "num_sentences=3")
    assert result.exit_code == 2
    assert "apt-get install espeak-ng" in result.stderr


def test_unknown_voice_variant_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="espeak-ng --voices=variant"):
        synthesize_corpus(tmp_path, num_sentences=3, voices=["nosuchvoice"])
