"""The adapters that teach the stage-3 base speech, and the adapter side of `SpeechLM` (attaching, trainable
parameters, saving and loading the adapter tensors).

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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from speechless.core.config import Section
from speechless.core.errors import UsageError
from speechless.core.io import save_tensors, write_json

ADAPTER_FORMAT = "speechless-stage3-adapter"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


class SpeechLMAdapters:
    """The adapter side of `SpeechLM` (a mixin): attach LoRA or DUS, the trainable parameters, the adapter tensors and
    their saving and loading. Uses the SpeechLM's `lm`, `adapter`, `dus_after`, `positions`, `projector`, `base_cfg`,
    `base_sha256`, `source_record` and `encoder_cfg`."""

    def _adapter_state(self, has_audio: bool):
        """Context: LoRA switched off for a text-only input when the adapter is speech-only."""
        import contextlib

        if self.adapter is not None and self.adapter.kind == "lora" and self.adapter.speech_only and not has_audio:
            return self.lm.disable_adapter()
        return contextlib.nullcontext()

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
