"""The 95 % intervals on known cases: constant data, simulated coverage, Wilson, paired comparisons, edit counts."""

from __future__ import annotations

import numpy as np
import pytest

from speechless.core.intervals import edit_counts, paired_rate_comparison, rate_interval, wilson_interval


def test_constant_error_rate_has_a_zero_width_interval():
    out = rate_interval([2, 2, 2, 2], [10, 10, 10, 10])
    assert out == {"value": 0.2, "low": 0.2, "high": 0.2, "n": 4}


def test_bootstrap_interval_covers_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    true, n, covered, trials = 0.1, 80, 0, 200
    for trial in range(trials):
        lengths = rng.integers(5, 30, size=n)
        errors = rng.binomial(lengths, true)
        out = rate_interval(errors, lengths, seed=trial)
        covered += out["low"] <= true <= out["high"]
        assert out["low"] <= out["value"] <= out["high"]
    assert 0.88 <= covered / trials <= 0.99, covered


def test_interval_is_seeded_and_narrows_with_more_utterances():
    rng = np.random.default_rng(0)
    small_l = rng.integers(5, 30, 20)
    small_e = rng.binomial(small_l, 0.2)
    assert rate_interval(small_e, small_l, seed=3) == rate_interval(small_e, small_l, seed=3)
    big_l = np.tile(small_l, 25)
    big_e = np.tile(small_e, 25)
    small, big = rate_interval(small_e, small_l), rate_interval(big_e, big_l)
    assert big["high"] - big["low"] < (small["high"] - small["low"]) / 3


def test_wilson_interval_matches_the_formula():
    out = wilson_interval(7, 10)
    z = 1.959963984540054
    centre = (0.7 + z * z / 20) / (1 + z * z / 10)
    half = z * np.sqrt(0.7 * 0.3 / 10 + z * z / 400) / (1 + z * z / 10)
    assert out["low"] == pytest.approx(centre - half, abs=1e-4) and out["high"] == pytest.approx(centre + half, abs=1e-4)
    assert wilson_interval(0, 20)["low"] == 0.0 and wilson_interval(20, 20)["high"] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_paired_comparison_of_a_system_with_itself_and_with_a_worse_one():
    rng = np.random.default_rng(2)
    lengths = rng.integers(5, 30, 60)
    a = rng.binomial(lengths, 0.1)
    same = paired_rate_comparison(a, a, lengths)
    assert same["difference"] == {"value": 0.0, "low": 0.0, "high": 0.0} and same["ratio"]["value"] == 1.0
    worse = paired_rate_comparison(a, a + rng.integers(1, 3, 60), lengths)
    assert worse["difference"]["low"] > 0 and worse["ratio"]["low"] > 1  # every utterance worse: the interval excludes 0


def test_edit_counts_use_the_scoring_normalisation():
    errors, lengths = edit_counts(["Hello, World!", "a b c", ""], ["hello world", "a x c", "ignored"], "word")
    assert errors == [0, 1] and lengths == [2, 3]  # case and punctuation do not count; empty references are left out
    errors, lengths = edit_counts(["abc"], ["abd"], "char")
    assert errors == [1] and lengths == [3]
