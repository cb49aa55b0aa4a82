"""The seeds bench's report.md: each comparison as a table, its target met or not, and its figures."""

from __future__ import annotations


def _matrix(title: str, styles: list[int], matrix: list[list[int]]) -> list[str]:
    head = "| user style | " + " | ".join(f"s{s}" for s in styles) + " | base |"
    lines = [f"**{title}** (rows: the user's style; columns: the seed chosen)", "", head,
             "|" + "---|" * (len(styles) + 2)]
    lines += [f"| s{st} | " + " | ".join(str(n) for n in row) + " |" for st, row in zip(styles, matrix)]
    return lines + [""]


def _figure(report: dict, name: str, title: str) -> list[str]:
    return [f"![{title}]({name})", ""] if name in report.get("plots", ()) else []


def markdown(report: dict) -> str:
    acc = report["accuracy"]
    styles = acc["styles"]
    parts = ["# bouquet seeds bench", "", f"catalog `{report['catalog']}` · base `{report['base']}` · "
             f"{acc['users']} users, {report['settings']['history']} history items each", "",
             "## 1. selection accuracy", "",
             "| method | users | accuracy | seconds per user | tokens forward | bytes downloaded | seeds loaded |",
             "|---|---|---|---|---|---|---|"]
    x = acc["xpert"]
    parts.append(f"| XPerT (explanations) | {x['users']} | {x['accuracy']:.1%} | {x['seconds_median']:.1f} | "
                 f"{report['settings']['history']} answers generated | {x['catalog_bytes']:,} (catalog.json) | 0 |")
    for m, label in (("exhaustive", "exhaustive search"), ("halving", "successive halving")):
        if m not in acc:
            continue
        r = acc[m]
        parts.append(f"| {label} | {r['users']} | {r['accuracy']:.1%} | {r['seconds_median']:.1f} | {r['tokens_forward']:,.0f} | "
                     f"{r['bytes_loaded']:,.0f} | {r['seeds_loaded']:.0f} |")
    parts.append("")
    target = "**met**" if x["accuracy"] >= 0.95 else "**not met**"
    parts += [f"Target (XPerT picks the seed of the user's style ≥ 95%): {target} ({x['accuracy']:.1%}).", ""]
    for m, label in (("xpert", "XPerT"), ("exhaustive", "exhaustive search"), ("halving", "successive halving")):
        if m in acc:
            parts += _matrix(label, styles, acc[m]["confusion"])
    parts += _figure(report, "confusion.png", "XPerT's choices") + _figure(report, "explanations.png",
                                                                           "each seed's mix of attributes")
    if acc.get("sensitivity"):
        parts += ["**XPerT on the same users, the seeds explained from the first n probes** (mix: L1 between "
                  "attribute shares, the rule in use; raw: L1 between the coefficients themselves)", "",
                  "| probes | mix L1 | raw L1 |", "|---|---|---|"]
        parts += [f"| {r['probes']} | {r['mix']:.1%} | {r['raw']:.1%} |" for r in acc["sensitivity"]]
        parts.append("")
    if "scaling" in report:
        parts += ["## 2. selection cost against catalog size (tiny-model seeds)", "",
                  "| seeds | XPerT s | XPerT bytes | exhaustive s | exhaustive tokens | exhaustive bytes | "
                  "halving s | halving tokens | halving bytes |", "|---|---|---|---|---|---|---|---|---|"]
        parts += [f"| {r['seeds']} | {r['xpert_seconds']:.3f} | {r['xpert_bytes']:,} | {r['exhaustive_seconds']:.2f} | "
                  f"{r['exhaustive_tokens']:,} | {r['exhaustive_bytes']:,} | {r['halving_seconds']:.2f} | "
                  f"{r['halving_tokens']:,} | {r['halving_bytes']:,} |" for r in report["scaling"]]
        first, last = report["scaling"][0], report["scaling"][-1]
        growth = last["seeds"] / first["seeds"]
        parts += ["", f"From {first['seeds']} to {last['seeds']} seeds ({growth:.0f}×): XPerT's time "
                  f"×{last['xpert_seconds'] / first['xpert_seconds']:.2f}, exhaustive search's time "
                  f"×{last['exhaustive_seconds'] / first['exhaustive_seconds']:.2f} and tokens "
                  f"×{last['exhaustive_tokens'] / first['exhaustive_tokens']:.2f}.", ""]
        parts += _figure(report, "cost_vs_catalog.png", "selection cost against catalog size")
    if "tuning" in report:
        parts += ["## 3. never from scratch: fine-tuning from the selected seed vs. from the base", "",
                  "| user | seed | base: loss at 0 → best | selected: loss at 0 → best | steps to the base's best "
                  "loss: base / selected | seconds: base / selected |", "|---|---|---|---|---|---|"]
        met = True
        for r in report["tuning"]:
            b, sel = r["base"]["curve"], r["selected"]["curve"]
            br, sr = r["base_reaches"], r["selected_reaches"]
            met &= sr is not None and br is not None and sr[0] <= br[0] / 2
            parts.append(f"| {r['user']} | {r['seed']} | {b[0][1]:.3f} → {min(x[1] for x in b):.3f} | "
                         f"{sel[0][1]:.3f} → {min(x[1] for x in sel):.3f} | {br[0] if br else '–'} / {sr[0] if sr else 'never'} | "
                         f"{br[1] if br else float('nan'):.1f} / {sr[1] if sr else float('nan'):.1f} |")
        parts += ["", f"Target (fine-tuning from the selected seed reaches the best held-out loss that fine-tuning from "
                  f"the base reaches, in at most half the steps): "
                  f"{'**met**' if met else '**not met**'}.", ""]
        parts += _figure(report, "fine_tuning.png", "held-out loss along fine-tuning")
    if "pools" in report:
        parts += ["## 4. assembling from the selected seed's pool vs. the base's pool", "",
                  "| user | seed | base alone | assembled from base pool | selected seed alone | assembled from its "
                  "pool |", "|---|---|---|---|---|---|"]
        wins = []
        for r in report["pools"]:
            b, sp = r.get("base_pool"), r.get("seed_pool")
            fmt = (lambda v, k: f"{v[k]:.3f}" if v else "–")
            parts.append(f"| {r['user']} | {r['seed']} | {fmt(b, 'seed_alone')} | {fmt(b, 'perplexity')} | "
                         f"{fmt(sp, 'seed_alone')} | {fmt(sp, 'perplexity')} |")
            if b and sp:
                wins.append(sp["perplexity"] < b["perplexity"])
        parts += ["", f"Target (assembled from the selected seed's pool beats the base's pool in perplexity): "
                  f"{'**met**' if wins and all(wins) else '**not met**'} ({sum(wins)}/{len(wins)} users).", ""]
    return "\n".join(parts) + "\n"
