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

The base (`BaseConfig`, its loading and checks) is `speechless.llm.base`; the adapters (`AdapterConfig`, LoRA, depth
up-scaling, their saving and loading) are `speechless.llm.adapters`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.io import load_tensors, read_json
from speechless.core.training import resolve_device
from speechless.llm.adapters import ADAPTER_FORMAT, AdapterConfig, AudioPositions, SpeechLMAdapters
from speechless.llm.base import BaseConfig, audio_tokens, base_weights_sha256, chat_turns, load_base_model, pick_dtype
from speechless.speech.encoders import EncoderConfig, Gemma4Encoder, LoadedEncoder, weights_sha256


def stack_frames(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """(T, d) frames -> (ceil(T / k), k x d): k consecutive frames side by side, the last group zero-padded."""
    if k == 1:
        return vectors
    pad = -len(vectors) % k
    if pad:
        vectors = torch.cat([vectors, vectors.new_zeros(pad, vectors.shape[1])])
    return vectors.reshape(len(vectors) // k, k * vectors.shape[1])


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


class SpeechLM(SpeechLMAdapters, torch.nn.Module):
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

            from speechless.speech.encoders import load_encoder

            if self.is_gemma4:
                tower = self._inner().model.audio_tower
                param = next(tower.parameters())
                self._encoder = Gemma4Encoder(tower, Gemma4AudioFeatureExtractor(), weights_sha256(tower), None,
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


def load_speech_lm(base_cfg: BaseConfig, encoder_cfg: EncoderConfig, expected_encoder_sha256: str | None, tokenizer=None) -> SpeechLM:
    """Load the base, check its audio tower is the stage-1 encoder (refuse a mismatch), wrap it."""
    if base_cfg.kind == "gemma4_audio" and encoder_cfg.kind != "gemma4":
        raise UsageError(f"base.kind gemma4_audio hears through Gemma 4's own audio tower, but stage 1 sits on a {encoder_cfg.kind} "
                         "encoder; use a text LM base (base.kind text_lm: the projector reads that encoder's vectors)")
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
