"""The stage-3 speech LLM: audio-slot layout vs Gemma's processor, the native audio path, adapters (identity at init,
speech-only exactness, save/load round trip, wrong base refused), the text-only base with a projector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from speechless.core.errors import UsageError
from speechless.llm.adapters import AdapterConfig, remove_dus
from speechless.llm.base import BaseConfig, build_demo_tokenizer
from speechless.llm.model import SpeechLM, load_adapter, load_speech_lm
from speechless.speech.encoders import EncoderConfig, load_encoder

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["Watoto walichora picha darasani juzi.", "The children drew a picture in the classroom.", "Transcribe the audio.",
         "Mwalimu alikula wali nyumbani asubuhi.", "The teacher ate rice at home in the morning."] * 4
TINY_AUDIO = {"model_type": "gemma4_audio", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "subsampling_conv_channels": [128, 8], "output_proj_dims": 48}
SPEECH = {"type": "speech", "text": "x"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("llm")
    (root / "audio.json").write_text(json.dumps(TINY_AUDIO))
    encoder_cfg = EncoderConfig(source=str(root / "audio.json"), device="cpu", batch_size=2)
    sha = load_encoder(encoder_cfg).revision
    tokenizer = build_demo_tokenizer(TEXTS, 200)
    return root, encoder_cfg, sha, tokenizer


def make(setup, seed: int = 0, kind: str = "gemma4_audio", source: str = "configs/llm/tiny_gemma4.json") -> SpeechLM:
    _, encoder_cfg, sha, tokenizer = setup
    return load_speech_lm(BaseConfig(kind=kind, source=str(ROOT / source), random_seed=seed, device="cpu"), encoder_cfg, sha, tokenizer)


def conversation(answer: str = "Watoto walichora picha.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Transcribe the audio.\n"}, SPEECH]}, {"role": "assistant", "content": answer}]


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def test_audio_slots_match_gemma4_processor(setup):
    """Our prompt ids for an audio clip == the ids Gemma4Processor's audio expansion + the same tokenizer give."""
    from transformers import Gemma4AudioFeatureExtractor, Gemma4Processor

    from speechless.speech.encoders import AudioWindow, encode_windows

    model = make(setup)
    audio = clip(2.37)
    # Gemma4Processor's constructor also wants image and video processors (torchvision, not installed): build it
    # without them and use its own audio pieces, which are all the audio layout depends on.
    processor = object.__new__(Gemma4Processor)
    processor.feature_extractor, processor.tokenizer, processor.audio_seq_length = Gemma4AudioFeatureExtractor(), model.tokenizer, 750
    processor.audio_token, processor.boa_token, processor.eoa_token = (model.tokenizer.audio_token, model.tokenizer.boa_token,
                                                                        model.tokenizer.eoa_token)
    features = processor.feature_extractor([audio], return_tensors="pt")
    expanded = processor.replace_audio_token(features, 0)
    vectors = dict(encode_windows(model.encoder(), [AudioWindow((0, 0), audio)], setup[1]))[(0, 0)]
    assert len(vectors) == expanded.count(model.tokenizer.audio_token) == processor._compute_audio_num_tokens(audio, 16000) == 59
    ours = model.encode(conversation()[:1], [vectors], with_answer=False).ids
    theirs = [model.tokenizer.bos_token_id] + model.tokenizer(f"<|turn>user\nTranscribe the audio.\n{expanded}<turn|>\n<|turn>model\n",
                                                              add_special_tokens=False)["input_ids"]
    assert ours == theirs
    assert model.lm.config.audio_token_id == model.tokenizer.audio_token_id
    assert model.lm.config.boa_token_id == model.tokenizer.convert_tokens_to_ids(model.tokenizer.boa_token)


