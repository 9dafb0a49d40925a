"""Config loading: YAML + --set overrides, type checks, unknown keys rejected with the valid ones listed."""

from __future__ import annotations

import pytest

from speechless.core.config import Section, describe, load_config, to_yaml
from speechless.core.errors import UsageError


class Inner(Section):
    steps: int = 10
    """Training steps."""
    lr: float = 1e-3
    """Learning rate."""
    names: list[str] = ["a"]
    """Some names."""


class Outer(Section):
    train: Inner = Inner()
    out_dir: str = "runs/x"
    """Where outputs go."""


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_file_and_overrides(tmp_path):
    cfg = load_config(Outer, write(tmp_path, "train:\n  steps: 5\n"), ["train.lr=0.5", "out_dir=elsewhere", "train.names=[x, y]"])
    assert cfg.train.steps == 5 and cfg.train.lr == 0.5 and cfg.out_dir == "elsewhere" and cfg.train.names == ["x", "y"]
    assert load_config(Outer, None).train.steps == 10


class Stage(Section):
    fast: Inner = Inner(steps=3, lr=0.1)  # this schema's own defaults for the section
    slow: Outer = Outer(train=Inner(steps=99))


def test_a_partly_given_section_keeps_its_enclosing_defaults(tmp_path):
    cfg = load_config(Stage, write(tmp_path, "fast:\n  lr: 0.2\n"), ["slow.train.lr=0.7"])
    assert (cfg.fast.steps, cfg.fast.lr) == (3, 0.2)  # steps stays Stage's 3, not Inner's 10
    assert (cfg.slow.train.steps, cfg.slow.train.lr, cfg.slow.out_dir) == (99, 0.7, "runs/x")
    assert load_config(Stage, None, ["fast.names=[z]"]).fast.lr == 0.1


def test_unknown_key_lists_valid_keys_and_suggests(tmp_path):
    with pytest.raises(UsageError) as err:
        load_config(Outer, write(tmp_path, "train:\n  stpes: 5\n"))
    message = str(err.value)
    assert "train.stpes" in message and "did you mean 'train.steps'" in message and "lr, names, steps" in message
    assert str(tmp_path / "c.yaml") in message


def test_unknown_override_key_is_rejected():
    with pytest.raises(UsageError, match=r"--set: unknown key 'train.epochs'.*valid keys under train: lr, names, steps"):
        load_config(Outer, None, ["train.epochs=3"])


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(UsageError, match=r"key 'train.steps'.*'many'"):
        load_config(Outer, None, ["train.steps=many"])
    with pytest.raises(UsageError, match=r"key 'train.lr'"):
        load_config(Outer, write(tmp_path, "train:\n  lr: [1, 2]\n"))


@pytest.mark.parametrize("text, needle", [("train: [1, 2\n", "line"), ("- a\n- b\n", "mapping")])
def test_bad_yaml_is_a_clear_error(tmp_path, text, needle):
    with pytest.raises(UsageError, match=needle):
        load_config(Outer, write(tmp_path, text))


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(UsageError, match="KEY=VALUE"):
        load_config(Outer, None, ["train.steps"])
    with pytest.raises(UsageError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(Outer, None, ["train.steps=7"])
    again = load_config(Outer, write(tmp_path, to_yaml(cfg)))
    assert again == cfg


def test_describe_lists_documented_leaves():
    rows = {key: doc for key, _, doc in describe(Outer)}
    assert rows["train.steps"] == "Training steps." and rows["out_dir"] == "Where outputs go."


def test_a_section_can_be_a_yaml_file(tmp_path, monkeypatch):
    from speechless.pipeline import PipelineConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s1.yaml").write_text("train:\n  steps: 7\n")
    (tmp_path / "imp.yaml").write_text("dataset: some/dataset\n")
    (tmp_path / "p.yaml").write_text("stage1: s1.yaml\ndata:\n  source: import\n  imports: [imp.yaml]\n")
    cfg = load_config(PipelineConfig, tmp_path / "p.yaml", ["stage1.rvq.kmeans_iters=3"])
    assert cfg.stage1.train.steps == 7 and cfg.stage1.rvq.kmeans_iters == 3 and cfg.data.imports[0].dataset == "some/dataset"
    (tmp_path / "bad.yaml").write_text("stage1: missing.yaml\n")
    with pytest.raises(UsageError, match="missing.yaml"):
        load_config(PipelineConfig, tmp_path / "bad.yaml")
    (tmp_path / "s1.yaml").write_text("trian:\n  steps: 7\n")
    with pytest.raises(UsageError, match="stage1.trian"):
        load_config(PipelineConfig, tmp_path / "p.yaml")


def test_every_key_of_every_stage_schema_and_the_pipeline_is_documented():
    from speechless.commands.config_cmd import _schemas

    for name, schema in _schemas().items():
        missing = [key for key, _, doc in describe(schema) if not doc.strip()]
        assert not missing, f"{name}: keys without a description: {missing}"
