"""Loading the Gemma 4 audio tower from every kind of source, and the hooked, batch-invariant extraction."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import (
    Gemma4AudioConfig,
    Gemma4AudioModel,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
)

from speechless.core.errors import UsageError
from speechless.speech.encoders import AudioWindow, EncoderConfig, encode_windows, load_encoder, weights_sha256

AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, subsampling_conv_channels=[128, 8], output_proj_dims=48)


@pytest.fixture(scope="module")
def audio_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "tiny.json"
    path.write_text(json.dumps({"model_type": "gemma4_audio", **AUDIO}))
    return path


def tiny_full_model() -> Gemma4ForConditionalGeneration:
    text = Gemma4TextConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                            intermediate_size=128, vocab_size=256, layer_types=["sliding_attention", "full_attention"],
                            hidden_size_per_layer_input=16, vocab_size_per_layer_input=256, num_kv_shared_layers=0)
    config = Gemma4Config(text_config=text.to_dict(), audio_config=Gemma4AudioConfig(**AUDIO).to_dict(), vision_config=None)
    torch.manual_seed(1)
    return Gemma4ForConditionalGeneration(config)


def test_config_file_source_is_seeded_and_hashed(audio_config_file):
    a = load_encoder(EncoderConfig(source=str(audio_config_file), random_seed=3))
    b = load_encoder(EncoderConfig(source=str(audio_config_file), random_seed=3))
    c = load_encoder(EncoderConfig(source=str(audio_config_file), random_seed=4))
    assert a.dim == 32 and a.revision == b.revision != c.revision
    assert a.revision == weights_sha256(a.model)


def test_full_checkpoint_folder_reads_only_the_audio_tower(tmp_path):
    full = tiny_full_model()
    full.save_pretrained(tmp_path / "full", max_shard_size="200KB")
    assert len(list((tmp_path / "full").glob("model-*.safetensors"))) > 2
    loaded = load_encoder(EncoderConfig(source=str(tmp_path / "full")))
    assert loaded.revision == weights_sha256(full.model.audio_tower)
    # a text-only shard going missing does not matter: only shards holding audio_tower keys are opened
    index = json.loads((tmp_path / "full" / "model.safetensors.index.json").read_text())["weight_map"]
    text_only = {s for s in index.values()} - {s for k, s in index.items() if k.startswith("model.audio_tower.")}
    assert text_only
    for shard in text_only:
        (tmp_path / "full" / shard).unlink()
    assert load_encoder(EncoderConfig(source=str(tmp_path / "full"))).revision == loaded.revision


def test_standalone_folder_and_hub_id(tmp_path, monkeypatch):
    torch.manual_seed(2)
    tower = Gemma4AudioModel(Gemma4AudioConfig(**AUDIO))
    tower.save_pretrained(tmp_path / "tower")
    assert load_encoder(EncoderConfig(source=str(tmp_path / "tower"))).revision == weights_sha256(tower)
    # Hub id: served from a snapshot-like folder through hf_hub_download (the network is unreachable here)
    snapshot = tmp_path / "snapshots" / ("a" * 40)
    shutil.copytree(tmp_path / "tower", snapshot)
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    def fake_download(repo_id, filename, revision=None):
        assert repo_id == "someone/gemma4-audio" and revision == "main"
        if not (snapshot / filename).exists():
            raise EntryNotFoundError(filename)
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = load_encoder(EncoderConfig(source="someone/gemma4-audio", revision="main"))
    assert loaded.source_commit == "a" * 40 and loaded.revision == weights_sha256(tower)


@pytest.mark.parametrize("source, needle", [("missing.json", "not found"), ("./nowhere", "neither a config")])
def test_bad_sources(source, needle):
    with pytest.raises(UsageError, match=needle):
        load_encoder(EncoderConfig(source=source))


def test_text_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4", "audio_config": None}))
    with pytest.raises(UsageError, match="no audio tower"):
        load_encoder(EncoderConfig(source=str(tmp_path)))


def test_wrong_hook_module(audio_config_file):
    with pytest.raises(UsageError, match="no module 'output_projection'.*output_proj"):
        load_encoder(EncoderConfig(source=str(audio_config_file), hook_module="output_projection"))


def test_windows_are_batch_invariant_and_unpadded(audio_config_file):
    loaded = load_encoder(EncoderConfig(source=str(audio_config_file)))
    rng = np.random.default_rng(0)
    lengths = [16000, 40000, 24000, 8000, 56000]
    windows = [AudioWindow((i, 0), (0.1 * rng.standard_normal(n)).astype(np.float32)) for i, n in enumerate(lengths)]
    cfg = EncoderConfig(source=str(audio_config_file), batch_size=4, length_bucket_s=2.0)
    together = dict(encode_windows(loaded, windows, cfg))
    for window in windows:
        alone = dict(encode_windows(loaded, [window], cfg))[window.key]
        assert torch.equal(alone, together[window.key])
    # 25 frames per second (one per 640 samples, a started frame counts), padded frames dropped
    assert [len(together[(i, 0)]) for i in range(5)] == [-(-n // 640) for n in lengths] == [25, 63, 38, 13, 88]
    assert all(v.shape[1] == 32 and v.dtype == torch.float32 for v in together.values())
