"""Stage-2 evaluation: the semantic round trip on held-out sentences.

A CTC probe trained on REAL stage-1 tokens (the judge, `speechless.t2s.probe`) reads the real tokens of held-out audio and
the tokens a stage-2 model generates from the same sentences' text: probe CER real vs generated, durations, per-level
code usage, and the DTW-aligned cosine of the decoded vectors. Used by the stage-2 recipe and `speechless stage2 eval`.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from speechless.core import log
from speechless.core.config import Section
from speechless.core.intervals import edit_counts, paired_rate_comparison, rate_interval
from speechless.core.io import read_json
from speechless.core.metrics import cer
from speechless.core.store import StoreConfig
from speechless.speech.tokens import (
    Stage1,
    check_stage1_match,
    load_split,
    resolve_stage1,
    row_codes,
    speaker_map,
    stage1_codebooks,
    stage1_manifest,
)
from speechless.t2s.generate import GenerateConfig, GenRequest, generate_rows, load_stage2
from speechless.t2s.model import T2SModel
from speechless.t2s.probe import CTCProbe


class EvalConfig(Section):
    split: str = "test"
    """Held-out split of the stage-1 tokens for the round trip (sentences the model never saw)."""
    max_utterances: int | None = Field(None, ge=1)
    """Evaluate on at most this many utterances of the split (None = all)."""
    weights: Literal["final", "best"] = "final"
    """Which weights generate the round-trip tokens."""
    speakers: Literal["each", "default"] = "each"
    """'each': generate every held-out utterance's text in that utterance's speaker (like-for-like with the real
    tokens); 'default': all in `generate.speaker`."""
    judge: Literal["probe", "whisper", "both"] = "probe"
    """'probe': the CTC probe reads the tokens back (every encoder). 'whisper' or 'both': Whisper's own decoder also
    reads the continuous states, real tokens and generated tokens (WER/CER with intervals; stage 1 must sit on a
    Whisper encoder); with 'whisper' the stage-2 bar is read on its CER. The probe is trained and read in every case:
    the CTC alignment and stage 3's choice among draws need it."""
    judge_language: str | None = None
    """Whisper language code the judge decodes in (en, fr, sw, ...); None = each utterance's manifest `language`."""


def load_probe(probe_dir: Path, stage1: Stage1) -> CTCProbe:
    """A saved probe, with the stage-1 codebooks when it reads decoded vectors."""
    reads_vectors = read_json(probe_dir / "config.json").get("probe", {}).get("input") == "vectors"
    return CTCProbe.load(probe_dir, stage1_codebooks(stage1) if reads_vectors else None)


def dtw_cosine(generated: list[torch.Tensor], real: list[torch.Tensor], center: torch.Tensor | None = None) -> list[float]:
    """Mean cosine similarity along the DTW path (cost 1 - cos) between each pair of (T, D) vector sequences.

    All pairs run together: one loop over anti-diagonals of a padded (P, N, M) cost tensor.
    """
    if not generated:
        return []
    p = len(generated)
    n = max(g.shape[0] for g in generated)
    m = max(r.shape[0] for r in real)
    cost = torch.full((p, n, m), math.inf, dtype=torch.float64)
    for i, (g, r) in enumerate(zip(generated, real)):
        if center is not None:
            g, r = g - center, r - center
        gn = torch.nn.functional.normalize(g.double(), dim=-1)
        rn = torch.nn.functional.normalize(r.double(), dim=-1)
        cost[i, : g.shape[0], : r.shape[0]] = 1 - gn @ rn.T
    acc = torch.full((p, n, m), math.inf, dtype=torch.float64)
    length = torch.zeros((p, n, m), dtype=torch.float64)
    acc[:, 0, 0] = cost[:, 0, 0]
    length[:, 0, 0] = 1
    inf = torch.full((p, 1), math.inf, dtype=torch.float64)
    for k in range(1, n + m - 1):
        i = torch.arange(max(0, k - m + 1), min(k, n - 1) + 1)
        j = k - i
        up = torch.where((i >= 1)[None], acc[:, (i - 1).clamp_min(0), j], inf)
        left = torch.where((j >= 1)[None], acc[:, i, (j - 1).clamp_min(0)], inf)
        diag = torch.where(((i >= 1) & (j >= 1))[None], acc[:, (i - 1).clamp_min(0), (j - 1).clamp_min(0)], inf)
        stacked = torch.stack([diag, up, left], -1)
        best, arg = stacked.min(-1)
        prev_len = torch.stack([length[:, (i - 1).clamp_min(0), (j - 1).clamp_min(0)], length[:, (i - 1).clamp_min(0), j],
                                length[:, i, (j - 1).clamp_min(0)]], -1).gather(-1, arg.unsqueeze(-1)).squeeze(-1)
        acc[:, i, j] = cost[:, i, j] + best
        length[:, i, j] = prev_len + 1
    out = []
    for idx, (g, r) in enumerate(zip(generated, real)):
        a, b = g.shape[0] - 1, r.shape[0] - 1
        out.append(float(1 - acc[idx, a, b] / length[idx, a, b]))
    return out


