"""Shared test fixtures: the in-process CLI runner and the tiny stage-1 corpus, encoder and run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest


class Result(NamedTuple):
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """Run the `speechless` CLI in-process: `cli("data", "validate", path)` -> Result(exit_code, stdout, stderr).

    Arguments are converted with str(); output captured before the call is discarded.
    """
    from speechless.cli import run

    def invoke(*args) -> Result:
        capsys.readouterr()
        code = run([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return invoke


# ------------------------------------------------------------------------------------------------ tiny stage 1

TINY_ENCODER = {"model_type": "gemma4_audio", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "subsampling_conv_channels": [128, 8], "output_proj_dims": 48}


def stage1_overrides(corpus: Path, encoder_json: Path, out: Path, store: Path, *extra: str) -> list[str]:
    """`--set` values of a tiny stage-1 run (4 x 32 codes, 6 steps, 8 utterances a feature shard)."""
    return [f"data.manifest={corpus}", f"encoder.source={encoder_json}", f"run.out_dir={out}", f"store.root={store}",
            "rvq.num_quantizers=4", "rvq.codebook_size=32", "rvq.kmeans_sample=4096", "train.steps=6",
            "train.batch_size=256", "train.eval_every=3", "train.checkpoint_every=2", "train.average_last=2",
            "features.shard_size=8", *extra]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A 24-utterance espeak corpus (train 16 / dev 4 / test 4): its all.jsonl manifest."""
    from speechless.data.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("corpus")
    return synthesize_corpus(root, language="sw", voices=["m1", "f2"], num_sentences=12, seed=0)


@pytest.fixture(scope="session")
def encoder_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("encoder") / "tiny.json"
    path.write_text(json.dumps(TINY_ENCODER))
    return path


@pytest.fixture(scope="session")
def stage1_trained(corpus, encoder_json, tmp_path_factory) -> Path:
    """A finished tiny stage-1 run folder (uninterrupted, in-process)."""
    from speechless.core.config import load_config
    from stages.stage1_rvq import Stage1Config, train

    base = tmp_path_factory.mktemp("stage1")
    cfg = load_config(Stage1Config, None, stage1_overrides(corpus, encoder_json, base / "run", base / "store"))
    train(cfg)
    return base / "run"


# ------------------------------------------------------------------------------------------------ tiny stage 2

@pytest.fixture(scope="session")
def stage2_base(tmp_path_factory) -> Path:
    """A fake stage-1 run pushed as stage1@v1 to a local store, and the tiny backbone config (test_stage2's layout)."""
    from test_t2s import TINY_BACKBONE, make_fake_stage1

    from speechless.core.store import open_store

    root = tmp_path_factory.mktemp("stage2")
    make_fake_stage1(root / "stage1", sentences=20)
    open_store(root=root / "store").push("stage1", root / "stage1", message="fake")
    (root / "backbone.json").write_text(json.dumps(TINY_BACKBONE))
    return root


@pytest.fixture(scope="session")
def stage2_reference(stage2_base) -> Path:
    """An uninterrupted in-process tiny stage-2 run (one thread, as the subprocess runs that are compared with it)."""
    from test_stage2 import overrides

    from speechless.core.config import load_config
    from stages.stage2_t2s import Stage2Config, train

    train(load_config(Stage2Config, None, overrides(stage2_base, stage2_base / "reference", "train.threads=1")))
    return stage2_base / "reference"
