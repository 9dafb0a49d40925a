"""Quantizer metrics, computed in fixed-size chunks so N can be millions of vectors; the text metrics every judge
shares (`probe_text`, `cer`).

`quantizer_metrics(x, x_hat, codes, codebook_size)` returns plain Python numbers (JSON-ready):
  mse              mean over all elements of (x - x_hat)^2, in the units of x
  nmse             mse / mean per-dimension variance of x (0 = perfect, 1 = as bad as predicting the mean)
  cosine           mean over vectors of cos(x, x_hat) (inflated when x has a large common mean)
  centered_cosine  mean over vectors of cos(x - mu, x_hat - mu), mu = mean of x over the set
  utilization      per level: share of the codebook_size codes used at least once
                   (bounded by 1 - exp(-N / codebook_size) even for perfectly uniform use)
  perplexity       per level: exp(entropy of the code-usage distribution), at most codebook_size
  num_vectors      N
"""

from __future__ import annotations

import math
import re
import unicodedata

import torch

from speechless.core.errors import UsageError

_CHUNK = 65_536


def _check(x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
    if x.ndim != 2 or x_hat.shape != x.shape:
        raise UsageError(f"quantizer_metrics: x and x_hat must both be (N, D); got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if codes.ndim != 2 or codes.shape[0] != x.shape[0]:
        raise UsageError(f"quantizer_metrics: codes must be (N, Q) with N = {x.shape[0]}; got {tuple(codes.shape)}")
    if x.shape[0] == 0:
        raise UsageError("quantizer_metrics: no vectors given")


def code_usage(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """(Q, codebook_size) int64 counts of each code per level."""
    q = codes.shape[1]
    counts = torch.zeros(q, codebook_size, dtype=torch.long)
    for start in range(0, codes.shape[0], _CHUNK):
        block = codes[start:start + _CHUNK].to("cpu", torch.long)
        if block.numel() and (int(block.min()) < 0 or int(block.max()) >= codebook_size):
            raise UsageError(f"quantizer_metrics: code ids must lie in [0, {codebook_size}); got {int(block.min())}..{int(block.max())}")
        for level in range(q):
            counts[level] += torch.bincount(block[:, level], minlength=codebook_size)
    return counts


def usage_stats(counts: torch.Tensor) -> tuple[list[float], list[float]]:
    """(utilization, perplexity) per level from (Q, K) counts."""
    utilization, perplexity = [], []
    for row in counts.to(torch.float64):
        total = row.sum()
        utilization.append(float((row > 0).to(torch.float64).mean()))
        p = row[row > 0] / total
        perplexity.append(float(torch.exp(-(p * p.log()).sum())))
    return utilization, perplexity


@torch.no_grad()
def quantizer_metrics(x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor, codebook_size: int,
                      chunk: int = _CHUNK) -> dict:
    """Reconstruction and code-usage metrics of a quantizer on a set of vectors (see the module docstring)."""
    _check(x, x_hat, codes)
    n, d = x.shape
    # pass 1: mean and second moment of x (float64 accumulators)
    total = torch.zeros(d, dtype=torch.float64)
    for start in range(0, n, chunk):
        total += x[start:start + chunk].to(torch.float64).sum(0)
    mu = total / n
    sq_err = var_sum = cos_sum = ccos_sum = 0.0
    for start in range(0, n, chunk):
        xb = x[start:start + chunk].to(torch.float64)
        hb = x_hat[start:start + chunk].to(torch.float64)
        sq_err += float(((xb - hb) ** 2).sum())
        var_sum += float(((xb - mu) ** 2).sum())
        cos_sum += float(torch.nn.functional.cosine_similarity(xb, hb, dim=1, eps=1e-12).sum())
        ccos_sum += float(torch.nn.functional.cosine_similarity(xb - mu, hb - mu, dim=1, eps=1e-12).sum())
    mse = sq_err / (n * d)
    variance = var_sum / (n * d)
    utilization, perplexity = usage_stats(code_usage(codes, codebook_size))
    return dict(
        mse=mse,
        nmse=mse / variance if variance > 0 else math.nan,
        cosine=cos_sum / n,
        centered_cosine=ccos_sum / n,
        utilization=utilization,
        perplexity=perplexity,
        num_vectors=n,
    )


CLAIM_RATIO = 0.9
"""The Speechless claim, per task: the model adapted on stage-2 speech only scores at least this share of the same
adapter trained on real speech (the topline)."""


def claim_checks(summary: dict) -> dict:
    """Stage 3's `eval` summary -> per task of its main model: score, ratio to the real-speech topline and whether it
    is >= CLAIM_RATIO; for closed tasks the best no-listening baseline and whether the score is above it; and
    `holds`: every check met (None without a topline comparison)."""
    main = summary.get("main", "")
    ratios = (summary.get("topline_comparison") or {}).get(main.split("/")[-1], {})
    scores = ((summary.get("comparison") or {}).get(main) or {}).get("scores", {})
    baselines = summary.get("no_listening_baselines") or {}
    tasks: dict[str, dict] = {}
    for task, row in ratios.items():
        ratio = row.get("ratio_to_topline")
        check = {"score": scores.get(task, {}).get("score"), "real_speech_topline": row.get("real_speech_topline"),
                 "ratio_to_topline": ratio, "meets_ratio": ratio is not None and ratio >= CLAIM_RATIO}
        if task in baselines and check["score"] is not None:
            check["best_no_listening"] = max(v for k, v in baselines[task].items() if k != "n")
            check["above_no_listening"] = check["score"] > check["best_no_listening"]
        tasks[task] = check
    holds = all(c["meets_ratio"] and c.get("above_no_listening", True) for c in tasks.values()) if tasks else None
    return {"tasks": tasks, "holds": holds}


def seeds_summary(per_seed: dict[str, dict]) -> dict:
    """{seed: stage 3's `eval` summary} -> every seed's `claim_checks`, the mean per task of the synthetic-speech
    score, the topline's and their ratio, and at how many seeds the claim holds (it holds when it holds at every one)."""
    checks = {seed: claim_checks(summary) for seed, summary in per_seed.items()}
    tasks = sorted({task for check in checks.values() for task in check["tasks"]})

    def mean(task: str, key: str) -> float | None:
        values = [c["tasks"][task][key] for c in checks.values() if c["tasks"].get(task, {}).get(key) is not None]
        return round(sum(values) / len(values), 4) if values else None

    holds_at = sum(check["holds"] is True for check in checks.values())
    return {"seeds": checks, "mean_score": {t: mean(t, "score") for t in tasks},
            "mean_real_speech_topline": {t: mean(t, "real_speech_topline") for t in tasks},
            "mean_ratio_to_topline": {t: mean(t, "ratio_to_topline") for t in tasks},
            "holds_at": holds_at, "holds_at_every_seed": bool(checks) and holds_at == len(checks)}


def probe_text(text: str) -> str:
    """What the probe is trained to write and scored on: NFC, lower case, no punctuation/symbols, single spaces."""
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PSZC" else ch for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def cer(references: list[str], hypotheses: list[str]) -> float:
    """Character error rate over a set (jiwer: total edits / total reference characters), on `probe_text` forms."""
    import jiwer

    refs = [probe_text(r) for r in references]
    hyps = [probe_text(h) for h in hypotheses]
    keep = [i for i, r in enumerate(refs) if r]
    if not keep:
        raise UsageError("cer: every reference transcript is empty")
    return float(jiwer.cer([refs[i] for i in keep], [hyps[i] for i in keep]))
