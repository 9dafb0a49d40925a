"""`speechless run`: the whole pipeline on a tiny corpus; skipping, forcing, dry runs, resuming a killed run, report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_stage1 import TINY_ENCODER
from test_t2s import TINY_BACKBONE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    (root / "encoder.json").write_text(json.dumps(TINY_ENCODER))
    (root / "backbone.json").write_text(json.dumps(TINY_BACKBONE))
    config = {
        "run": {"out_dir": str(root / "run")},
        "store": {"root": str(root / "store")},
        "data": {"source": "synth", "synth": {"num_sentences": 12, "voices": [{"variant": "m1"}, {"variant": "f2"}]}},
        "stage1": {"encoder": {"source": str(root / "encoder.json")}, "features": {"shard_size": 8},
                   "rvq": {"num_quantizers": 4, "codebook_size": 32, "kmeans_sample": 4096},
                   "train": {"steps": 4, "batch_size": 256, "eval_every": 2, "checkpoint_every": 2, "average_last": 2}},
        "stage2": {"model": {"backbone": str(root / "backbone.json"), "head_rank": 8, "tokenizer_vocab_size": 40},
                   "train": {"steps": 40, "batch_size": 8, "warmup_steps": 2, "eval_every": 20, "checkpoint_every": 2, "threads": 1},
                   "probe": {"steps": 10, "dim": 32, "conv_layers": 1}, "generate": {"max_seconds": 2}},
        "stage3": {"base": {"source": str(ROOT / "configs/llm/tiny_gemma4.json")},
                   "data": {"voices_per_sentence": 1, "eval_voices_per_sentence": 1, "generate": {"max_seconds": 2}},
                   "pretrain": {"enabled": True, "steps": 10, "batch_size": 8, "vocab_size": 120},
                   "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 2},
                   "eval": {"max_new_tokens": 8, "udhr_languages": ["eng"]}, "compare": {"real_speech_topline": False}},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def revisions(run_dir: Path) -> dict:
    return {name: rec["revision"] for name, rec in json.loads((run_dir / "pipeline.json").read_text())["steps"].items()}


@pytest.fixture(scope="module")
def finished(pipeline_config) -> Path:
    from speechless.cli import run

    assert run(["run", "-c", str(pipeline_config)]) == 0
    return pipeline_config.parent / "run"


def test_dry_run_plans_without_running(cli, pipeline_config, tmp_path):
    out = tmp_path / "planned"
    result = cli("run", "-c", pipeline_config, "--out", out, "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.stderr
    steps = json.loads(result.stdout)["steps"]
    assert [s["step"] for s in steps] == ["data", "stage1", "stage2", "stage3"]
    assert all(s["action"] == "run" for s in steps) and "after data" in steps[1]["reason"]
    assert not out.exists()


def test_until_stops_after_the_named_step(cli, pipeline_config, tmp_path):
    result = cli("run", "-c", pipeline_config, "--out", tmp_path / "p", "--dry-run", "--format", "json", "--until", "stage1")
    assert result.exit_code == 0, result.stderr
    assert [s["step"] for s in json.loads(result.stdout)["steps"]] == ["data", "stage1"]
    result = cli("run", "-c", pipeline_config, "--out", tmp_path / "p", "--until", "stage9")
    assert result.exit_code == 2 and "--until stage9" in result.stderr and "stage3" in result.stderr
    assert not (tmp_path / "p").exists()


def test_stage3_with_extra_text_trains_the_third_variant(finished, pipeline_config):
    from speechless.cli import run

    assert run(["run", "-c", str(pipeline_config), "--no-report", "--set", "stage3.compare.extra_text=true",
                "--set", "stage3.data.extra_text_udhr=swh", "--set", "stage3.compare.real_speech_topline=true"]) == 0
    ev = json.loads((finished / "stage3" / "metrics.json").read_text())["eval"]
    assert set(ev["variants"]) == {"synthetic_speech/lora", "real_speech_topline/lora", "synthetic_speech+text/lora"}
    assert set(ev["extra_text_comparison"]["lora"]) == set(ev["topline_comparison"]["lora"])
    spoken = list((finished / "stage3" / "work" / "extra_text" / "speech").glob("stage2_*.jsonl"))
    texts = [json.loads(line)["text"] for line in spoken[0].read_text().splitlines()]
    assert len(texts) > 20 and any("haki" in t.lower() for t in texts)  # the Swahili declaration, spoken by stage 2
    assert run(["run", "-c", str(pipeline_config), "--no-report"]) == 0  # back to the plain config for the other tests


def test_full_run_outputs_and_metrics(finished):
    state = json.loads((finished / "pipeline.json").read_text())
    assert set(state["steps"]) == {"data", "stage1", "stage2", "stage3"}
    metrics = json.loads((finished / "metrics.json").read_text())
    assert len(metrics["stage1"]["utilization"]) == 4 and "probe_cer_real" in metrics["stage2"]
    assert "probe_cer_generated" in metrics["stage2"] and "comparison" in metrics["stage3"]
    # stage 2 consumed exactly the stage-1 weights the pipeline recorded
    provenance = json.loads((finished / "stage2" / "provenance.json").read_text())
    assert provenance["stage1"]["revision"] == state["steps"]["stage1"]["revision"]
    page = (finished / "report" / "index.html").read_text()
    for image in ("stage1_loss.png", "stage1_utilization.png", "stage1_code_usage.png", "stage2_probe_cer.png", "stage2_duration.png",
                  "stage3_tasks.png"):
        assert image in page and (finished / "report" / image).stat().st_size > 1000, image
    # the page opens with one line per step: its headline figure and the bar it meets or misses
    summary = page.split("<h2>Summary</h2>")[1].split("<h2>")[0]
    for step in ("stage 1", "stage 2 judge", "stage 2 round trip", "stage 3"):
        assert f"<td>{step}" in summary, step
    assert "meets" in summary or "misses" in summary
    assert "without listening" in page  # the closed tasks' guessing baselines beside the scores
    # real text never trained on: a speech-only adapter leaves its perplexity exactly the base's
    udhr = metrics["stage3"]["variants"]["synthetic_speech/lora"]["udhr_perplexity"]["eng"]
    assert udhr["before"] > 1 and udhr["relative_change"] == 0.0
    assert "Universal Declaration" in (finished / "stage3" / "README.md").read_text()


def test_second_run_skips_every_step(cli, finished, pipeline_config):
    before = revisions(finished)
    mtime = (finished / "stage2" / "model.safetensors").stat().st_mtime_ns
    tick = time.time()
    result = cli("run", "-c", pipeline_config, "--no-report")
    assert result.exit_code == 0, result.stderr
    assert time.time() - tick < 20 and result.stderr.count("skipped") == 4
    assert revisions(finished) == before and (finished / "stage2" / "model.safetensors").stat().st_mtime_ns == mtime
    plan = json.loads(cli("run", "-c", pipeline_config, "--dry-run", "--format", "json").stdout)["steps"]
    assert [s["action"] for s in plan] == ["skip", "skip", "skip", "skip"]


def test_changed_stage2_config_reruns_only_stage2(cli, finished, pipeline_config):
    plan = json.loads(cli("run", "-c", pipeline_config, "--dry-run", "--format", "json", "--set", "stage2.generate.seed=5").stdout)["steps"]
    assert [s["action"] for s in plan] == ["skip", "skip", "resume", "run"]
    forced = json.loads(cli("run", "-c", pipeline_config, "--dry-run", "--format", "json", "--force", "stage1").stdout)["steps"]
    assert forced[1]["action"] == "run (forced)" and forced[2]["action"] == "run"
    bad = cli("run", "-c", pipeline_config, "--dry-run", "--force", "stage9")
    assert bad.exit_code == 2 and "stage9" in bad.stderr and "stage1" in bad.stderr


def test_killed_run_resumes_mid_stage2(pipeline_config, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "speechless", "run", "-c", str(pipeline_config), "--out", str(out), "--no-report"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    checkpoints = out / "stage2" / "work" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(checkpoints.glob("step-0000[1-9]*.safetensors")) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before stage 2 made a checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((out / "pipeline.json").read_text())
    assert set(state["steps"]) == {"data", "stage1"}  # stage 2 was not recorded as done
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pipeline stage1: skipped" in done.stderr and "resuming stage 2 from step" in done.stderr
    assert set(json.loads((out / "pipeline.json").read_text())["steps"]) == {"data", "stage1", "stage2", "stage3"}


def _speech_rows(out: Path) -> int:
    return sum(f.read_bytes().count(b"\n") for f in (out / "stage3" / "work" / "speech").glob("*.partial"))


def _stage3_checkpoints(out: Path) -> int:
    return len(list((out / "stage3" / "work" / "variants").glob("*/checkpoints/step-*.safetensors")))


@pytest.mark.parametrize("where, under_way, max_delay, extra", [
    ("stage-3 speech synthesis", _speech_rows, 0.05, ["stage3.data.generate.batch_size=1"]),
    ("stage-3 training", _stage3_checkpoints, 0.5, ["stage3.train.steps=40", "stage3.train.checkpoint_every=4"]),
])
def test_killed_stage3_resumes_and_completes(pipeline_config, finished, tmp_path, where, under_way, max_delay, extra):
    """SIGKILL inside stage 3 (its stage-2 speech cache, then its training) at a seeded random moment after the step
    is under way; the same command completes, reusing the finished steps and what stage 3 had already written; no
    visible file is half-written."""
    import random

    from test_kill_resume import assert_nothing_half_written

    out = tmp_path / "killed3"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("stage3", "report"))  # data..stage2 done, stage 3 not
    state = json.loads((out / "pipeline.json").read_text())
    state["steps"].pop("stage3")
    (out / "pipeline.json").write_text(json.dumps(state))
    cmd = [sys.executable, "-m", "speechless", "run", "-c", str(pipeline_config), "--out", str(out), "--no-report",
           *(arg for item in extra for arg in ("--set", item))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and under_way(out) < 1:
        time.sleep(0.02)
    time.sleep(random.Random(where).uniform(0, max_delay))
    assert proc.poll() is None, f"the run ended before {where} was under way"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_nothing_half_written(out)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("skipped") == 3  # data, stage 1, stage 2: the copied, finished steps
    if where == "stage-3 training":
        assert "resuming at step" in done.stderr
    assert "stage3" in json.loads((out / "pipeline.json").read_text())["steps"]
    assert_nothing_half_written(out)


def test_report_renders_in_headless_chromium(cli, finished):
    result = cli("report", finished, "--screenshot")
    assert result.exit_code == 0, result.stderr
    shot = finished / "report" / "screenshot.png"
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] > 500 and pixels.shape[1] > 500
    content = pixels[..., :3].std(axis=1).mean(axis=1) > 0.01
    assert content.sum() > 200  # text and plots drawn, not a blank page
    assert content[int(len(content) * 0.8):].any()  # the page fills the shot: no empty bottom half


def test_report_of_a_missing_folder_is_a_usage_error(cli, tmp_path):
    result = cli("report", tmp_path / "nope")
    assert result.exit_code == 2 and "nope" in result.stderr


def test_further_seeds_repeat_stage3_each_in_its_own_folder(cli, finished, pipeline_config):
    """`seeds`: stage 3 again at each further seed (own folder, own seed, same base), a summary over every seed in the
    step's metrics and the report; a second run skips the step. (Last in this file: it adds a step to `finished`.)"""
    run_dir = finished
    result = cli("run", "-c", pipeline_config, "--set", "seeds=[0,7]", "--no-report")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("skipped") == 4  # the finished steps are reused; only the repeat runs
    repeat = run_dir / "stage3_seeds" / "seed7"
    resolved = yaml.safe_load((repeat / "resolved_config.yaml").read_text())
    assert resolved["run"]["seed"] == 7 and resolved["data"]["generate"]["seed"] == 7
    assert resolved["pretrain"]["out_dir"] == str(run_dir / "stage3_base") and (repeat / "adapter.safetensors").is_file()
    assert not (run_dir / "stage3_seeds" / "seed0").exists()  # stage 3's own seed is not run twice
    summary = json.loads((run_dir / "stage3_seeds" / "metrics.json").read_text())["eval"]
    assert list(summary["seeds"]) == ["0", "7"]
    assert summary["holds_at"] == 0 and summary["seeds"]["7"]["holds"] is None  # no topline in this config: nothing to hold
    assert "stage3_seeds" in json.loads((run_dir / "metrics.json").read_text())
    again = cli("run", "-c", pipeline_config, "--set", "seeds=[0,7]")
    assert again.exit_code == 0 and again.stderr.count("skipped") == 5
    assert "Stage 3 over 2 seeds" in (run_dir / "report" / "index.html").read_text()


def test_a_section_set_to_a_config_file_on_the_command_line_is_that_file(cli):
    result = cli("config", "resolve", "pipeline", "-c", "configs/pipeline/real_speech.yaml", "--set", "encoder=configs/encoder/demo.yaml",
                 "--set", "stage1.encoder.kind=gemma4")
    assert result.exit_code == 0, result.stderr
    encoder = yaml.safe_load(result.stdout)["encoder"]
    demo = yaml.safe_load((ROOT / "configs/encoder/demo.yaml").read_text())
    assert encoder["train"]["steps"] == demo["train"]["steps"] and encoder["model"]["hidden_size"] == demo["model"]["hidden_size"]
    result = cli("config", "resolve", "pipeline", "-c", "configs/pipeline/real_speech.yaml", "--set", "encoder=configs/encoder/none.yaml")
    assert result.exit_code == 2 and "configs/encoder/none.yaml not found" in result.stderr
