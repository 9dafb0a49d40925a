"""`run.loggers`: TensorBoard event files beside the JSON history, read back; unknown names refused; no other change."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import stage1_overrides

from speechless.core.config import load_config
from speechless.core.errors import UsageError
from speechless.core.loggers import TENSORBOARD_DIR, open_loggers, scalars
from speechless.core.runs import RunConfig, config_fingerprint
from stages.stage1_rvq import Stage1Config

pytest.importorskip("tensorboard")


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in `folder` as TensorBoard shows it: [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


HISTORY = [{"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.7},
           {"step": 2, "loss": 2.0, "lr": 5e-4, "eval": {"loss": 3.0, "level_loss": [3.5, 2.5], "split": "dev",
                                                         "probe": {"cer": 0.25, "ok": True}, "examples": [{"a": 1}]}}]


def test_scalars_flatten_nested_eval_figures_and_skip_what_is_not_a_number():
    assert scalars(HISTORY[1]) == {"train/loss": 2.0, "train/lr": 5e-4, "eval/loss": 3.0, "eval/level_loss/0": 3.5,
                                   "eval/level_loss/1": 2.5, "eval/probe/cer": 0.25}
    assert scalars({"step": 3, "train_commit": 0.1, "eval": {"utilization": [1.0, 0.5]}}) == {
        "train/commit": 0.1, "eval/utilization/0": 1.0, "eval/utilization/1": 0.5}


def test_tensorboard_logger_writes_the_history_as_scalars(tmp_path):
    with open_loggers(RunConfig(out_dir=str(tmp_path), loggers=["json", "tensorboard"])) as curves:
        for record in HISTORY:
            curves.log(record["step"], record)
    got = read_scalars(tmp_path / TENSORBOARD_DIR)
    assert got["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert [step for step, _ in got["train/lr"]] == [1, 2] and got["train/lr"][1][1] == pytest.approx(5e-4)
    assert got["eval/level_loss/1"] == [(2, 2.5)] and got["eval/probe/cer"] == [(2, 0.25)]
    assert not any("split" in tag or "examples" in tag or "ok" in tag for tag in got)


def test_a_resumed_run_shows_each_step_once(tmp_path):
    """Steps 1-3 logged, killed after the checkpoint of step 2: the resumed run logs 3-4 again in a new event file."""
    cfg = RunConfig(out_dir=str(tmp_path), loggers=["tensorboard"])
    with open_loggers(cfg) as curves:
        for step in (1, 2, 3):
            curves.log(step, {"loss": 10.0 + step})
    with open_loggers(cfg) as curves:
        for step in (3, 4):
            curves.log(step, {"loss": 20.0 + step})
    assert read_scalars(tmp_path / TENSORBOARD_DIR)["train/loss"] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]


def test_default_writes_no_event_files_and_unknown_logger_is_refused(tmp_path):
    assert RunConfig().loggers == ["json"]
    with open_loggers(RunConfig(out_dir=str(tmp_path))) as curves:
        curves.log(1, HISTORY[0])
    assert not (tmp_path / "work").exists()
    with pytest.raises(UsageError, match=r"run\.loggers.*unknown logger 'tb'.*json, tensorboard"):
        load_config(Stage1Config, None, ["run.loggers=[json,tb]"])
    assert load_config(Stage1Config, None, ["run.loggers=json,tensorboard"]).run.loggers == ["json", "tensorboard"]


def test_loggers_change_neither_the_resume_fingerprint_nor_the_pipeline_stamp(tmp_path):
    from speechless.pipeline import STEPS, PipelineConfig, _stage2_configure, step_stamp

    plain = load_config(Stage1Config, None, [])
    assert config_fingerprint(plain) == config_fingerprint(load_config(Stage1Config, None, ["run.loggers=[json,tensorboard]"]))
    upstream = {"stage1": {"folder": str(tmp_path / "stage1"), "revision": "r"}}
    configs = [_stage2_configure(load_config(PipelineConfig, None, extra), tmp_path / "stage2", upstream)
               for extra in ([], ["run.loggers=[tensorboard]"], ["stage2.run.loggers=[json,tensorboard]"])]
    assert [c.run.loggers for c in configs] == [["json"], ["json", "tensorboard"], ["json", "tensorboard"]]
    assert len({step_stamp(STEPS[2], c, {"stage1": "r"}) for c in configs}) == 1


def test_a_finished_seed_repeat_is_not_run_again_for_tensorboard(tmp_path):
    from speechless.core.config import to_yaml
    from speechless.pipeline import finished_with
    from stages.stage3_llm import Stage3Config

    plain = load_config(Stage3Config, None, [])
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "resolved_config.yaml").write_text(to_yaml(plain))
    assert finished_with(tmp_path, plain.model_copy(update={"run": plain.run.model_copy(update={"loggers": ["json", "tensorboard"]})}))
    assert not finished_with(tmp_path, plain.model_copy(update={"run": plain.run.model_copy(update={"seed": 7})}))


def test_stage1_run_writes_loss_and_eval_curves_and_the_same_outputs(stage1_trained, corpus, encoder_json, tmp_path):
    from speechless.core.io import read_json
    from stages.stage1_rvq import train

    out = tmp_path / "run"
    train(load_config(Stage1Config, None, stage1_overrides(corpus, encoder_json, out, tmp_path / "store",
                                                           "run.loggers=[json,tensorboard]")))
    got = read_scalars(out / TENSORBOARD_DIR)
    history = read_json(out / "metrics.json")["history"]
    assert [step for step, _ in got["eval/mse"]] == [0, 3, 6]
    assert got["eval/mse"][-1][1] == pytest.approx(history[-1]["eval"]["mse"])
    assert [step for step, _ in got["train/loss"]] == list(range(1, 7))
    assert {"train/mse", "train/commitment", "eval/cosine", "eval/utilization/0", "eval/utilization/3"} <= set(got)
    for name in ("model.safetensors", "model.best.safetensors", "tokens/train.jsonl", "tokens/dev.jsonl"):
        assert (out / name).read_bytes() == (stage1_trained / name).read_bytes(), name
