"""The audit's figures: the privacy-utility curve, every attack against the share ratio, the pooled ROC of the
membership inference, and each sharer's AUC per setting."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simulation.figures import save_figure
from simulation.privacy_audit.settings import NO_DP


def _label(epsilon: str) -> str:
    return "no DP" if epsilon == NO_DP else f"DP-SGD ε = {epsilon}"


def write_plots(out: Path, report: dict, figures: dict[tuple, list[dict]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not figures:
        return []
    summaries = {tuple(item["key"]): item["summary"] for item in report["summaries"]}
    epsilons = list(dict.fromkeys(k[0] for k in summaries))
    names = []

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for e in epsilons:
        keys = sorted((k for k in summaries if k[0] == e), key=lambda k: k[1])
        gain = [summaries[k]["gain"] for k in keys]
        mia = [summaries[k]["mia_auc"] for k in keys]
        ax.errorbar([g["mean"] for g in gain], [m["mean"] for m in mia],
                    xerr=[[g["mean"] - g["low"] for g in gain], [g["high"] - g["mean"] for g in gain]],
                    yerr=[[m["mean"] - m["low"] for m in mia], [m["high"] - m["mean"] for m in mia]],
                    marker="o", capsize=3, label=_label(e))
        for k, g, m in zip(keys, gain, mia):
            ax.annotate(f"ratio {k[1]:g}", (g["mean"], m["mean"]), textcoords="offset points", xytext=(5, 4),
                        fontsize="small")
    ax.axhline(0.5, color="gray", linestyle=":", label="chance")
    ax.axhline(0.55, color="black", linestyle="--", linewidth=0.8, label="target at the default policy")
    ax.set(xlabel="Per-Pcs held-out perplexity gain over the seed (mean over targets)",
           ylabel="membership inference AUC (mean over sharers)", title="privacy vs utility")
    ax.legend(fontsize="small")
    names.append(save_figure(fig, out / "privacy_utility.png"))

    attacks = [("mia_auc", "membership inference"), ("mia_ratio_auc", "membership inference, loss ratio"),
               ("gate_activation_auc", "gate σ(g·x)"),
               ("gate_score_auc", "gate score"), ("extraction_auc", "extraction")]
    fig, axes = plt.subplots(1, len(epsilons), figsize=(5 * len(epsilons), 3.8), squeeze=False)
    for ax, e in zip(axes[0], epsilons):
        keys = sorted((k for k in summaries if k[0] == e), key=lambda k: k[1])
        for j, (field, name) in enumerate(attacks):
            if field in summaries[keys[0]]:
                values = [summaries[k][field] for k in keys]
                dodge = 0.012 * (j - (len(attacks) - 1) / 2)  # side by side, so that the intervals can be read
                ax.errorbar([k[1] + dodge for k in keys], [v["mean"] for v in values],
                            yerr=[[v["mean"] - v["low"] for v in values], [v["high"] - v["mean"] for v in values]],
                            marker="o", capsize=3, label=name)
        ax.axhline(0.5, color="gray", linestyle=":")
        ax.set(xlabel="share ratio (the policy's cap)", ylabel="AUC (mean over sharers)", title=_label(e))
        ax.legend(fontsize="small")
    names.append(save_figure(fig, out / "attacks_vs_share_ratio.png"))

    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for i, (key, found) in enumerate(figures.items()):
        for prefix, style, attack in (("mia", "-", "loss drop"), ("mia_ratio", "--", "loss ratio")):
            members = np.concatenate([f[f"{prefix}_members"] for f in found])
            others = np.concatenate([f[f"{prefix}_non_members"] for f in found])
            fpr, tpr, _ = roc_curve(np.r_[np.ones(len(members)), np.zeros(len(others))], np.r_[members, others])
            ax.plot(fpr, tpr, style, color=f"C{i}", label=f"{_label(key[0])}, share {key[1]:g}, {attack}")
    floor = 1 / max(len(others), 1)
    chance = np.logspace(np.log10(floor), 0, 50)
    ax.plot(chance, chance, color="gray", linestyle=":")
    ax.set_xscale("log")
    ax.set(xlim=(floor, 1), ylim=(0, 1), xlabel="false-positive rate (log)", ylabel="true-positive rate",
           title="membership inference, all sharers' records")
    ax.legend(fontsize="x-small")
    names.append(save_figure(fig, out / "mia_roc.png"))

    keys = list(figures)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(keys)), 4))
    rng = np.random.default_rng(0)
    for i, key in enumerate(keys):
        values = [f["mia_auc"] for f in figures[key]]
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=14, alpha=0.7)
        ax.plot([i - 0.3, i + 0.3], [np.mean(values)] * 2, color="black")
    ax.axhline(0.5, color="gray", linestyle=":")
    ax.set_xticks(range(len(keys)), [f"{'no DP' if k[0] == NO_DP else 'ε ' + k[0]}\nratio {k[1]:g}" for k in keys],
                  fontsize="small")
    ax.set(ylabel="membership inference AUC", title="per sharer (bar: mean)")
    names.append(save_figure(fig, out / "per_sharer_auc.png"))
    return names
