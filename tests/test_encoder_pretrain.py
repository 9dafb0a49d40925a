"""Encoder pretraining (the step before stage 1) on a tiny corpus: outputs, the folder loads through `encoder.source`,
resume after a kill, a stage-1 tokenizer refuses an encoder whose weights changed, the pipeline step, bad config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_ENCODER, stage1_overrides

from speechless.core.config import load_config
from stages.stage0_encoder import EncoderPretrainConfig, train


def overrides(corpus: Path, out: Path, *extra: str) -> list[str]:
    """A tiny pretraining run: the conftest encoder's shape (width 32, 2 layers), 3 steps of 2 utterances, one thread."""
    return [f"data.manifest={corpus}", f"run.out_dir={out}", f"store.root={out.parent / 'store'}",
            f"model.hidden_size={TINY_ENCODER['hidden_size']}", f"model.num_attention_heads={TINY_ENCODER['num_attention_heads']}",
            "model.num_hidden_layers=2", "model.subsampling_conv_channels=[128, 8]", "model.output_proj_dims=48",
            "train.steps=3", "train.batch_size=2", "train.warmup_steps=1", "train.learning_rate=0.003",
            "train.eval_every=2", "train.checkpoint_every=1", "train.threads=1", "data.max_eval_utterances=2", *extra]


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("encoder") / "run"
    train(load_config(EncoderPretrainConfig, None, overrides(corpus, out)))
    return out


def test_outputs_load_through_encoder_source(pretrained):
    from speechless.speech.encoder_ctc import load_ctc_encoder
    from speechless.speech.encoders import EncoderConfig, load_encoder

    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "ctc_head.safetensors", "ctc_head.json",
                 "metrics.json", "provenance.json", "resolved_config.yaml", "README.md"):
        assert (pretrained / name).is_file(), name
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"] if "eval" in h] == [2, 3]
    assert 0 <= metrics["eval"]["cer"] <= 1.5 and metrics["eval"]["split"] == "dev"
    loaded = load_encoder(EncoderConfig(source=str(pretrained), device="cpu"))
    assert type(loaded.model).__name__ == "Gemma4AudioModel" and loaded.dim == TINY_ENCODER["hidden_size"]
    assert loaded.revision == metrics["model"]["weights_sha256"]
    assert json.loads((pretrained / "provenance.json").read_text())["encoder_weights_sha256"] == loaded.revision
    model, kind = load_ctc_encoder(pretrained)
    assert kind == "chars" and " " in model.units and "a" in model.units
    assert "CER" in (pretrained / "README.md").read_text()
    assert not list(pretrained.rglob("*.tmp")) and not list(pretrained.rglob("*.pt"))


def test_recorded_figures_are_those_of_the_saved_weights(pretrained):
    """The final figures are the last step's evaluation in training: a fresh evaluation of the saved folder's weights
    on the eval split gives them again."""
    import torch

    import stages.stage0_encoder as recipe
    from speechless.speech.encoder_ctc import evaluate, load_ctc_encoder, utterance_features

    cfg = load_config(EncoderPretrainConfig, pretrained / "resolved_config.yaml", [])
    _, eval_entries = recipe._load_splits(cfg)
    units = recipe._unit_sequences(cfg, [e.text for e in eval_entries])
    model, _ = load_ctc_encoder(pretrained)
    fresh = evaluate(model, utterance_features([e.audio_filepath for e in eval_entries]), [recipe._reference(cfg, u) for u in units],
                     [[model.index[x] for x in u if x in model.index] for u in units], torch.device("cpu"))
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert metrics["history"][-1]["eval"] == {"loss": metrics["eval"]["loss"], "error_rate": metrics["eval"]["error_rate"]}
    assert fresh["error_rate"] == metrics["eval"]["error_rate"] and fresh["examples"] == metrics["eval"]["examples"]
    assert fresh["loss"] == pytest.approx(metrics["eval"]["loss"], abs=2e-4)