def _usage(codes: list[torch.Tensor], codebook_size: int) -> dict:
    from speechless.core.metrics import code_usage, usage_stats

    flat = torch.cat([c.T for c in codes if c.shape[1]]) if any(c.shape[1] for c in codes) else torch.zeros(0, codes[0].shape[0], dtype=torch.long)
    utilization, perplexity = usage_stats(code_usage(flat, codebook_size))
    return {"utilization": [round(u, 4) for u in utilization], "perplexity": [round(p, 1) for p in perplexity], "frames": int(flat.shape[0])}


def round_trip(model: T2SModel, probe: CTCProbe, rows: list[dict], speakers: dict[str, str], gen: GenerateConfig,
               ev: EvalConfig, stage1_folder: Path, manifest: str | None = None) -> tuple[dict, list[dict]]:
    """The semantic round trip on held-out rows: (eval metrics, generated token rows). With `ev.judge` 'both', also
    Whisper's decoder on the same rows (`speechless.t2s.judge`; their recordings are found in `manifest`)."""
    from speechless.speech.rvq import SpeechRVQ

    started = time.time()
    requests = [GenRequest(r["id"], r["text"], speakers.get(r["id"]) if ev.speakers == "each" and speakers.get(r["id"]) in model.speakers else None)
                for r in rows]
    generated = generate_rows(model, requests, gen)
    gen_seconds = time.time() - started
    real_codes = [row_codes(r) for r in rows]
    gen_codes = [row_codes(r) for r in generated]
    texts = [r["text"] for r in rows]
    hyp_real = probe.transcribe(real_codes)
    hyp_gen = probe.transcribe(gen_codes)
    real_frames = torch.tensor([c.shape[1] for c in real_codes], dtype=torch.float64)
    gen_frames = torch.tensor([c.shape[1] for c in gen_codes], dtype=torch.float64)
    ratio = gen_frames / real_frames
    rvq = SpeechRVQ.load(stage1_folder)

    def vectors(codes: list[torch.Tensor]) -> list[torch.Tensor]:
        return [rvq.decode(c.T) if c.shape[1] else torch.zeros(1, rvq.dim) for c in codes]

    real_vec, gen_vec = vectors(real_codes), vectors(gen_codes)
    center = torch.cat(real_vec).double().mean(0)
    cos = dtw_cosine(gen_vec, real_vec)
    ccos = dtw_cosine(gen_vec, real_vec, center)
    # references: real vs real of the same sentence from another speaker, and of a different sentence
    by_text: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        by_text.setdefault(t, []).append(i)
    same = [(i, next(j for j in by_text[t] if j != i)) for i, t in enumerate(texts) if len(by_text[t]) > 1]
    rng = random.Random(0)
    other = [(i, j) for i in range(len(texts)) for j in [rng.randrange(len(texts))] if texts[j] != texts[i]]
    ref_same = dtw_cosine([real_vec[i] for i, _ in same], [real_vec[j] for _, j in same], center) if same else []
    ref_other = dtw_cosine([real_vec[i] for i, _ in other], [real_vec[j] for _, j in other], center) if other else []
    per_speaker = {}
    for spk in sorted({speakers.get(r["id"]) for r in rows if speakers.get(r["id"])}):
        idx = [i for i, r in enumerate(rows) if speakers.get(r["id"]) == spk]
        per_speaker[spk] = {"utterances": len(idx), "probe_cer_real": round(cer([texts[i] for i in idx], [hyp_real[i] for i in idx]), 4),
                            "probe_cer_generated": round(cer([texts[i] for i in idx], [hyp_gen[i] for i in idx]), 4)}

    def mean(values) -> float | None:
        values = list(values)
        return round(sum(values) / len(values), 4) if values else None

    metrics = {
        "split": ev.split,
        "utterances": len(rows),
        "sentences": len(by_text),
        "probe_cer_real": round(cer(texts, hyp_real), 4),
        "probe_cer_generated": round(cer(texts, hyp_gen), 4),
        "probe_cer_ratio": round(cer(texts, hyp_gen) / max(cer(texts, hyp_real), 1e-9), 3),
        "per_speaker": per_speaker,
        "duration": {
            "real_frames_mean": round(float(real_frames.mean()), 2),
            "generated_frames_mean": round(float(gen_frames.mean()), 2),
            "ratio_mean": round(float(ratio.mean()), 4),
            "abs_relative_error_mean": round(float((ratio - 1).abs().mean()), 4),
            "correlation": round(float(torch.corrcoef(torch.stack([real_frames, gen_frames]))[0, 1]), 4) if len(rows) > 1 else None,
            "capped": sum(bool(r["capped"]) for r in generated),
        },
        "code_usage": {"generated": _usage(gen_codes, model.codebook_size), "real": _usage(real_codes, model.codebook_size)},
        "dtw_cosine": mean(cos),
        "dtw_centered_cosine": mean(ccos),
        "dtw_centered_cosine_reference": {"real_same_sentence_other_speaker": mean(ref_same),
                                          "real_different_sentence": mean(ref_other)},
        "generation": {"decoder": model.cfg.decoder, "temperature": gen.temperature, "top_k": gen.top_k, "guidance": gen.guidance, "speakers": ev.speakers,
                       "seconds": round(gen_seconds, 2), "frames_per_second": round(float(gen_frames.sum()) / max(gen_seconds, 1e-9), 1)},
        "examples": [{"id": rows[i]["id"], "text": texts[i], "probe_real": hyp_real[i], "probe_generated": hyp_gen[i],
                      "frames_real": int(real_frames[i]), "frames_generated": int(gen_frames[i])} for i in range(min(5, len(rows)))],
        "judge": ev.judge,
    }
    errors, lengths = edit_counts(texts, hyp_real, "char")
    metrics["probe_cer_real_interval"] = rate_interval(errors, lengths)
    gen_errors, _ = edit_counts(texts, hyp_gen, "char")
    metrics["probe_cer_generated_interval"] = rate_interval(gen_errors, lengths)
    metrics["probe_cer_ratio_interval"] = paired_rate_comparison(errors, gen_errors, lengths)["ratio"]
    if ev.judge in ("whisper", "both"):
        from speechless.t2s.judge import whisper_judge

        log.info(f"Whisper judge: decoding {len(rows)} held-out utterances three ways (continuous, real, generated)")
        metrics["whisper"] = whisper_judge(stage1_folder, rows, gen_codes, manifest, ev.judge_language)
    return metrics, generated


def evaluate_checkpoint(ref: str, stage1_ref: str | None, split: str, gen: GenerateConfig, ev: EvalConfig,
                        manifest: str | None = None, store_cfg: StoreConfig | None = None) -> dict:
    """`speechless stage2 eval`: the round trip of a stage-2 checkpoint (with its probe) on a stage-1 split."""
    model, _, folder = load_stage2(ref, ev.weights, store_cfg)
    stage1_ref = stage1_ref or model.stage1.get("version") or model.stage1.get("ref")
    check_stage1_match(model.stage1, stage1_ref, store_cfg)
    stage1 = resolve_stage1(stage1_ref, store_cfg)
    rows = load_split(stage1, split)
    if ev.max_utterances is not None:
        rows = rows[: ev.max_utterances]
    probe = load_probe(folder / "probe", stage1)
    speakers = speaker_map(stage1, manifest)
    metrics, _ = round_trip(model, probe, rows, speakers, gen, ev.model_copy(update={"split": split}), stage1.folder,
                            stage1_manifest(stage1, manifest))
    return metrics
