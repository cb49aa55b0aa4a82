"""The bench's figures: quality against cost, perplexity per target, and one per sweep."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from simulation.figures import save_figure


def write_plots(out: Path, report: dict, rows: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means, names = report["means"], []

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, v in means.items():
        ax.scatter(v["compute_tokens"], v["perplexity"])
        ax.annotate(m, (v["compute_tokens"], v["perplexity"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("symlog", linthresh=1)  # log beyond 1 token; the methods that run no LLM pass sit at 0
    ax.set(xlabel="compute per target (LLM tokens forward + backward)", ylabel="held-out perplexity",
           title="quality vs cost")
    names.append(save_figure(fig, out / "quality_vs_cost.png"))

    users = report["targets_users"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(users) * len(means) / 3), 4))
    width = 0.8 / max(len(means), 1)
    for i, m in enumerate(means):
        ppl = {r["target"]: r["perplexity"] for r in rows if r["kind"] == "method" and r["method"] == m}
        ax.bar(np.arange(len(users)) + i * width, [ppl.get(u, math.nan) for u in users], width, label=m)
    ax.set_xticks(np.arange(len(users)) + 0.4 - width / 2, users, rotation=30, ha="right")
    values = [r["perplexity"] for r in rows if r["kind"] == "method"]
    ax.set_ylim(0.95 * min(values), 1.03 * max(values))  # the differences, not the common baseline
    ax.set(ylabel="held-out perplexity (axis does not start at 0)", title="perplexity per target user")
    ax.legend(fontsize="small", ncol=3)
    names.append(save_figure(fig, out / "per_user_perplexity.png"))

    for name, points in report["sweeps"].items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([p["value"] for p in points], [p["perplexity"] for p in points], marker="o", label="perpcs")
        for ref in ("seed", "oppu"):
            if ref in means:
                ax.axhline(means[ref]["perplexity"], linestyle="--", color="gray" if ref == "seed" else "black",
                           label=ref)
        ax.set(xlabel=name, ylabel="mean held-out perplexity", title=f"perpcs vs {name}")
        ax.legend(fontsize="small")
        names.append(save_figure(fig, out / f"sweep_{name}.png"))
    return names