def test_resume_after_a_kill_gives_identical_weights(pretrained, corpus, tmp_path, monkeypatch):
    import stages.stage0_encoder as recipe

    real_loss, calls = recipe.ctc_loss, {"n": 0}

    def dying_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed after the step-2 checkpoint, mid step 3
        return real_loss(*args, **kwargs)

    cfg = load_config(EncoderPretrainConfig, None, overrides(corpus, tmp_path / "run"))
    monkeypatch.setattr(recipe, "ctc_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert json.loads((tmp_path / "run" / "work" / "state.json").read_text())["step"] == 2
    assert not (tmp_path / "run" / "model.safetensors").exists()
    monkeypatch.setattr(recipe, "ctc_loss", real_loss)
    train(cfg)
    for name in ("model.safetensors", "ctc_head.safetensors"):
        assert (tmp_path / "run" / name).read_bytes() == (pretrained / name).read_bytes(), name
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert history == json.loads((pretrained / "metrics.json").read_text())["history"]


def test_stage1_on_the_encoder_refuses_it_once_its_weights_change(pretrained, corpus, tmp_path, cli):
    from safetensors.torch import load_file

    from speechless.core.io import save_tensors
    from stages.stage1_rvq import Stage1Config
    from stages.stage1_rvq import train as train_stage1

    encoder = tmp_path / "encoder"
    shutil.copytree(pretrained, encoder, ignore=shutil.ignore_patterns("work"))
    sha = json.loads((encoder / "metrics.json").read_text())["model"]["weights_sha256"]
    stage1 = tmp_path / "stage1"
    train_stage1(load_config(Stage1Config, None, stage1_overrides(corpus, encoder, stage1, tmp_path / "store", "train.steps=2")))
    config = json.loads((stage1 / "config.json").read_text())
    assert config["encoder"]["source"] == str(encoder) and config["encoder"]["weights_sha256"] == sha
    assert json.loads((stage1 / "provenance.json").read_text())["encoder"]["weights_sha256"] == sha
    assert cli("tokenize", "audio", "--tokenizer", stage1, "--manifest", corpus, "--split", "dev").exit_code == 0
    # encoder B: the same folder re-trained (here: one weight nudged); the stage-1 tokenizer of encoder A refuses it
    tensors = load_file(str(encoder / "model.safetensors"))
    name = next(k for k in sorted(tensors) if k.endswith(".weight") and tensors[k].ndim == 2)  # (clip bounds are inf)
    tensors[name] = tensors[name] + 1e-3
    save_tensors(encoder / "model.safetensors", tensors)
    result = cli("tokenize", "audio", "--tokenizer", stage1, "--manifest", corpus, "--split", "dev")
    assert result.exit_code == 2 and "weights differ" in result.stderr, result.stderr


def test_pipeline_step_skips_when_up_to_date_and_reruns_downstream(corpus, tmp_path, monkeypatch):
    from speechless import pipeline
    from speechless.core.report import write_report

    monkeypatch.setattr(pipeline, "STEPS", pipeline.STEPS[:2])  # data -> encoder -> stage 1 (stages 2-3 tested elsewhere)
    data = {"run": {"out_dir": str(tmp_path / "run")}, "store": {"root": str(tmp_path / "store")},
            "data": {"source": "manifest", "manifest": str(corpus)},
            "encoder": {"model": {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2,
                                  "subsampling_conv_channels": [128, 8], "output_proj_dims": 48},
                        "data": {"max_eval_utterances": 2},
                        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2, "threads": 1}},
            "stage1": {"features": {"shard_size": 8}, "rvq": {"num_quantizers": 2, "codebook_size": 16, "kmeans_sample": 1024},
                       "train": {"steps": 2, "batch_size": 128, "eval_every": 2, "checkpoint_every": 2, "average_last": 1}}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(pipeline.PipelineConfig, tmp_path / "pipeline.yaml")
    assert [p.step.name for p in pipeline.plan(cfg)] == ["data", "encoder", "stage1"]
    state = pipeline.run_pipeline(cfg, report=False)
    run = tmp_path / "run"
    encoder_sha = json.loads((run / "encoder" / "metrics.json").read_text())["model"]["weights_sha256"]
    stage1_config = json.loads((run / "stage1" / "config.json").read_text())["encoder"]
    assert stage1_config["source"] == str(run / "encoder") and stage1_config["weights_sha256"] == encoder_sha
    assert [p.action for p in pipeline.plan(cfg)] == ["skip", "skip", "skip"]
    changed = load_config(pipeline.PipelineConfig, tmp_path / "pipeline.yaml", ["encoder.run.seed=1"])
    assert [(p.action, p.reason.split(" ")[0]) for p in pipeline.plan(changed)][1:] == [("resume", "unfinished"), ("run", "after")]
    again = pipeline.run_pipeline(changed, report=False)
    assert again["steps"]["data"] == state["steps"]["data"]
    assert again["steps"]["encoder"]["revision"] != state["steps"]["encoder"]["revision"]
    assert again["steps"]["stage1"]["stamp"] != state["steps"]["stage1"]["stamp"]
    new_sha = json.loads((run / "encoder" / "metrics.json").read_text())["model"]["weights_sha256"]
    assert json.loads((run / "stage1" / "config.json").read_text())["encoder"]["weights_sha256"] == new_sha != encoder_sha
    page = write_report(run).read_text()
    assert "Encoder pretraining" in page and "encoder_loss.png" in page and "encoder_error_rate.png" in page


@pytest.mark.parametrize("setting, pattern", [
    ("train.stepz=3", r"unknown key 'train.stepz'.*did you mean 'train.steps'"),
    ("data.units=letters", r"key 'data.units'"),
    ("data.eval_split=nope", r"no utterances in split 'nope'"),
])
def test_bad_config_is_one_line_and_exit_2(setting, pattern, corpus, cli, tmp_path):
    result = cli("encoder", "pretrain", "--set", f"data.manifest={corpus}", "--set", setting, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.stderr
    assert __import__("re").search(pattern, result.stderr.replace("\n", "")), result.stderr
    assert not (tmp_path / "run").exists()
