"""Stage 2 end to end on a tiny fake stage-1 run: train, outputs, push, generate (CLI), resume, version refusal, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_t2s import TINY_BACKBONE, make_fake_stage1, one_thread  # noqa: F401  (fixture)

from speechless.core.config import load_config
from speechless.core.store import open_store
from stages.stage2_t2s import Stage2Config, train


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stage2")
    make_fake_stage1(root / "stage1", sentences=20)
    open_store(root=root / "store").push("stage1", root / "stage1", message="fake")
    (root / "backbone.json").write_text(json.dumps(TINY_BACKBONE))
    return root


def overrides(base: Path, out: Path, *extra: str) -> list[str]:
    return ["data.stage1=stage1@v1", f"store.root={base / 'store'}", f"run.out_dir={out}", f"model.backbone={base / 'backbone.json'}",
            "model.head_rank=8", "model.tokenizer_vocab_size=40", "train.steps=12", "train.batch_size=8", "train.warmup_steps=2",
            "train.eval_every=6", "train.checkpoint_every=4", "probe.steps=20", "probe.dim=32", "probe.conv_layers=1",
            "generate.max_seconds=2", "train.learning_rate=2e-3", "train.min_lr_ratio=0.05", "train.weight_decay=0.01",
            "model.max_text_tokens=192", "model.dropout=0.0", *extra]


TRAINED = ("run.push=true", "model.progress_buckets=8")  # the shared run (progress conditioning on, as in the demo)


@pytest.fixture(scope="module")
def trained(base) -> Path:
    cfg = load_config(Stage2Config, None, overrides(base, base / "run", *TRAINED))
    summary = train(cfg)
    assert summary["pushed"] == "stage2@v1"
    return base / "run"


def test_outputs_of_a_run(trained, base):
    for name in ("model.safetensors", "model.best.safetensors", "config.json", "tokenizer.json", "metrics.json",
                 "resolved_config.yaml", "provenance.json", "README.md", "probe/model.safetensors", "probe/config.json",
                 "tokens/generated_test.jsonl"):
        assert (trained / name).is_file(), name
    metrics = json.loads((trained / "metrics.json").read_text())
    ev = metrics["eval"]
    for key in ("probe_cer_real", "probe_cer_generated", "duration", "code_usage", "dtw_cosine", "dtw_centered_cosine"):
        assert key in ev, key
    assert 0 <= ev["probe_cer_real"] and 0 <= ev["probe_cer_generated"]
    assert len(ev["code_usage"]["generated"]["utilization"]) == 4 and ev["utterances"] == 8
    assert len(metrics["eval_loss"]["level_loss"]) == 4 and metrics["best"]["step"] in (6, 12)
    revision = json.loads((base / "stage1" / "tokens" / "test.jsonl").read_text().splitlines()[0])["stage1_revision"]
    provenance = json.loads((trained / "provenance.json").read_text())
    assert provenance["stage1"]["version"] == "stage1@v1" and provenance["stage1"]["revision"] == revision
    assert provenance["code_version"].startswith("speechless") and len(provenance["weights_sha256"]["final"]) == 64
    config = json.loads((trained / "config.json").read_text())
    assert config["stage1"]["revision"] == revision and config["delays"] == [0, 1, 2, 3] and config["speakers"] == ["s1", "s2"]
    # the duration model behind progress conditioning: per speaker, fitted on the training frames (s2 speaks slower)
    duration = config["duration_model"]
    assert set(duration) == {"", "s1", "s2"} and duration["s2"][0] > duration["s1"][0] > 0
    rows = [json.loads(line) for line in (trained / "tokens" / "generated_test.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["stage1_revision"] == revision and len(r["codes"]) == 4 for r in rows)
    card = (trained / "README.md").read_text()
    assert "stage1@v1" in card and f"{ev['probe_cer_generated']:.4f}" in card
    assert not list(trained.rglob("*.tmp")) and not list(trained.rglob("*.pt"))


def test_resume_after_interruption_matches_an_uninterrupted_run(trained, base, tmp_path, monkeypatch):
    from speechless.t2s.model import T2SModel

    cfg = load_config(Stage2Config, None, overrides(base, tmp_path / "run", *TRAINED))
    real_loss, calls = T2SModel.loss, {"n": 0}

    def dying_loss(self, batch):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 7:
                raise KeyboardInterrupt  # killed mid step 7, after the step-4 checkpoint
        return real_loss(self, batch)

    monkeypatch.setattr(T2SModel, "loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert json.loads((tmp_path / "run" / "work" / "state.json").read_text())["step"] == 4
    assert not (tmp_path / "run" / "model.safetensors").exists()
    monkeypatch.setattr(T2SModel, "loss", real_loss)
    assert train(cfg)["pushed"] == "stage2@v2"  # versioned: the second push is the next version
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
    assert open_store(root=base / "store").resolve("stage2@v1").revision != ""


def test_tokenize_text_prints_codes(trained, base, cli):
    result = cli("tokenize", "text", "Naku gabu mugu.", "Taka gifina.", "--model", "stage2@v1", "--store-root", base / "store",
                 "--max-seconds", "2")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(len(group) == 4 * 2 for line in lines for group in line.split())  # 4 codes x 2 hex digits
    single = cli("tokenize", "text", "Naku gabu mugu.", "--model", trained, "--max-seconds", "2")
    as_json = cli("tokenize", "text", "Naku gabu mugu.", "--model", trained, "--stage1", base / "stage1", "--format", "json",
                  "--max-seconds", "2")
    assert as_json.exit_code == 0, as_json.stderr
    row = json.loads(as_json.stdout)
    # seeded sampling: the same call gives the same codes
    assert row["codes_str"] == single.stdout.strip() and row["source"] == "stage2" and row["frames"] == len(row["codes"][0]) <= 50


def write_texts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


TEXTS = ["Naku gabu mugu.", "Taka gifina.", "Gufifa ki du gide.", "Mugu megaka.", "Du gide taka."]


def test_generate_corpus_resumes_from_a_half_written_file(trained, tmp_path, cli):
    texts = write_texts(tmp_path / "texts.jsonl", TEXTS)
    full = cli("stage2", "generate", "-i", texts, "-o", tmp_path / "a.jsonl", "--model", trained, "--batch-size", "2", "--max-seconds", "2",
                "--temperature", "0")
    assert full.exit_code == 0, full.stderr
    expected = (tmp_path / "a.jsonl").read_text()
    lines = expected.splitlines(keepends=True)
    assert len(lines) == 5 and not (tmp_path / "a.jsonl.partial").exists()
    # an interrupted run left two complete rows and half of the third
    (tmp_path / "b.jsonl.partial").write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    resumed = cli("stage2", "generate", "-i", texts, "-o", tmp_path / "b.jsonl", "--model", trained, "--batch-size", "2",
                  "--max-seconds", "2", "--temperature", "0", "--format", "json")
    assert resumed.exit_code == 0, resumed.stderr
    assert "half-written" in resumed.stderr and json.loads(resumed.stdout)["resumed"] == 2
    assert (tmp_path / "b.jsonl").read_text() == expected  # greedy: exactly the rows of the uninterrupted run
    assert not (tmp_path / "b.jsonl.partial").exists()


def test_stage1_version_mismatch_is_refused(trained, base, tmp_path, cli):
    other = make_fake_stage1(tmp_path / "other_stage1", sentences=6, seed=1)
    result = cli("tokenize", "text", "Naku gabu.", "--model", trained, "--stage1", other)
    assert result.exit_code == 2 and "stage-1 mismatch" in result.stderr, result.stderr
    texts = write_texts(tmp_path / "texts.jsonl", TEXTS[:2])
    result = cli("stage2", "generate", "-i", texts, "-o", tmp_path / "out.jsonl", "--model", trained, "--stage1", other)
    assert result.exit_code == 2 and "stage-1 mismatch" in result.stderr and not (tmp_path / "out.jsonl").exists()
    result = cli("stage2", "eval", "--model", trained, "--stage1", other)
    assert result.exit_code == 2 and "stage-1 mismatch" in result.stderr


def test_token_file_of_another_stage1_version_is_refused_for_training(base, tmp_path, cli):
    stage1 = tmp_path / "stage1"
    shutil.copytree(base / "stage1", stage1)
    other = make_fake_stage1(tmp_path / "other", sentences=6, seed=1)
    shutil.copy(other / "tokens" / "train.jsonl", stage1 / "tokens" / "train.jsonl")
    args = ["stage2", "train"]
    for item in overrides(base, tmp_path / "run", f"data.stage1={stage1}"):
        args += ["--set", item]
    result = cli(*args)
    assert result.exit_code == 2 and "train.jsonl:1" in result.stderr and "stage-1 revision" in result.stderr, result.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_partial_output_of_another_model_is_refused(trained, tmp_path, cli):
    texts = write_texts(tmp_path / "texts.jsonl", TEXTS[:2])
    row = {"id": "t0", "codes": [[1]], "stage1_revision": "0" * 64, "stage2_revision": "1" * 64}
    (tmp_path / "out.jsonl.partial").write_text(json.dumps(row) + "\n")
    result = cli("stage2", "generate", "-i", texts, "-o", tmp_path / "out.jsonl", "--model", trained)
    assert result.exit_code == 2 and "another stage-2 model" in result.stderr
    assert (tmp_path / "out.jsonl.partial").read_text() == json.dumps(row) + "\n"  # nothing lost


@pytest.mark.parametrize("text, code, pattern", [
    ("   ", 2, r"empty text"),
    ("ɛɔɛ ŋŋ", 2, r"never saw in training.*U\+025B"),
    ("Naku ɛ gabu", 0, r"dropped 1 character.*U\+025B"),
    (" ".join(["Gufifa ki du gide"] * 60), 0, r"split at word boundaries into \d+ chunks"),
])
def test_bad_text_gives_a_clear_message(trained, cli, text, code, pattern):
    import re

    result = cli("tokenize", "text", text, "--model", trained, "--max-seconds", "1")
    assert result.exit_code == code, result.stderr
    assert re.search(pattern, result.stderr.replace("\n", "")), result.stderr


def test_guidance_on_a_model_trained_without_unconditional_rows_is_refused(trained, cli):
    result = cli("tokenize", "text", "Naku gabu.", "--model", trained, "--guidance", "2")
    assert result.exit_code == 2
    assert "model.unconditional_prob" in result.stderr.replace("\n", " ")


def test_generation_cap_warns(trained, cli):
    result = cli("tokenize", "text", "Gufifa ki du gide taka gifina mugu", "--model", trained, "--max-seconds", "0.2", "--format", "json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["frames"] <= 5
    if row["capped"]:
        assert "reached the cap of 5 frames" in result.stderr.replace("\n", " ")


def test_bad_corpus_row_stops_before_generating_or_is_skipped(trained, tmp_path, cli):
    texts = write_texts(tmp_path / "texts.jsonl", [TEXTS[0], "", TEXTS[1]])
    result = cli("stage2", "generate", "-i", texts, "-o", tmp_path / "out.jsonl", "--model", trained)
    assert result.exit_code == 2 and "'t1'" in result.stderr and "empty text" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()
    result = cli("stage2", "generate", "-i", texts, "-o", tmp_path / "out.jsonl", "--model", trained, "--skip-invalid", "--max-seconds", "2")
    assert result.exit_code == 0, result.stderr
    assert [json.loads(l)["id"] for l in (tmp_path / "out.jsonl").read_text().splitlines()] == ["t0", "t2"]
    assert json.loads((tmp_path / "out.jsonl.skipped.jsonl").read_text())["id"] == "t1"
    (tmp_path / "broken.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "b", "tex')
    result = cli("stage2", "generate", "-i", tmp_path / "broken.jsonl", "-o", tmp_path / "o2.jsonl", "--model", trained)
    assert result.exit_code == 2 and "broken.jsonl:2" in result.stderr


@pytest.mark.parametrize("setting, pattern", [
    ("train.stepz=3", r"unknown key 'train.stepz'.*did you mean 'train.steps'"),
    ("model.frame_mode=flat", r"key 'model.frame_mode'"),
    ("data.stage1=nowhere/at/all", r"not a stage-1 run folder"),
])
def test_bad_config_exits_2(setting, pattern, cli, tmp_path):
    import re

    result = cli("stage2", "train", "--set", setting, "--set", f"run.out_dir={tmp_path / 'run'}")
    assert result.exit_code == 2, result.stderr
    assert re.search(pattern, result.stderr.replace("\n", "")), result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["demo.yaml", "twi_e2b.yaml"])
def test_shipped_stage2_configs_validate(name):
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(Stage2Config, root / "configs" / "stage2" / name)
    if name == "twi_e2b.yaml":  # real scale: a small multilingual pretrained LM, its own tokenizer, all 8 levels
        assert cfg.model.backbone == "Qwen/Qwen2.5-0.5B" and cfg.model.tokenizer is None and cfg.store.backend == "hub"
    else:
        assert cfg.model.backbone == "configs/t2s/tiny_backbone.json" and (root / cfg.model.backbone).is_file()


def test_speakers_come_only_from_the_manifest_stage1_read(tmp_path, monkeypatch, capsys):
    from speechless.core.io import sha256_file, write_json
    from speechless.speech.tokens import resolve_stage1, speaker_map

    folder = make_fake_stage1(tmp_path / "stage1", sentences=4)
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "all.jsonl").write_bytes((folder / "manifest.jsonl").read_bytes())
    write_json(folder / "provenance.json", {"stage": "stage1", "manifest": {"path": "all.jsonl", "sha256": sha256_file(folder / "manifest.jsonl")}})
    stage1 = resolve_stage1(str(folder))
    monkeypatch.chdir(tmp_path / "here")
    assert speaker_map(stage1)["u0000-s2"] == "s2"
    (tmp_path / "there").mkdir()  # another manifest under the same relative name: its speakers are not used
    (tmp_path / "there" / "all.jsonl").write_text(json.dumps({"id": "u0000-s2", "speaker_id": "s1"}) + "\n")
    monkeypatch.chdir(tmp_path / "there")
    assert speaker_map(stage1) == {}
    assert "not the manifest stage 1 read" in capsys.readouterr().err.replace("\n", " ")


def test_ctc_alignment_run_aligns_the_text_and_generates_the_predicted_lengths(base, tmp_path):
    """model.alignment ctc: the judge is trained first, aligns every training text to its real frames, and the
    model learns those durations (eval loss carries the duration term) and generates them."""
    out = tmp_path / "aligned"
    cfg = load_config(Stage2Config, None, overrides(base, out, "run.push=false", "model.alignment=ctc", "model.text_window=1",
                                                    "generate.max_seconds=10"))
    summary = train(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss"]["duration_loss"] >= 0
    assert metrics["eval_loss"]["loss"] > sum(metrics["eval_loss"]["level_loss"]) / 4  # the duration term is part of it
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["alignment"] == "ctc"
    assert summary["eval"]["duration"]["capped"] == 0 and summary["eval"]["duration"]["generated_frames_mean"] > 0
    assert (out / "probe" / "model.safetensors").is_file()


def test_parallel_decoder_run_regresses_vectors_and_generates_the_predicted_lengths(base, tmp_path):
    """model.decoder parallel: aligned by the judge, the stage-1 codebooks go into the checkpoint, the eval loss is the
    vectors' squared error (+ durations), and the round trip speaks stage-1 codes."""
    out = tmp_path / "parallel"
    cfg = load_config(Stage2Config, None, overrides(base, out, "run.push=false", "model.alignment=ctc", "model.text_window=1",
                                                    "model.decoder=parallel", "model.frame_mode=parallel",
                                                    "generate.max_seconds=10"))
    summary = train(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "level_loss" not in metrics["eval_loss"] and metrics["eval_loss"]["vector_mse"] > 0
    assert metrics["model"]["decoder"] == "parallel"
    assert summary["eval"]["duration"]["capped"] == 0 and summary["eval"]["duration"]["generated_frames_mean"] > 0
    rows = [json.loads(line) for line in (out / "tokens" / "generated_test.jsonl").read_text().splitlines()]
    assert rows and all(len(r["codes"]) == 4 and len(r["codes"][0]) == r["frames"] > 0 for r in rows)