def test_our_audio_path_is_gemmas_native_path(setup):
    """Vectors from the audio tower's output_proj input, through output_proj + embed_audio into the slots, give the
    logits of the model's own forward on input_features."""
    model = make(setup)
    audio = clip(1.5, seed=1)
    features = model.encoder().feature_extractor([audio], return_tensors="pt")
    from speechless.speech.encoders import AudioWindow, encode_windows

    vectors = dict(encode_windows(model.encoder(), [AudioWindow((0, 0), audio)], setup[1].model_copy(update={"batch_size": 1,
                                                                                                          "length_bucket_s": 1.5})))[(0, 0)]
    example = model.encode(conversation()[:1], [vectors], with_answer=False)
    ours = model.logits(model.batch([example])).logits
    ids = torch.tensor([example.ids])
    native = model.lm(input_ids=ids, input_features=features["input_features"], input_features_mask=features["input_features_mask"],
                      attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(ours, native, atol=1e-4)


def _logits(model: SpeechLM, with_audio: bool) -> torch.Tensor:
    if with_audio:
        example = model.encode(conversation(), [torch.randn(12, 32, generator=torch.Generator().manual_seed(3))])
    else:
        example = model.encode([{"role": "user", "content": [{"type": "text", "text": "Transcribe the audio."}]},
                                {"role": "assistant", "content": "The teacher ate rice."}], [])
    with torch.no_grad():
        return model.logits(model.batch([example])).logits


def _perturb(model: SpeechLM) -> None:
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("speech_only", [True, False])
def test_depth_up_scaling_is_exactly_the_base_at_init_and_when_dropped(setup, speech_only):
    model = make(setup)
    base_audio, base_text = _logits(model, True), _logits(model, False)
    model.attach(AdapterConfig(kind="dus", dus_blocks=2, speech_only=speech_only))
    assert len(model.dus_after) == 2
    assert torch.equal(_logits(model, True), base_audio) and torch.equal(_logits(model, False), base_text)
    counts = model.parameter_counts()
    assert 0 < counts["trainable"] < counts["total"]
    assert all(name.startswith("lm.") and ".new." in name for name in model.trainable_parameters())
    _perturb(model)
    assert not torch.allclose(_logits(model, True)[:, -1], base_audio[:, -1])  # the answer (a text position) hears the audio change
    assert torch.equal(_logits(model, False), base_text) == speech_only  # speech-only: text-only inputs stay exactly the base
    remove_dus(model.lm)
    assert torch.equal(_logits(model, True), base_audio) and torch.equal(_logits(model, False), base_text)



@pytest.mark.parametrize("speech_only", [True, False])
def test_depth_up_scaling_on_a_kv_sharing_gemma4(setup, tmp_path, speech_only):
    """Gemma 4 E2B/E4B share K/V across their last blocks. All-position DUS may follow every block (KV-shared ones
    included) and speech-only DUS every block a KV-owning block follows: exactly the base at init and when dropped,
    and the last new block trains (reads the shared K/V). A speech-only block where no KV-owning block follows could
    never reach the answer: refused, and never the default."""
    config = json.loads((ROOT / "configs/llm/tiny_gemma4.json").read_text())
    config.update(num_hidden_layers=5, layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                                                     "full_attention"], num_kv_shared_layers=2, use_double_wide_mlp=True)
    (tmp_path / "kv_shared.json").write_text(json.dumps(config))
    _, encoder_cfg, sha, tokenizer = setup

    def fresh() -> SpeechLM:
        return load_speech_lm(BaseConfig(source=str(tmp_path / "kv_shared.json"), device="cpu"), encoder_cfg, sha, tokenizer)

    model = fresh()
    assert [i for i, layer in enumerate(model.lm.model.language_model.layers) if layer.self_attn.is_kv_shared_layer] == [3, 4]
    base_audio, base_text = _logits(model, True), _logits(model, False)
    after = [0, 1] if speech_only else [0, 1, 2, 3, 4]
    model.attach(AdapterConfig(kind="dus", dus_blocks=len(after), dus_after=after, speech_only=speech_only))
    assert model.dus_after == after
    assert torch.equal(_logits(model, True), base_audio) and torch.equal(_logits(model, False), base_text)
    example = model.encode(conversation(), [torch.randn(12, 32, generator=torch.Generator().manual_seed(3))])
    model.loss(model.batch([example])).backward()
    grad = model.lm.model.language_model.layers[after[-1]].new.self_attn.o_proj.weight.grad  # q/k/v get none at step 0
    assert grad is not None and grad.abs().sum() > 0
    remove_dus(model.lm)
    assert torch.equal(_logits(model, True), base_audio) and torch.equal(_logits(model, False), base_text)
    if speech_only:
        for bad in ([2], [3]):
            with pytest.raises(UsageError, match="KV-owning|K/V"):
                fresh().attach(AdapterConfig(kind="dus", dus_blocks=1, dus_after=bad))
        default = fresh()
        default.attach(AdapterConfig(kind="dus", dus_blocks=2))
        assert default.dus_after == [0, 1]

def test_speech_only_lora_keeps_text_exact(setup):
    model = make(setup)
    base_audio, base_text = _logits(model, True), _logits(model, False)
    model.attach(AdapterConfig(kind="lora", lora_rank=4))
    assert not any("audio_tower" in name for name in model.trainable_parameters())
    _perturb(model)
    assert torch.equal(_logits(model, False), base_text)
    assert not torch.allclose(_logits(model, True), base_audio)
    answers = model.generate([model.encode(conversation()[:1], [torch.randn(10, 32)], with_answer=False)] * 2, max_new_tokens=5)
    assert len(answers) == 2 and answers[0] == answers[1]


