"""Stage 1 end to end on a tiny corpus: train, outputs, tokenize == JSONL, resume, push/download, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import TINY_ENCODER
from conftest import stage1_overrides as overrides

from speechless.core.config import load_config
from stages.stage1_rvq import Stage1Config, train


@pytest.fixture(scope="session")
def trained(stage1_trained) -> Path:
    return stage1_trained


def file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "work" not in p.relative_to(folder).parts}


def test_outputs_of_a_run(trained):
    for name in ("model.safetensors", "model.best.safetensors", "model.averaged.safetensors", "config.json",
                 "metrics.json", "resolved_config.yaml", "provenance.json", "README.md", "tokens/train.jsonl", "tokens/dev.jsonl", "tokens/test.jsonl"):
        assert (trained / name).is_file(), name
    config = json.loads((trained / "config.json").read_text())
    assert config["rvq_dim"] == 32 and config["num_quantizers"] == 4 and config["codebook_size"] == 32
    assert config["encoder"]["weights_sha256"] and config["encoder"]["hook_module"] == "output_proj"
    ev = json.loads((trained / "metrics.json").read_text())["eval"]
    assert ev["mse"] > 0 and 0 < ev["cosine"] <= 1
    assert len(ev["utilization"]) == 4 and all(0 < u <= 1 for u in ev["utilization"])
    assert len(ev["perplexity"]) == 4 and all(1 <= p <= 32 for p in ev["perplexity"])
    provenance = json.loads((trained / "provenance.json").read_text())
    assert len(provenance["manifest"]["sha256"]) == 64 and provenance["encoder"]["weights_sha256"] == config["encoder"]["weights_sha256"]
    assert provenance["code_version"].startswith("speechless")
    card = (trained / "README.md").read_text()
    assert f"{ev['mse']:.4f}" in card and "utilization" in card
    rows = [json.loads(line) for line in (trained / "tokens" / "dev.jsonl").read_text().splitlines()]
    assert rows and all(len(r["codes"]) == 4 and all(len(level) == r["frames"] for level in r["codes"]) for r in rows)
    assert not list(trained.rglob("*.tmp")), "temporary files left behind"


def test_history_starts_with_the_initialised_codebooks(trained, corpus, encoder_json, tmp_path):
    history = json.loads((trained / "metrics.json").read_text())["history"]
    assert history[0]["step"] == 0 and "train_loss" not in history[0] and len(history[0]["eval"]["utilization"]) == 4
    assert history[1]["step"] == 1 and "train_loss" in history[1]
    # no fine-tuning: the initialised codebooks are the final, best and averaged weights, with the step-0 figures
    cfg = load_config(Stage1Config, None, overrides(corpus, encoder_json, tmp_path / "run", tmp_path / "store",
                                                 "train.steps=0"))
    shutil.copytree(trained / "work" / "features", tmp_path / "run" / "work" / "features")
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["best_step"] == 0 and [h["step"] for h in metrics["history"]] == [0]
    assert metrics["eval"]["mse"] == metrics["history"][0]["eval"]["mse"] == history[0]["eval"]["mse"]
    weights = {name: (tmp_path / "run" / name).read_bytes() for name in ("model.safetensors", "model.best.safetensors")}
    assert weights["model.safetensors"] == weights["model.best.safetensors"]


def test_recorded_figures_are_those_of_the_saved_weights(trained, corpus):
    """The final (and, when the best step is the last, the best) figures come from the last step's evaluation in
    training: `speechless stage1 eval` of the saved weights on the eval split gives them again."""
    from speechless.speech.tokenizer import evaluate_tokenizer

    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["history"][-1]["step"] == 6 and metrics["eval_variants"]["final"] == metrics["history"][-1]["eval"]
    for name in ("final", "best", "averaged"):
        fresh = evaluate_tokenizer(str(trained), str(corpus), "dev", weights=name)
        for key, value in metrics["eval_variants"][name].items():  # equal up to the order of float sums
            assert fresh[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)


def test_tokenize_gives_the_codes_stage1_wrote(trained, corpus, cli, tmp_path):
    written = {json.loads(l)["id"]: json.loads(l) for l in (trained / "tokens" / "dev.jsonl").read_text().splitlines()}
    result = cli("tokenize", "audio", "--tokenizer", trained, "--manifest", corpus, "--split", "dev", "--format", "json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {r["id"] for r in rows} == set(written)
    for row in rows:
        assert row["codes"] == written[row["id"]]["codes"] and row["codes_str"] == written[row["id"]]["codes_str"]
    # one file on its own, batched with nothing else, gives the same codes (fixed-shape batches)
    entry = next(json.loads(l) for l in corpus.read_text().splitlines() if json.loads(l)["split"] == "dev")
    single = cli("tokenize", "audio", corpus.parent / entry["audio_filepath"], "--tokenizer", trained, "--format", "json")
    assert single.exit_code == 0, single.stderr
    assert json.loads(single.stdout)["codes"] == written[entry["id"]]["codes"]


def test_long_audio_is_split_into_windows(trained, tmp_path, cli):
    rate = 22050
    t = np.arange(int(rate * 65)) / rate
    sf.write(tmp_path / "long.wav", (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(t))).astype(np.float32), rate)
    result = cli("tokenize", "audio", tmp_path / "long.wav", "--tokenizer", trained, "--format", "json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)
    assert len(row["windows"]) == 3 and all(end - start <= 30 for start, end, _ in row["windows"])
    assert row["frames"] == sum(frames for _, _, frames in row["windows"]) == len(row["codes"][0])
    assert abs(row["frames"] - 65 * 25) <= 3


def test_resume_after_interruption_matches_an_uninterrupted_run(trained, corpus, encoder_json, tmp_path, monkeypatch):
    from speechless.speech.rvq import SpeechRVQ

    cfg = load_config(Stage1Config, None, overrides(corpus, encoder_json, tmp_path / "run", tmp_path / "store"))
    shutil.copytree(trained / "work" / "features", tmp_path / "run" / "work" / "features")  # same features, faster
    real_step, calls = SpeechRVQ.train_step, {"n": 0}

    def dying_step(self, x, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed after the step-2 checkpoint, mid step 4
        return real_step(self, x, **kwargs)

    monkeypatch.setattr(SpeechRVQ, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert json.loads((tmp_path / "run" / "work" / "state.json").read_text())["step"] == 2
    assert not (tmp_path / "run" / "model.safetensors").exists()
    monkeypatch.setattr(SpeechRVQ, "train_step", real_step)
    train(cfg)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
    assert (tmp_path / "run" / "tokens" / "train.jsonl").read_bytes() == (trained / "tokens" / "train.jsonl").read_bytes()


def test_two_pushes_and_download_v1_byte_for_byte(corpus, encoder_json, trained, tmp_path, cli):
    store = tmp_path / "store"
    runs = []
    for seed in (1, 2):
        out = tmp_path / f"run{seed}"
        shutil.copytree(trained / "work" / "features", out / "work" / "features")
        args = ["stage1", "train", "--push", "--format", "json"]
        for item in overrides(corpus, encoder_json, out, store, f"run.seed={seed}"):
            args += ["--set", item]
        result = cli(*args)
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["pushed"] == f"stage1@v{seed}"
        runs.append(file_digests(out))
    assert runs[0]["model.safetensors"] != runs[1]["model.safetensors"]
    result = cli("hub", "download", "stage1@v1", "--to", tmp_path / "v1", "--store-root", store)
    assert result.exit_code == 0, result.stderr
    assert file_digests(tmp_path / "v1") == runs[0]


# ----------------------------------------------------------------------------------------------------- bad input

def bad_manifest(tmp_path: Path, corpus: Path, mutate) -> Path:
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    for row in rows:
        row["audio_filepath"] = str(corpus.parent / row["audio_filepath"])
    rows = mutate(rows, tmp_path)
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def with_audio(make):
    def mutate(rows, tmp_path):
        target = next(r for r in rows if r["split"] == "train")
        target["audio_filepath"] = str(make(tmp_path))
        return rows
    return mutate


def corrupt(tmp_path):
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    return tmp_path / "corrupt.wav"


def written(name, samples):
    def make(tmp_path):
        sf.write(tmp_path / name, samples, 16000, subtype="FLOAT")
        return tmp_path / name
    return make


BAD_MANIFESTS = {
    "malformed line": (lambda rows, _: rows[:3] + ["{not json"] + rows[3:], r"bad.jsonl:4"),
    "missing field": (lambda rows, _: [{k: v for k, v in r.items() if k != "duration"} if i == 1 else r for i, r in enumerate(rows)], r"bad.jsonl:2.*duration"),
    "missing audio": (lambda rows, _: [dict(r, audio_filepath="/nowhere/x.wav") if i == 2 else r for i, r in enumerate(rows)], r"bad.jsonl:3.*/nowhere/x.wav"),
    "corrupt audio": (with_audio(corrupt), r"corrupt.wav"),
    "empty audio": (with_audio(written("empty.wav", np.zeros(0, np.float32))), r"empty.wav"),
    "silent audio": (with_audio(written("silent.wav", np.zeros(16000, np.float32))), r"silent.wav"),
    "nan audio": (with_audio(written("nan.wav", np.full(16000, np.nan, np.float32))), r"nan.wav"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_or_audio_gives_one_clear_line(case, corpus, encoder_json, tmp_path, cli):
    mutate, pattern = BAD_MANIFESTS[case]
    manifest = bad_manifest(tmp_path, corpus, mutate)
    out = tmp_path / "run"
    args = ["stage1", "train"]
    for item in overrides(manifest, encoder_json, out, tmp_path / "store"):
        args += ["--set", item]
    result = cli(*args)
    assert result.exit_code == 2, (case, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and __import__("re").search(pattern, result.stderr.replace("\n", "")), result.stderr
    assert not list(out.rglob("*.tmp")) and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("setting, pattern", [
    ("train.stepz=3", r"unknown key 'train.stepz'.*did you mean 'train.steps'"),
    ("train.steps=many", r"key 'train.steps'"),
    ("rvq.codebook_size=-4", r"key 'rvq.codebook_size'"),
])
def test_bad_config_exits_2(setting, pattern, cli, tmp_path):
    result = cli("stage1", "train", "--set", setting, "--set", f"run.out_dir={tmp_path / 'run'}")
    assert result.exit_code == 2
    assert __import__("re").search(pattern, result.stderr.replace("\n", "")), result.stderr
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_dimension_is_refused(trained, corpus, tmp_path, cli):
    other = tmp_path / "other"
    shutil.copytree(trained, other, ignore=shutil.ignore_patterns("work"))
    config = json.loads((other / "config.json").read_text())
    wide = dict(TINY_ENCODER, hidden_size=64)
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    config["encoder"]["source"] = str(tmp_path / "wide.json")
    from speechless.speech.encoders import EncoderConfig, load_encoder

    config["encoder"]["weights_sha256"] = load_encoder(EncoderConfig(source=str(tmp_path / "wide.json"))).revision
    (other / "config.json").write_text(json.dumps(config))
    result = cli("tokenize", "audio", "--tokenizer", other, "--manifest", corpus, "--split", "dev")
    assert result.exit_code == 2 and "dim 32" in result.stderr and "64" in result.stderr, result.stderr


def test_encoder_weights_changed_is_refused(trained, corpus, tmp_path, cli):
    other = tmp_path / "other"
    shutil.copytree(trained, other, ignore=shutil.ignore_patterns("work"))
    config = json.loads((other / "config.json").read_text())
    config["encoder"]["random_seed"] = 99
    (other / "config.json").write_text(json.dumps(config))
    result = cli("tokenize", "audio", "--tokenizer", other, "--manifest", corpus, "--split", "dev")
    assert result.exit_code == 2 and "weights differ" in result.stderr, result.stderr


def test_corrupt_checkpoint_weights_runtime_error(trained, corpus, tmp_path, cli):
    other = tmp_path / "other"
    shutil.copytree(trained, other, ignore=shutil.ignore_patterns("work"))
    data = (other / "model.safetensors").read_bytes()
    (other / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = cli("tokenize", "audio", "--tokenizer", other, "--manifest", corpus, "--split", "dev")
    assert result.exit_code == 1 and "model.safetensors" in result.stderr, result.stderr


def test_report_reads_the_tokens_of_a_joined_eval_split(trained, tmp_path):
    from speechless.core.report import stage1_plots

    folder = tmp_path / "stage1"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("work"))
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["eval"]["split"] = "dev+test"
    (folder / "metrics.json").write_text(json.dumps(metrics))
    images = stage1_plots(folder, tmp_path / "report")
    assert (tmp_path / "report" / "stage1_code_usage.png").is_file()
    assert len(images) == 3
