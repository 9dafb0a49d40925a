"""Stage-2 backbone: the Hugging Face causal LM the model runs (random weights from a config, pretrained from the Hub,
a folder or a GGUF), cut to its first layers if asked, and the tokenizer that comes with it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from speechless.core.errors import UsageError
from speechless.core.io import read_json

if TYPE_CHECKING:
    from speechless.t2s.config import T2SConfig

def load_backbone(cfg: T2SConfig, vocab_size: int | None, seed: int = 0):
    """(causal LM, source record): random weights from a JSON config, or pretrained from the Hub / a folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = cfg.backbone
    if source.endswith(".json"):
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"model.backbone {source}: config file not found")
        data = read_json(path)
        if not isinstance(data, dict) or "model_type" not in data:
            raise UsageError(f"model.backbone {source}: not a Hugging Face model config (no 'model_type')")
        if cfg.backbone_layers is not None:
            raise UsageError(f"model.backbone_layers={cfg.backbone_layers}: a config backbone ({source}) sets its layers itself "
                             "(num_hidden_layers); set model.backbone_layers=null")
        data = dict(data)
        if vocab_size is not None:
            data["vocab_size"] = vocab_size
        try:
            hf_config = AutoConfig.for_model(data.pop("model_type"), **data)
        except (ValueError, KeyError) as exc:
            raise UsageError(f"model.backbone {source}: {exc}") from exc
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config)
        return model, {"source": source, "pretrained": False}
    from speechless.core.gguf_source import is_gguf_source, load_causal_lm

    if is_gguf_source(source):
        model, _, record = load_causal_lm(source, cfg.backbone_revision, "model.backbone", with_tokenizer=False)
        if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
        return keep_layers(model, cfg.backbone_layers), {**record, "pretrained": True, "layers": cfg.backbone_layers}
    try:
        # safetensors only: a repo or folder holding only pickled weights (.bin) is refused, never unpickled
        model = AutoModelForCausalLM.from_pretrained(source, revision=cfg.backbone_revision, dtype=torch.float32, use_safetensors=True)
    except OSError as exc:
        raise UsageError(f"model.backbone {source}: cannot load a pretrained causal LM ({str(exc).splitlines()[0]}); "
                         f"check the id / folder and network access, or use a .json config for random weights") from exc
    if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size)
    commit = getattr(model.config, "_commit_hash", None)
    return keep_layers(model, cfg.backbone_layers), {"source": source, "pretrained": True, "revision": cfg.backbone_revision,
                                                     "commit": commit, "layers": cfg.backbone_layers}


def keep_layers(model, n: int | None):
    """The causal LM cut to its first `n` decoder layers (config updated, so a saved checkpoint rebuilds that shape)."""
    if n is None:
        return model
    inner = model.base_model
    total = len(inner.layers)
    if n > total:
        raise UsageError(f"model.backbone_layers={n}: the backbone has {total} decoder layers; set at most {total} (or null)")
    inner.layers = inner.layers[:n]
    for config in {id(c): c for c in (model.config, inner.config)}.values():
        config.num_hidden_layers = n
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types)[:n]
    return model


def pretrained_tokenizer_file(cfg: T2SConfig) -> Path:
    """The `tokenizer.json` of a pretrained backbone (local folder, Hub, or a GGUF's converted copy)."""
    from speechless.core.gguf_source import converted_folder, is_gguf_source

    if is_gguf_source(cfg.backbone):
        return converted_folder(cfg.backbone, cfg.backbone_revision, "model.backbone")[0] / "tokenizer.json"
    local = Path(cfg.backbone) / "tokenizer.json"
    if local.is_file():
        return local
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(cfg.backbone, "tokenizer.json", revision=cfg.backbone_revision))
    except Exception as exc:  # huggingface_hub raises many types; one clear line
        raise UsageError(f"model.backbone {cfg.backbone}: no tokenizer.json to load ({type(exc).__name__}); "
                         f"set model.tokenizer to a tokenizer.json file") from exc


def count_parameters(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
