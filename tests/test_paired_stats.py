"""Means with bootstrap intervals and paired comparisons, on numbers whose answer is known."""

import math

import numpy as np
import pytest

from simulation.paired_stats import mean_interval, paired_difference, ratio_of_means


def test_the_interval_holds_the_mean_and_narrows_with_more_users():
    rng = np.random.default_rng(0)
    few, many = mean_interval(rng.normal(1.0, 1.0, 16)), mean_interval(rng.normal(1.0, 1.0, 400))
    assert few["low"] < few["mean"] < few["high"] and few["n"] == 16
    assert many["low"] < 1.0 < many["high"]
    assert many["high"] - many["low"] < (few["high"] - few["low"]) / 2
    assert mean_interval([1.0, 1.0, 1.0]) == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 3}
    assert math.isnan(mean_interval([2.0])["low"])  # one user: a mean, no interval
    with pytest.raises(ValueError, match="no users"):
        mean_interval([])


def test_a_consistent_shift_is_found_and_no_shift_is_not():
    rng = np.random.default_rng(1)
    a = rng.normal(0.6, 0.1, 16)
    shifted = paired_difference(a, a - 0.05 + rng.normal(0, 0.01, 16))
    assert shifted["low"] > 0 and shifted["p"] < 0.001 and shifted["mean"] == pytest.approx(0.05, abs=0.01)
    same = paired_difference(a, a)
    assert same == {"mean": 0.0, "low": 0.0, "high": 0.0, "p": 1.0, "n": 16}
    noise = paired_difference(a, a + rng.normal(0, 0.1, 16))
    assert noise["low"] < 0 < noise["high"] and noise["p"] > 0.05
    with pytest.raises(ValueError, match="same users"):
        paired_difference([1.0, 2.0], [1.0])


def test_the_ratio_of_paired_means_resamples_users_together():
    gains = np.array([2.0, 4.0, 6.0, 8.0])
    kept = ratio_of_means(0.5 * gains, gains)
    assert kept["ratio"] == pytest.approx(0.5) and kept["low"] == pytest.approx(0.5) == kept["high"]
    assert math.isnan(ratio_of_means([1.0, 2.0], [0.0, 0.0])["ratio"])
