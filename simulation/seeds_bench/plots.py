"""The seeds bench's figures: what is quicker seen than read in report.md.

    confusion.png         XPerT's choices: the user's style against the chosen seed
    explanations.png      each seed's mix of attributes, as the catalog publishes it
    cost_vs_catalog.png   selection time against catalog size, XPerT and the searches
    fine_tuning.png       held-out loss along fine-tuning from the base and from the chosen seed
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protocols.catalog import Catalog
from simulation.figures import save_figure

MIN_SHARE = 0.02  # attributes no seed gives even this share of its mix are left off the explanations figure


def write_plots(out: Path, report: dict, catalog: Catalog) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    names = [_confusion(out, report["accuracy"]), _explanations(out, catalog)]
    if report.get("scaling"):
        names.append(_cost(out, report["scaling"]))
    if report.get("tuning"):
        names.append(_fine_tuning(out, report["tuning"]))
    return names


def _confusion(out: Path, accuracy: dict) -> str:
    import matplotlib.pyplot as plt

    styles, matrix = accuracy["styles"], np.asarray(accuracy["xpert"]["confusion"])
    fig, ax = plt.subplots(figsize=(1 + 0.55 * matrix.shape[1], 1 + 0.5 * matrix.shape[0]))
    ax.imshow(matrix, cmap="Blues", vmin=0)
    for (i, j), n in np.ndenumerate(matrix):
        if n:
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > matrix.max() / 2 else "black")
    ax.set_xticks(range(matrix.shape[1]), [f"s{s}" for s in styles] + ["base"])
    ax.set_yticks(range(matrix.shape[0]), [f"s{s}" for s in styles])
    ax.set(xlabel="seed chosen", ylabel="user's style",
           title=f"XPerT: {accuracy['xpert']['accuracy']:.1%} of {accuracy['xpert']['users']} users")
    return save_figure(fig, out / "confusion.png")


def _explanations(out: Path, catalog: Catalog) -> str:
    import matplotlib.pyplot as plt

    mixes = {e.name: e.explanation.mix().coefficients for e in catalog.entries}
    words = [w for w in catalog.words if any(m.get(w, 0.0) >= MIN_SHARE for m in mixes.values())]
    shares = np.array([[mixes[name].get(w, 0.0) for w in words] for name in mixes])
    fig, ax = plt.subplots(figsize=(2 + 0.45 * max(len(words), 1), 1.2 + 0.45 * len(mixes)))
    image = ax.imshow(shares if words else np.zeros((len(mixes), 1)), cmap="viridis", vmin=0, vmax=1,
                      aspect="auto")
    ax.set_xticks(range(len(words)), words, rotation=45, ha="right")
    ax.set_yticks(range(len(mixes)), list(mixes))
    ax.set_title("each seed's mix of attributes (share of its coefficients)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    return save_figure(fig, out / "explanations.png")


def _cost(out: Path, scaling: list[dict]) -> str:
    import matplotlib.pyplot as plt

    seeds = [r["seeds"] for r in scaling]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("xpert_seconds", "XPerT (explanations)"), ("exhaustive_seconds", "exhaustive search"),
                       ("halving_seconds", "successive halving")):
        ax.plot(seeds, [r[key] for r in scaling], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(seeds, [str(n) for n in seeds])
    ax.set(xlabel="seeds in the catalog", ylabel="seconds per selection", title="selection cost against catalog size")
    ax.legend(fontsize="small")
    return save_figure(fig, out / "cost_vs_catalog.png")


def _fine_tuning(out: Path, tuning: list[dict]) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tuning), figsize=(3.2 * len(tuning), 3), sharey=False, squeeze=False)
    for ax, row in zip(axes[0], tuning):
        for run, style, label in (("base", "--", "from the base"), ("selected", "-", f"from {row['seed']}")):
            curve = row[run]["curve"]
            ax.plot([step for step, *_ in curve], [loss for _, loss, _ in curve], style, marker=".", label=label)
        ax.axhline(row["target_loss"], color="gray", linewidth=0.8)
        ax.set(title=row["user"], xlabel="fine-tuning step")
        ax.legend(fontsize="x-small")
    axes[0][0].set_ylabel("held-out loss (gray: the base's best)")
    return save_figure(fig, out / "fine_tuning.png")
