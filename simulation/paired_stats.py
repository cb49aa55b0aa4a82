"""Figures over users with their uncertainty, for the benchmarks' reports.

    mean_interval        a mean over users with its percentile-bootstrap 95% interval
    paired_difference    two settings on the same users: the mean of the per-user differences a - b, its bootstrap
                         95% interval, and the Wilcoxon signed-rank test's two-sided p-value
    ratio_of_means       mean(a) / mean(b) on the same users, with a bootstrap interval that resamples users

The bootstrap resamples users (with replacement), never records within a user: the user is the unit a claim is
about. Its random seed is fixed, so a report is the same every time it is written from the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


def _bootstrap(columns: Sequence[np.ndarray], statistic: Callable[..., np.ndarray], resamples: int,
               seed: int) -> tuple[float, float]:
    """The percentile interval of `statistic` over resampled users; it maps (resamples, n) arrays, one per
    column, to (resamples,) values."""
    n = len(columns[0])
    if n < 2:
        return math.nan, math.nan
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.asarray(statistic(*(c[draws] for c in columns)), dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _means(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=-1)


def mean_interval(values: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """{"mean", "low", "high", "n"}: the mean and its bootstrap 95% interval (nan bounds below two users)."""
    x = np.asarray(values, dtype=float)
    if not len(x):
        raise ValueError("a mean over no users")
    low, high = _bootstrap([x], _means, resamples, seed)
    return {"mean": float(x.mean()), "low": low, "high": high, "n": len(x)}


def paired_difference(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """{"mean", "low", "high", "p", "n"} of the per-user differences a - b (the same users, in the same order)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or not len(x):
        raise ValueError(f"a paired comparison needs the same users on both sides, got {len(x)} and {len(y)}")
    d = x - y
    low, high = _bootstrap([d], _means, resamples, seed)
    if np.all(d == 0):
        p = 1.0
    else:
        from scipy.stats import wilcoxon

        p = float(wilcoxon(d).pvalue)
    return {"mean": float(d.mean()), "low": low, "high": high, "p": p, "n": len(d)}


def ratio_of_means(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """{"ratio", "low", "high", "n"}: mean(a) / mean(b) over the same users, users resampled together."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or not len(x):
        raise ValueError(f"a ratio of paired means needs the same users on both sides, got {len(x)} and {len(y)}")

    def ratio(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return u.mean(axis=-1) / v.mean(axis=-1)  # nan or inf where b's mean is 0: dropped from the interval

    low, high = _bootstrap([x, y], ratio, resamples, seed)
    whole = float(x.mean() / y.mean()) if y.mean() != 0 else math.nan
    return {"ratio": whole, "low": low, "high": high, "n": len(x)}


def paired_comparison(a: Sequence[float], b: Sequence[float], *, lower_is_better: bool,
                      resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """paired_difference read as a contest: {"n", "diff", "ci_low", "ci_high", "p_value", "better", "wins"}, where
    `better` says whether a beats b on average and `wins` counts the users where a beats b."""
    if len(a) < 2:
        raise ValueError(f"a paired comparison needs at least 2 users, got {len(a)}")
    d = paired_difference(a, b, resamples=resamples, seed=seed)
    sign = -1 if lower_is_better else 1
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return {"n": d["n"], "diff": d["mean"], "ci_low": d["low"], "ci_high": d["high"], "p_value": d["p"],
            "better": bool(sign * d["mean"] > 0), "wins": int((sign * diffs > 0).sum())}
