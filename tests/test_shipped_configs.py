"""Every shipped config validates against its schema (the real-scale ones too, though they cannot run here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from speechless.core.config import load_config
from speechless.data.hf_import import ImportConfig
from speechless.data.prompts import PromptsConfig
from speechless.data.synth import SynthConfig
from speechless.pipeline import PipelineConfig
from stages.stage0_encoder import EncoderPretrainConfig
from stages.stage1_rvq import Stage1Config
from stages.stage2_t2s import Stage2Config
from stages.stage3_llm import Stage3Config

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = {"configs/encoder": EncoderPretrainConfig, "configs/stage1": Stage1Config, "configs/stage2": Stage2Config, "configs/stage3": Stage3Config, "configs/data": SynthConfig,
           "data_manifests/twi": ImportConfig, "configs/pipeline": PipelineConfig}
FILE_SCHEMAS = {"configs/data/prompts.yaml": PromptsConfig}
"""Files whose schema is not their folder's."""


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name their included files relative to the repository root


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT) for folder in SCHEMAS for p in (ROOT / folder).glob("*.yaml")), ids=str)
def test_config_validates(path):
    schema = FILE_SCHEMAS.get(str(path), SCHEMAS[str(path.parent)])
    assert isinstance(load_config(schema, ROOT / path), schema)


def test_real_scale_stage1_config_targets_gemma4_e2b():
    cfg = load_config(Stage1Config, ROOT / "configs/stage1/twi_e2b.yaml")
    assert cfg.encoder.source == "google/gemma-4-e2b-it" and cfg.rvq.num_quantizers == 8 and cfg.rvq.codebook_size == 2048


def test_real_scale_pipeline_imports_twi_and_uses_the_real_stage_configs():
    cfg = load_config(PipelineConfig, ROOT / "configs/pipeline/twi_e2b.yaml")
    assert cfg.data.source == "import" and len(cfg.data.imports) == 3 and all(item.language for item in cfg.data.imports)
    assert cfg.stage1.encoder.source == "google/gemma-4-e2b-it" and cfg.stage2.train.device == "cuda"
    assert cfg.stage3.base.source == "google/gemma-4-e2b-it" and not cfg.stage3.pretrain.enabled
    assert cfg.store.backend == "hub" and cfg.run.push
