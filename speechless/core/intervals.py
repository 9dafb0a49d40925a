"""95 % intervals for held-out scores (scipy.stats): bootstrap over utterances for error rates, Wilson for exact match.

An error rate over a set is total edits / total reference length (jiwer's definition), so the bootstrap resamples
utterances as (edits, length) pairs and recomputes that ratio; a paired bootstrap resamples the same utterances for
two systems and gives the interval of their difference and of their ratio. Seeded: the same inputs give the same bounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


def _bootstrap(data: tuple[np.ndarray, ...], statistic, seed: int) -> tuple[float, float]:
    from scipy.stats import bootstrap

    if len(data[0]) < 2 or all(np.all(d == d[0]) for d in data):
        value = float(statistic(*data))
        return value, value  # one utterance or constant data: no spread to resample
    result = bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=RESAMPLES, confidence_level=CONFIDENCE,
                       method="percentile", random_state=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return float(low), float(high)


def rate_interval(errors: Sequence[float], lengths: Sequence[float], seed: int = 0) -> dict:
    """{value, low, high, n} of sum(errors) / sum(lengths), the bounds by bootstrap over utterances."""
    e, n = np.asarray(errors, dtype=np.float64), np.asarray(lengths, dtype=np.float64)
    if len(e) != len(n) or not len(e) or n.sum() <= 0:
        raise ValueError("rate_interval: needs as many errors as lengths, and some reference length")

    def rate(e_, n_, axis=-1):
        return e_.sum(axis=axis) / np.maximum(n_.sum(axis=axis), 1e-12)

    low, high = _bootstrap((e, n), rate, seed)
    return {"value": round(float(rate(e, n)), 4), "low": round(low, 4), "high": round(high, 4), "n": int(len(e))}


def paired_rate_comparison(errors_a: Sequence[float], errors_b: Sequence[float], lengths: Sequence[float], seed: int = 0) -> dict:
    """B against A on the same utterances: {difference: b - a, ratio: b / a}, each {value, low, high}, by a paired
    bootstrap (the same resampled utterances for both)."""
    a, b, n = (np.asarray(x, dtype=np.float64) for x in (errors_a, errors_b, lengths))

    def diff(a_, b_, n_, axis=-1):
        return (b_.sum(axis=axis) - a_.sum(axis=axis)) / np.maximum(n_.sum(axis=axis), 1e-12)

    def ratio(a_, b_, n_, axis=-1):
        return b_.sum(axis=axis) / np.maximum(a_.sum(axis=axis), 1e-12)

    out = {"n": int(len(n))}
    for name, fn in (("difference", diff), ("ratio", ratio)):
        low, high = _bootstrap((a, b, n), fn, seed)
        out[name] = {"value": round(float(fn(a, b, n)), 4), "low": round(low, 4), "high": round(high, 4)}
    return out


def wilson_interval(successes: int, total: int) -> dict:
    """{value, low, high, n} of a proportion with its Wilson score interval."""
    from scipy.stats import binomtest

    if total <= 0:
        raise ValueError("wilson_interval: no trials")
    ci = binomtest(int(successes), int(total)).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return {"value": round(successes / total, 4), "low": round(float(ci.low), 4), "high": round(float(ci.high), 4), "n": int(total)}


def edit_counts(references: Sequence[str], hypotheses: Sequence[str], unit: str) -> tuple[list[int], list[int]]:
    """Per utterance (edits, reference length) in words (`unit` 'word') or characters ('char'), on `probe_text` forms;
    empty references are left out."""
    import jiwer

    from speechless.core.metrics import probe_text

    errors, lengths = [], []
    for ref, hyp in zip(references, hypotheses):
        ref, hyp = probe_text(ref), probe_text(hyp)
        if not ref:
            continue
        out = jiwer.process_words(ref, hyp) if unit == "word" else jiwer.process_characters(ref, hyp)
        errors.append(out.substitutions + out.deletions + out.insertions)
        lengths.append(len(ref.split()) if unit == "word" else len(ref))
    return errors, lengths
