"""Stage-2 checkpoints: `save()` writes `config.json` (everything needed to rebuild, including the backbone's HF
config and the stage-1 revision the codes belong to), `tokenizer.json` and the weights as safetensors; `load()` reads
them back into the decoder the config names. Nothing is pickled, nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.io import atomic_path, load_tensors, read_json, save_tensors, write_json
from speechless.t2s.config import FRAMES_PER_SECOND, T2SConfig
from speechless.t2s.duration import DurationModel
from speechless.t2s.text import TextEncoder

FORMAT = "speechless-t2s"
FORMAT_VERSION = 1
#: One metadata key only: safetensors writes metadata in hash-map order, so two keys would make identical weights
#: give different bytes from run to run.
WEIGHTS_METADATA = {"format": f"{FORMAT}/{FORMAT_VERSION}"}


class T2SCheckpoint:
    """Persistence of a `T2SModel` (a mixin: the model's own attributes are what it saves)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """All weights, with tied (shared) tensors stored once: the LM head, never used, is left out."""
        state = self.state_dict()
        return {k: v for k, v in state.items() if not k.startswith("lm.lm_head.")}

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        _check_weights(self.tensors(), tensors, source)
        self.load_state_dict(tensors, strict=False)

    def config_dict(self) -> dict:
        return dict(
            format=FORMAT, version=FORMAT_VERSION, model=self.cfg.model_dump(mode="json"),
            backbone_config=self.lm.config.to_dict(), backbone_source=self.backbone_source,
            num_levels=self.num_levels, codebook_size=self.codebook_size, frames_per_second=FRAMES_PER_SECOND,
            delays=self.delays, speakers=self.speakers,
            duration_model=self.duration.coef if self.duration is not None else None,
            known_chars="".join(sorted(self.text.known_chars)) if self.text.known_chars is not None else None,
            special_ids={"eoa": self.eoa, "pad": self.pad, "boa": self.boa},
            stage1=self.stage1, vector_dim=None,  # the parallel decoder's: the size of a stage-1 vector
        )

    @classmethod
    def saved_inputs(cls, meta: dict) -> dict:
        """The decoder's own constructor arguments from a saved `config.json` (`decoder_inputs`)."""
        return {}

    def save(self, folder: str | Path, weights: str = "model.safetensors") -> Path:
        """Write `weights` (safetensors), config.json and tokenizer.json into `folder`, atomically each."""
        folder = Path(folder)
        self.save_weights(folder / weights)
        write_json(folder / "config.json", self.config_dict())
        with atomic_path(folder / "tokenizer.json") as tmp:
            self.text.tokenizer.save(str(tmp))
        return folder / weights

    def save_weights(self, path: str | Path) -> None:
        save_tensors(path, self.tensors(), metadata=WEIGHTS_METADATA)

    @classmethod
    def load(cls, folder: str | Path, weights: str = "model.safetensors", device: str | None = None) -> T2SCheckpoint:
        """Rebuild from `save()` output (JSON + tokenizer.json + safetensors; no download, no pickle)."""
        folder = Path(folder)
        meta, cfg, text, backbone = _read_checkpoint(folder)
        from speechless.t2s.model import decoder_class

        decoder = decoder_class(cfg.decoder)
        if not issubclass(decoder, cls):
            raise UsageError(f"{folder}: a model.decoder {cfg.decoder!r} checkpoint, not a {cls.__name__}")
        model = decoder(cfg, backbone, text, int(meta["num_levels"]), int(meta["codebook_size"]), meta.get("speakers") or [],
                        meta["stage1"], meta.get("backbone_source"),
                        DurationModel(meta["duration_model"]) if meta.get("duration_model") else None,
                        **decoder.saved_inputs(meta))
        model.load_weights(load_tensors(folder / weights), str(folder / weights))
        if device is not None:
            model.to(device)
        return model.eval()


def _read_checkpoint(folder: Path) -> tuple[dict, T2SConfig, TextEncoder, torch.nn.Module]:
    """(config.json, the model config, the text encoder, the backbone with fresh weights) of a `save()` folder."""
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = read_json(folder / "config.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UsageError(f"{folder / 'config.json'}: not a speechless stage-2 (text-to-token) checkpoint")
    if meta.get("version") != FORMAT_VERSION:
        raise UsageError(f"{folder}: stage-2 checkpoint version {meta.get('version')} is not supported (expected {FORMAT_VERSION})")
    cfg = T2SConfig.model_validate(meta["model"])
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise UsageError(f"{tok_path}: file not found; the checkpoint is incomplete")
    try:
        tokenizer = Tokenizer.from_file(str(tok_path))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise RuntimeFailure(f"{tok_path}: corrupt tokenizer file ({exc})") from exc
    text = TextEncoder(tokenizer, meta.get("known_chars"), cfg.max_text_tokens)
    bc = dict(meta["backbone_config"])
    hf_config = AutoConfig.for_model(bc.pop("model_type"), **bc)
    return meta, cfg, text, AutoModelForCausalLM.from_config(hf_config)


def _check_weights(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str) -> None:
    """RuntimeFailure unless `tensors` has exactly the names and shapes of `expected`."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise RuntimeFailure(f"{source}: weights do not match the model config (missing {missing[:3]}, unexpected "
                             f"{extra[:3]}); the weights file and config.json disagree")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise RuntimeFailure(f"{source}: tensor {name} has shape {tuple(value.shape)}, config expects {tuple(expected[name].shape)}")
