"""The Gemma 4 audio encoder (`kind: gemma4`) and the forward hook that captures the vectors stage 1 quantizes.

Stage 1 quantizes the INPUT of the audio tower's `output_proj` (1024-d at full size): the conformer's last hidden
states, before the projection into the LLM's multimodal space. A forward hook captures it; padded frames are dropped
with the encoder's own frame mask (4x subsampling of the mel mask).

Sources, all giving a `Gemma4AudioModel` in eval mode and a content hash of its weights (the "revision" every
downstream artifact records):
- a JSON file holding a `Gemma4AudioConfig` (or a full Gemma 4 config with `audio_config`): random weights from a
  fixed seed, for the offline demo and tests;
- a local folder or Hub repo of a standalone `Gemma4AudioModel`;
- a local folder or Hub repo of a full Gemma 4 checkpoint (`google/gemma-4-e2b-it`): only the tensors under
  `model.audio_tower.` are read, from only the shards that hold them; the LLM is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.training import resolve_device
from speechless.data.audio import SAMPLE_RATE
from speechless.speech.encoders.base import EncoderConfig, LoadedEncoder, bucketed

AUDIO_TOWER_PREFIX = "model.audio_tower."


@dataclass(frozen=True)
class Gemma4Encoder(LoadedEncoder):
    """A Gemma 4 audio tower in eval mode, with the feature extractor its checkpoint names."""

    model: torch.nn.Module
    feature_extractor: object
    revision: str
    source_commit: str | None
    dim: int
    device: torch.device
    dtype: torch.dtype
    kind: str = "gemma4"

    def padded_samples(self, samples: int, cfg: EncoderConfig) -> int:
        return bucketed(samples, cfg.length_bucket_s, 128)  # the extractor pads to multiples of 128 samples

    def encode_batch(self, audio: list[np.ndarray], padded: int, lengths: list[int], cfg: EncoderConfig) -> list[torch.Tensor]:
        """The hooked module's input for each row, its padded frames dropped with the tower's own frame mask."""
        captured: list[torch.Tensor] = []
        handle = _hooked_module(self.model, cfg.hook_module).register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
        try:
            features = self.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding="max_length",
                                              max_length=padded, truncation=False, pad_to_multiple_of=128)
            with torch.inference_mode():
                output = self.model(features["input_features"].to(self.device, self.dtype),
                                    attention_mask=features["input_features_mask"].to(self.device))
        finally:
            handle.remove()
        vectors, frame_mask = captured[0].float().cpu(), output.attention_mask.cpu()
        return [vectors[row][frame_mask[row]].clone() for row in range(len(audio))]


def weights_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _config_fields(config_dict: dict) -> dict:
    """Config keys for the constructor: no model_type, no `_comment`-style annotations."""
    return {k: v for k, v in config_dict.items() if k != "model_type" and not k.startswith("_")}


def _audio_config_from(config_dict: dict, where: str):
    from transformers import Gemma4AudioConfig

    model_type = config_dict.get("model_type")
    if model_type == "gemma4":
        audio = config_dict.get("audio_config")
        if not audio:
            raise UsageError(f"{where}: this Gemma 4 checkpoint has no audio tower (only E2B/E4B have one); use google/gemma-4-e2b-it")
        return Gemma4AudioConfig(**_config_fields(audio)), True
    if model_type in (None, "gemma4_audio"):
        return Gemma4AudioConfig(**_config_fields(config_dict)), False
    raise UsageError(f"{where}: model_type {model_type!r} is not a Gemma 4 audio encoder (expected gemma4 or gemma4_audio)")


def _load_tower_tensors(folder: Path, full_checkpoint: bool, fetch=None) -> dict[str, torch.Tensor]:
    """Read the audio tower's tensors from safetensors files, opening only the shards that hold them."""
    from safetensors import safe_open

    fetch = fetch or (lambda name: folder / name)
    prefix = AUDIO_TOWER_PREFIX if full_checkpoint else ""
    index_path = fetch("model.safetensors.index.json") if (full_checkpoint or (folder / "model.safetensors.index.json").exists()) else None
    if index_path is not None and Path(index_path).exists():
        weight_map = json.loads(Path(index_path).read_text())["weight_map"]
        shards = sorted({shard for key, shard in weight_map.items() if key.startswith(prefix)})
    else:
        shards = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = Path(fetch(shard))
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    if key.startswith(prefix):
                        tensors[key[len(prefix):]] = handle.get_tensor(key)
        except Exception as exc:  # safetensors raises several types for truncated/corrupt files
            raise RuntimeFailure(f"{path}: cannot read safetensors shard ({exc}); re-download the checkpoint") from exc
    if not tensors:
        raise UsageError(f"{folder}: no audio tower weights found (looked for keys starting with {prefix or 'any'!r})")
    return tensors


