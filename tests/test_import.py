"""speechless.data.hf_import: a small local `datasets` folder imported to wav + manifests."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from speechless.core.config import load_config
from speechless.core.errors import UsageError
from speechless.data import hf_import
from speechless.data.audio import SAMPLE_RATE
from speechless.data.hf_import import ImportConfig, import_hf_dataset, normalize_text, safe_name
from speechless.data.manifest import read_manifest, validate_manifest

ROOT = Path(__file__).resolve().parents[1]
TRAVERSAL_IDS = ["../../etc/x", "/etc/passwd_x", "..", "a/../../b", "con:1?*"]


def wav_bytes(seconds: float, rate: int = 22050, channels: int = 1, silent: bool = False) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    mono = np.zeros_like(t) if silent else 0.3 * np.sin(2 * np.pi * 330 * t)
    audio = np.stack([mono] * channels, axis=1) if channels > 1 else mono
    buffer = io.BytesIO()
    sf.write(buffer, audio.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory) -> Path:
    """A DatasetDict saved to disk: train (8 rows, incl. traversal ids, a silent clip, an empty text) + validation."""
    from datasets import Audio, Dataset, DatasetDict, Features, Value

    root = tmp_path_factory.mktemp("hf")
    external = root / "external.flac"
    sf.write(external, 0.2 * np.sin(np.arange(8000) / 5).astype(np.float32), 8000)
    features = Features(
        {"audio": {"bytes": Value("binary"), "path": Value("string")}, "sentence": Value("string"),
         "uid": Value("string"), "spk": Value("string"), "extra_col": Value("int32")}
    )

    def build(rows):
        ds = Dataset.from_dict({key: [row[key] for row in rows] for key in features}, features=features)
        return ds.cast_column("audio", Audio())  # a real Audio feature, without needing torchcodec to encode

    def item(audio: dict, sentence: str, uid: str, spk: str = "s0", extra: int = 0) -> dict:
        return {"audio": audio, "sentence": sentence, "uid": uid, "spk": spk, "extra_col": extra}

    train = [
        item({"bytes": wav_bytes(0.5 + 0.1 * i, channels=1 + i % 2), "path": f"clip{i}.wav"},
             f"  Me  din\u2019de  Kwame {i} \u201cɛnnɛ\u201d ε  ", uid, f"s{i % 2}", i)
        for i, uid in enumerate(TRAVERSAL_IDS)
    ]
    train.append(item({"bytes": wav_bytes(0.5, silent=True), "path": None}, "silent", "quiet"))
    train.append(item({"bytes": wav_bytes(0.5), "path": None}, "  ", "notext"))
    train.append(item({"bytes": None, "path": str(external)}, "from a path", "bypath", "s1"))
    validation = [item({"bytes": wav_bytes(0.4, rate=44100), "path": None}, f"dev {i}", f"v{i}", "s9", i) for i in range(2)]
    DatasetDict({"train": build(train), "validation": build(validation)}).save_to_disk(str(root / "ds"))
    return root / "ds"


def config(dataset: Path, **changes) -> ImportConfig:
    values = dict(
        dataset=str(dataset), splits={"train": "train", "validation": "dev"}, audio_column="audio",
        text_column="sentence", id_column="uid", speaker_column="spk", language="ak", licence="test data",
    )
    values.update(changes)
    return ImportConfig(**values)


def all_files(root: Path) -> list[Path]:
    return [Path(folder) / name for folder, _, names in os.walk(root) for name in names]


def test_import_writes_16k_audio_and_manifests(saved_dataset, tmp_path):
    out = tmp_path / "deep" / "out"
    manifest = import_hf_dataset(config(saved_dataset), out)
    assert manifest == out / "all.jsonl"
    assert validate_manifest(manifest, check_audio=True) == []
    entries = read_manifest(manifest)
    assert len(entries) == 6 + 2  # 5 traversal ids + bypath, 2 dev rows; silent and empty text skipped
    for entry in entries:
        info = sf.info(str(entry.audio_filepath))
        assert info.samplerate == SAMPLE_RATE and info.channels == 1
        assert abs(info.frames / SAMPLE_RATE - entry.duration) < 1e-3
        assert entry.audio_filepath.parent == out / "audio" / entry.split
        assert entry.language == "ak" and entry.source == str(saved_dataset)
    first = entries[0]
    assert first.text == 'Me din\'de Kwame 0 "ɛnnɛ" ɛ'
    assert first.duration == pytest.approx(0.5, abs=1e-3) and first.speaker_id == "s0"
    assert first.extra["orig_id"] == "../../etc/x"
    by_split = {split: [e.id for e in read_manifest(out / f"{split}.jsonl")] for split in ("train", "dev")}
    assert by_split["dev"] == ["v0", "v1"] and len(by_split["train"]) == 6
    report = json.loads((out / "import_report.json").read_text())
    assert report["splits"]["train"] == {"target": "train", "written": 6, "skipped: silent audio": 1, "skipped: no transcription": 1}
    assert yaml.safe_load((out / "resolved_config.yaml").read_text())["licence"] == "test data"


def test_dataset_ids_can_never_write_outside_out_dir(saved_dataset, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    import_hf_dataset(config(saved_dataset, splits={"train": "train"}), out)
    outside = [path for path in all_files(tmp_path) if not path.is_relative_to(out)]
    assert outside == []
    names = {path.name for path in (out / "audio" / "train").iterdir()}
    assert len(names) == 6 and all(".." not in name.replace(".wav", "") and not name.startswith(".") for name in names)


@pytest.mark.parametrize("raw", TRAVERSAL_IDS + ["", "x" * 500, ".hidden", "ok-name_1.2"])
def test_safe_name(raw):
    name = safe_name(raw)
    assert name and "/" not in name and "\\" not in name and not name.startswith(".") and len(name) <= 91
    assert (Path("/root/out") / f"{name}.wav").parent == Path("/root/out")
    if raw == "ok-name_1.2":
        assert name == raw
    assert safe_name("a/b") != safe_name("a_b")  # sanitised ids stay distinct


def test_rerun_skips_rows_already_written(saved_dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    manifest = import_hf_dataset(config(saved_dataset), out)
    before = manifest.read_bytes()
    victim = read_manifest(manifest)[2].audio_filepath
    victim.unlink()
    decoded = []
    real = hf_import.decode_audio
    monkeypatch.setattr(hf_import, "decode_audio", lambda data, name: decoded.append(name) or real(data, name))
    assert import_hf_dataset(config(saved_dataset), out) == manifest
    assert manifest.read_bytes() == before and victim.is_file()
    assert len(decoded) == 1 + 1  # the deleted row, plus the silent row (never written, so tried again)
    report = json.loads((out / "import_report.json").read_text())
    assert report["splits"]["train"]["resumed"] == 5 and report["splits"]["validation"]["resumed"] == 2


def test_max_items_and_default_ids(saved_dataset, tmp_path):
    manifest = import_hf_dataset(config(saved_dataset, id_column=None, speaker_column=None, max_items=1), tmp_path)
    entries = read_manifest(manifest)
    assert [e.id for e in entries] == ["train-0000000", "validation-0000000"]
    assert all(e.speaker_id == "" and "orig_id" not in e.extra for e in entries)


def test_bad_column_and_split_are_usage_errors(saved_dataset, tmp_path):
    with pytest.raises(UsageError, match="text_column 'transcription' not in the dataset; its columns: audio, sentence"):
        import_hf_dataset(config(saved_dataset, text_column="transcription"), tmp_path)
    with pytest.raises(UsageError, match="no split 'test'; it has train, validation"):
        import_hf_dataset(config(saved_dataset, splits={"test": "test"}), tmp_path)
    with pytest.raises(UsageError, match="target split"):
        load_config(ImportConfig, None, ["dataset=x", "splits={train: ../up}"])


def test_cli_import(cli, saved_dataset, tmp_path):
    cfg = tmp_path / "import.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": str(saved_dataset), "text_column": "sentence", "splits": {"validation": "dev"}}))
    result = cli("data", "import", "-c", cfg, "--out", tmp_path / "out", "--format", "json", "--set", "language=tw")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["utterances"] == 2 and summary["splits"]["dev"]["utterances"] == 2
    assert summary["report"]["validation"]["written"] == 2
    assert read_manifest(summary["manifest"])[0].language == "tw"
    result = cli("data", "import", "-c", cfg, "--out", tmp_path / "out", "--set", "audio_column=wave")
    assert result.exit_code == 2 and "audio_column 'wave'" in result.stderr


def test_normalize_text_keeps_twi_letters():
    assert normalize_text("  Ɔkɔɔ  fie\u2019 \u201cnnɛ\u201d\n") == "Ɔkɔɔ fie' \"nnɛ\""
    assert normalize_text("\u0192\u03b5\u037b `x\u00b4") == "\u0192ɛɔ 'x'"
    assert normalize_text("e\u0301") == "\u00e9"  # NFC


@pytest.mark.parametrize("path", sorted((ROOT / "data_manifests").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_import_configs_are_valid(path):
    cfg = load_config(ImportConfig, path)
    assert cfg.dataset and cfg.splits and cfg.licence


def test_local_metadata_table_with_relative_paths(tmp_path):
    raw = tmp_path / "raw"
    (raw / "clips").mkdir(parents=True)
    for i in range(2):
        (raw / "clips" / f"v{i}.wav").write_bytes(wav_bytes(0.3, rate=24000))
    (raw / "metadata.csv").write_text("file_name,transcription\nclips/v0.wav,ɔkɔɔ 0\nclips/v1.wav,ɔkɔɔ 1\n", encoding="utf-8")
    cfg = ImportConfig(dataset=str(raw / "metadata.csv"), audio_column="file_name", text_column="transcription", id_column="file_name")
    entries = read_manifest(import_hf_dataset(cfg, tmp_path / "out"))
    assert [e.text for e in entries] == ["ɔkɔɔ 0", "ɔkɔɔ 1"]
    assert [e.extra["orig_id"] for e in entries] == ["clips/v0.wav", "clips/v1.wav"]
    assert all(e.duration == pytest.approx(0.3, abs=1e-3) for e in entries)


def test_missing_local_dataset_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="local folder not found"):
        import_hf_dataset(ImportConfig(dataset=str(tmp_path / "nope")), tmp_path / "out")
