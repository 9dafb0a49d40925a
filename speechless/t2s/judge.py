"""The Speechless judge: Whisper's own frozen decoder reads stage-1 vectors back to text (stage 1 on a Whisper encoder).

Three readings of the same held-out utterances, each scored by WER and CER against the text (`probe_text` forms) with
95 % bootstrap intervals over utterances:
- continuous: the encoder's states of the real audio, no quantization (the ceiling);
- real tokens: stage 1's codes of that audio, dequantized (what the quantizer costs: paired against continuous);
- generated tokens: stage 2's codes from the text alone, dequantized (what stage 2 costs: paired against real tokens).
This is the benchmark the Speechless authors ran (text -> Speechless -> dequantize -> Whisper decoder -> WER).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from speechless.core.errors import UsageError
from speechless.core.intervals import edit_counts, paired_rate_comparison, rate_interval
from speechless.data.manifest import read_manifest
from speechless.speech.features import encode_entries
from speechless.speech.tokenizer import SpeechTokenizer

READINGS = ("continuous", "real", "generated")


def whisper_judge(stage1_folder: Path, rows: list[dict], generated_codes: list[torch.Tensor], manifest: str | None,
                  language: str | None = None) -> dict:
    """WER/CER of Whisper's decoder on the continuous states, real tokens and stage-2 tokens of `rows` (held-out
    stage-1 token rows; their audio is found by id in `manifest`), with intervals and the paired comparisons."""
    started = time.time()
    tokenizer = SpeechTokenizer.load(str(stage1_folder))
    encoder = tokenizer.encoder
    if getattr(encoder, "kind", "") != "whisper":
        raise UsageError(f"eval.judge whisper: stage 1 ({stage1_folder}) sits on a {encoder.kind} encoder; Whisper's decoder "
                         "reads only Whisper states (use eval.judge probe, or a stage 1 with encoder.kind whisper)")
    if not manifest:
        raise UsageError("eval.judge whisper: no manifest to find the held-out recordings in (set data.manifest)")
    by_id = {entry.id: entry for entry in read_manifest(manifest)}
    missing = [r["id"] for r in rows if r["id"] not in by_id]
    if missing:
        raise UsageError(f"{manifest}: no recording for held-out utterance {missing[0]!r} ({len(missing)} missing); "
                         "give the manifest stage 1 was trained on (data.manifest)")
    entries = [by_id[r["id"]] for r in rows]
    languages = [language or entry.language for entry in entries]
    if not all(languages):
        raise UsageError(f"{manifest}: an utterance has no `language`; set eval.judge_language to a Whisper code (en, fr, sw, ...)")
    rvq = tokenizer.rvq
    rvq.eval()
    vectors = {
        "continuous": [u.vectors for u in encode_entries(entries, encoder, tokenizer.encoder_cfg)],
        "real": [rvq.decode(torch.tensor(r["codes"]).T) for r in rows],
        "generated": [rvq.decode(c.T) if c.shape[1] else torch.zeros(1, rvq.dim) for c in generated_codes],
    }
    texts = [r["text"] for r in rows]
    hyps = {name: encoder.transcribe(vectors[name], languages) for name in READINGS}
    out: dict = {"utterances": len(rows), "languages": sorted(set(languages)), "decoder": "whisper greedy, states x2 (50/s) + silent tail"}
    counts = {}
    for unit, key in (("word", "wer"), ("char", "cer")):
        for name in READINGS:
            counts[key, name] = edit_counts(texts, hyps[name], unit)
            out[f"{key}_{name}"] = rate_interval(*counts[key, name])
        lengths = counts[key, "real"][1]
        out[f"{key}_quantizer_cost"] = paired_rate_comparison(counts[key, "continuous"][0], counts[key, "real"][0], lengths)
        out[f"{key}_stage2_cost"] = paired_rate_comparison(counts[key, "real"][0], counts[key, "generated"][0], lengths)
    out["examples"] = [{"id": rows[i]["id"], "text": texts[i], **{name: hyps[name][i] for name in READINGS}} for i in range(min(5, len(rows)))]
    out["seconds"] = round(time.time() - started, 1)
    return out