def _build(audio_config, tensors: dict[str, torch.Tensor] | None, seed: int, where: str) -> torch.nn.Module:
    from transformers import Gemma4AudioModel

    torch.manual_seed(seed)
    model = Gemma4AudioModel(audio_config)
    if tensors is not None:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise UsageError(f"{where}: audio tower weights do not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def load_gemma4(cfg: EncoderConfig) -> Gemma4Encoder:
    """Load the audio tower described by `cfg` (see the module docstring for the sources)."""
    from transformers import Gemma4AudioFeatureExtractor

    source = cfg.source
    path = Path(source)
    commit = None
    feature_extractor = Gemma4AudioFeatureExtractor()
    if path.suffix == ".json":
        if not path.is_file():
            raise UsageError(f"encoder.source: config file {source} not found")
        audio_config, _ = _audio_config_from(json.loads(path.read_text()), source)
        model = _build(audio_config, None, cfg.random_seed, source)
    elif path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UsageError(f"encoder.source: {source} has no config.json; point to a Gemma 4 checkpoint folder")
        audio_config, full = _audio_config_from(json.loads(config_file.read_text()), source)
        model = _build(audio_config, _load_tower_tensors(path, full), cfg.random_seed, source)
        if (path / "preprocessor_config.json").is_file():
            feature_extractor = Gemma4AudioFeatureExtractor.from_pretrained(str(path))
    elif re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) and not path.exists():
        model, feature_extractor, commit = _load_from_hub(source, cfg)
    else:
        raise UsageError(f"encoder.source: {source!r} is neither a config .json, a local folder nor a Hub id (owner/name)")
    device = resolve_device(cfg.device, "encoder.device")
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    revision = weights_sha256(model)
    _hooked_module(model, cfg.hook_module)  # fail early on a wrong hook path
    model = model.to(device=device, dtype=dtype)
    dim = _hooked_module(model, cfg.hook_module).in_features
    return Gemma4Encoder(model, feature_extractor, revision, commit, dim, device, dtype)


def _load_from_hub(repo_id: str, cfg: EncoderConfig):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    from transformers import Gemma4AudioFeatureExtractor

    def fetch(name: str) -> Path:
        try:
            return Path(hf_hub_download(repo_id, name, revision=cfg.revision))
        except EntryNotFoundError:
            return Path("/nonexistent") / name
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            raise RuntimeFailure(f"encoder.source: cannot download {name} from {repo_id} ({type(exc).__name__}); check the id, network and HF_TOKEN") from exc

    config_file = fetch("config.json")
    if not config_file.exists():
        raise UsageError(f"encoder.source: {repo_id} has no config.json")
    commit = config_file.parent.name  # hf cache layout: snapshots/<commit sha>/config.json
    audio_config, full = _audio_config_from(json.loads(config_file.read_text()), repo_id)
    model = _build(audio_config, _load_tower_tensors(config_file.parent, full, fetch), cfg.random_seed, repo_id)
    preprocessor = fetch("preprocessor_config.json")
    feature_extractor = Gemma4AudioFeatureExtractor.from_pretrained(str(preprocessor.parent)) if preprocessor.exists() else Gemma4AudioFeatureExtractor()
    return model, feature_extractor, commit


def _hooked_module(model: torch.nn.Module, dotted: str) -> torch.nn.Module:
    try:
        module = model.get_submodule(dotted)
    except AttributeError as exc:
        names = [name for name, _ in model.named_children()]
        raise UsageError(f"encoder.hook_module: no module {dotted!r} in the audio tower; top-level modules: {', '.join(names)}") from exc
    if not hasattr(module, "in_features"):
        raise UsageError(f"encoder.hook_module: {dotted!r} is not a Linear layer; stage 1 captures the input of a projection like output_proj")
    return module
