"""Paired comparisons of two methods over the same users: the mean difference, its bootstrap 95% interval, and a
paired test's p-value (Wilcoxon signed-rank, two-sided; exact for small samples without ties)."""

from __future__ import annotations

import numpy as np


def paired_comparison(a, b, *, lower_is_better: bool, n_boot: int = 10_000, seed: int = 0) -> dict:
    """a and b per user, same order. `diff` is mean(a - b); `better` says whether a beats b on average; `wins`
    counts the users where a beats b."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"a paired comparison needs two equal-length series of at least 2 users, got {a.shape} "
                         f"and {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    low, high = np.percentile(boots, [2.5, 97.5])
    if np.allclose(d, 0):
        p = 1.0
    else:
        from scipy.stats import wilcoxon

        p = float(wilcoxon(a, b, zero_method="wilcox").pvalue)
    sign = -1 if lower_is_better else 1
    return {"n": len(d), "diff": float(d.mean()), "ci_low": float(low), "ci_high": float(high), "p_value": p,
            "better": bool(sign * d.mean() > 0), "wins": int((sign * d > 0).sum())}
