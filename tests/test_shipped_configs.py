"""Every shipped config validates against its schema (the real-scale ones too, though they cannot run here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from speechless.config import load_config
from speechless.data.hf_import import ImportConfig
from speechless.data.synth import SynthConfig
from stages.stage1_rvq import Stage1Config

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = {"configs/stage1": Stage1Config, "configs/data": SynthConfig, "data_manifests/twi": ImportConfig}


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT) for folder in SCHEMAS for p in (ROOT / folder).glob("*.yaml")), ids=str)
def test_config_validates(path):
    schema = SCHEMAS[str(path.parent)]
    assert isinstance(load_config(schema, ROOT / path), schema)


def test_real_scale_stage1_config_targets_gemma4_e2b():
    cfg = load_config(Stage1Config, ROOT / "configs/stage1/twi_e2b.yaml")
    assert cfg.encoder.source == "google/gemma-4-e2b-it" and cfg.rvq.num_quantizers == 8 and cfg.rvq.codebook_size == 2048