@pytest.mark.parametrize("kind", ["lora", "dus"])
def test_adapter_save_load_round_trip_and_wrong_base_refused(setup, tmp_path, kind):
    model = make(setup)
    model.attach(AdapterConfig(kind=kind, lora_rank=4, dus_blocks=1))
    _perturb(model)
    expected = _logits(model, True)
    model.save_adapter(tmp_path / "adapter", {"stage1": {"ref": "s1"}, "stage2": {"ref": "s2"}})
    record = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert record["base"]["weights_sha256"] == model.base_sha256 and record["stage1"] == {"ref": "s1"}
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter.safetensors", "adapter_config.json"}
    loaded, _ = load_adapter(tmp_path / "adapter", lambda rec: make(setup))
    assert torch.equal(_logits(loaded, True), expected)
    with pytest.raises(UsageError, match="adapter was trained for base weights"):
        load_adapter(tmp_path / "adapter", lambda rec: make(setup, seed=1))


def test_audio_tower_other_than_stage1_encoder_is_refused(setup):
    _, encoder_cfg, _, tokenizer = setup
    with pytest.raises(UsageError, match="not the encoder stage 1 was trained on"):
        load_speech_lm(BaseConfig(source=str(ROOT / "configs/llm/tiny_gemma4.json"), device="cpu"), encoder_cfg, "0" * 64, tokenizer)


def test_text_only_base_with_a_trained_projector(setup):
    model = make(setup, kind="text_lm", source="configs/llm/tiny_gemma3.json")
    assert not hasattr(model.lm.model, "audio_tower")
    base_text = _logits(model, False)
    model.attach(AdapterConfig(kind="dus", dus_blocks=1))
    names = set(model.trainable_parameters())
    assert any(n.startswith("projector.") for n in names) and any(".new." in n for n in names)
    batch = model.batch([model.encode(conversation(), [torch.randn(12, 32)])])
    loss = model.loss(batch)
    loss.backward()
    assert model.projector[1].weight.grad is not None and torch.isfinite(loss)
    assert torch.equal(_logits(model, False), base_text)


@pytest.mark.parametrize("kind", ["gemma4_audio", "text_lm"])
def test_loss_from_labelled_positions_equals_the_full_logits_loss(setup, kind):
    """The loss computes logits only where a labelled token is predicted; it equals cross-entropy over all logits."""
    source = "configs/llm/tiny_gemma4.json" if kind == "gemma4_audio" else "configs/llm/tiny_gemma3.json"
    model = make(setup, kind=kind, source=source)
    batch = model.batch([model.encode(conversation(), [torch.randn(12, 32)]),
                         model.encode(conversation("Mwalimu alikula wali nyumbani asubuhi."), [torch.randn(7, 32)])])
    with torch.no_grad():
        full = model.logits(batch).logits.float()
        expected = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                                     ignore_index=-100, reduction="sum")
        ours = model.loss(batch, reduction="sum")
    assert int((batch["labels"] != -100).sum()) > 10
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)


def test_frame_stacking_puts_k_frames_on_one_position(setup, tmp_path):
    from speechless.llm.model import stack_frames

    frames = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)
    stacked = stack_frames(frames, 2)
    assert stacked.shape == (3, 6)
    assert torch.equal(stacked[0], torch.cat([frames[0], frames[1]])) and torch.equal(stacked[2, 3:], torch.zeros(3))
    _, encoder_cfg, sha, tokenizer = setup
    cfg = BaseConfig(kind="text_lm", source=str(ROOT / "configs/llm/tiny_gemma3.json"), frame_stack=4, device="cpu")
    model = load_speech_lm(cfg, encoder_cfg, sha, tokenizer)
    assert model.projector[1].in_features == 4 * 32
    example = model.encode(conversation(), [torch.randn(13, 32)])
    assert example.ids.count(model.audio_id) == 4  # ceil(13 / 4)
    model.attach(AdapterConfig(kind="lora", lora_rank=4))
    loss = model.loss(model.batch([example]))
    loss.backward()
    assert torch.isfinite(loss) and model.projector[1].weight.grad is not None
    model.save_adapter(tmp_path / "adapter", {})
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base"]["frame_stack"] == 4
    with pytest.raises(UsageError, match="base.frame_stack=2: only a text_lm base"):
        load_speech_lm(BaseConfig(source=str(ROOT / "configs/llm/tiny_gemma4.json"), frame_stack=2, device="cpu"), encoder_cfg, sha, tokenizer)
