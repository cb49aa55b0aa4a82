"""Paired comparisons over the same targets: the mean difference, its bootstrap 95% interval, and two paired tests.

A method is compared with another on the targets both ran on, one difference per target (method − other, so a
negative perplexity difference means the method is better). The Wilcoxon signed-rank test uses the sizes of the
differences, the sign test only their signs; both are two-sided. The interval and the Wilcoxon test are
simulation.paired_stats's, as in the other benchmarks.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from simulation.paired_stats import paired_difference


def paired_comparison(mine: dict[str, float], other: dict[str, float], *, resamples: int = 10_000,
                      rng_seed: int = 0) -> dict | None:
    """`mine` − `other` over the users both have; None when fewer than two."""
    users = sorted(mine.keys() & other.keys())
    if len(users) < 2:
        return None
    d = np.array([mine[u] - other[u] for u in users], float)
    both = paired_difference([mine[u] for u in users], [other[u] for u in users], resamples=resamples, seed=rng_seed)
    wins, losses = int((d < 0).sum()), int((d > 0).sum())
    sign = float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    return {"n": len(users), "mean_diff": both["mean"], "ci_low": both["low"], "ci_high": both["high"],
            "median_diff": float(np.median(d)), "lower": wins, "higher": losses, "wilcoxon_p": both["p"],
            "sign_p": sign, "differences": dict(zip(users, d.tolist()))}


def per_target(rows: list[dict], method: str, metric: str = "perplexity") -> dict[str, float]:
    return {r["target"]: r[metric] for r in rows if r["kind"] == "method" and r["method"] == method}


def comparisons(rows: list[dict], method: str, others: tuple[str, ...], metric: str = "perplexity") -> dict:
    """`method` against each of `others` that ran, on `metric`, paired by target."""
    mine = per_target(rows, method, metric)
    out = {}
    for o in others:
        c = paired_comparison(mine, per_target(rows, o, metric)) if mine else None
        if c is not None:
            out[o] = c
    return out
