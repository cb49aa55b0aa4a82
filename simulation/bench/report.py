"""The bench's report: means per method, gain recovery, cost ratios, which targets were met, and report.md.

Everything is computed from results.jsonl rows, nothing is typed in; the plots are simulation.bench.plots.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from simulation.bench.gate_check import summarise_gates
from simulation.bench.paired import comparisons, per_target
from simulation.bench.plots import write_plots
from simulation.bench.settings import METHODS, BenchSettings

# what perpcs is compared with, target by target
PAIRED_WITH = ("random", "retrieval", "lorahub", "rag", "perpcs+rag", "oppu", "oppu-tuned", "seed")
METRICS = ("perplexity", "rouge1", "rougeL", "fidelity", "seconds", "tokens_forward", "tokens_backward",
           "bytes_stored", "bytes_adapter", "bytes_downloaded")


def method_means(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean of every metric per method over its targets, plus compute = tokens forward + backward."""
    means = {}
    for method in METHODS:
        mine = [r for r in rows if r["kind"] == "method" and r["method"] == method]
        if mine:
            means[method] = {k: float(np.mean([r[k] for r in mine])) for k in METRICS}
            means[method]["compute_tokens"] = means[method]["tokens_forward"] + means[method]["tokens_backward"]
            means[method]["targets"] = len(mine)
    return means


def gain_recovery(means: dict) -> dict[str, float | None]:
    """(ppl_seed - ppl_method) / (ppl_seed - ppl_oppu); undefined when oppu does not beat the seed."""
    if "seed" not in means or "oppu" not in means:
        return {}
    gain = means["seed"]["perplexity"] - means["oppu"]["perplexity"]
    return {m: (means["seed"]["perplexity"] - v["perplexity"]) / gain if gain > 0 else None for m, v in means.items()}


def best_gain_recovery(means: dict) -> dict[str, float | None]:
    """Gain recovery against the better of oppu and oppu-tuned (OPPU at its best), when oppu-tuned ran."""
    if "oppu-tuned" not in means:
        return {}
    best = min(("oppu", "oppu-tuned"), key=lambda m: means[m]["perplexity"] if m in means else float("inf"))
    return gain_recovery({"seed": means["seed"], "oppu": means[best]} | {m: v for m, v in means.items()
                                                                        if m != "oppu"}) if "seed" in means else {}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def cost_ratios(means: dict) -> dict[str, dict[str, float | None]]:
    if "oppu" not in means:
        return {}
    o = means["oppu"]
    return {m: {"tokens": _ratio(v["compute_tokens"], o["compute_tokens"]),
                "bytes_stored": _ratio(v["bytes_stored"], o["bytes_stored"])} for m, v in means.items()}


def check_targets(means: dict, recovery: dict, ratios: dict, paired: dict | None = None, gates: dict | None = None,
                  oracle: dict | None = None) -> list[dict]:
    """Each goal of the method, met or not, with the numbers that decide it (None: not measured)."""
    paired = paired or {}
    def goal(text: str, needs: tuple[str, ...], test) -> dict:
        if any(m not in means for m in needs):
            return {"target": text, "met": None, "evidence": f"not measured: needs {', '.join(needs)}"}
        met, evidence = test()
        return {"target": text, "met": bool(met), "evidence": evidence}

    def recovers():
        r = recovery.get("perpcs")
        if r is None:
            return False, "undefined: oppu does not lower the seed's perplexity"
        return r >= 0.9, f"recovery {r:.1%}"

    def beats():
        p = means["perpcs"]
        ok = all(p["perplexity"] < means[o]["perplexity"] and p["fidelity"] > means[o]["fidelity"]
                 for o in ("retrieval", "random"))
        return ok, "; ".join(f"{k}: perpcs {p[k]:.3f} vs retrieval {means['retrieval'][k]:.3f}, random "
                             f"{means['random'][k]:.3f}" for k in ("perplexity", "fidelity"))

    def cheap():
        t = ratios["perpcs"]["tokens"]
        return t is not None and t <= 0.1, f"compute {_pct(t)} of oppu's tokens"

    def small():
        b = ratios["perpcs"]["bytes_stored"]
        return b is not None and b <= 1 / 30, f"stores {_pct(b)} of oppu's bytes (1/30 = 3.3%)"

    def tuned():
        ft, o, t = means["perpcs+ft"], means["oppu"], ratios["perpcs+ft"]["tokens"]
        return (ft["perplexity"] <= 1.02 * o["perplexity"] and t is not None and t <= 0.5,
                (f"perplexity {ft['perplexity']:.3f} vs oppu {o['perplexity']:.3f} "
                 f"({ft['perplexity'] / o['perplexity'] - 1:+.1%}); compute {_pct(t)} of oppu's"))

    def significant():
        pairs = [paired.get(o) for o in ("random", "retrieval")]
        if any(c is None for c in pairs):
            return False, "too few targets for a paired test"
        return (all(c["mean_diff"] < 0 and c["wilcoxon_p"] < 0.05 for c in pairs),
                "; ".join(f"vs {o}: {c['mean_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], "
                          f"Wilcoxon p {c['wilcoxon_p']:.3g}, n {c['n']}" for o, c in zip(("random", "retrieval"), pairs)))

    def recognised():
        return (gates["top1"] >= 3 * gates["chance_top1"],
                f"own piece first at {gates['top1']:.1%} of positions, chance {gates['chance_top1']:.1%} "
                f"({gates['top1_vs_chance']:.2f}x); {gates['below_chance']} of {gates['sharers']} sharers below chance")

    def oracle_level():
        o = oracle["perplexity"]
        p = oracle["perpcs"]
        return p <= o, f"perpcs {p:.3f} vs the best single sharer {o:.3f}, same {oracle['targets']} targets"

    extra = []
    if gates is not None:
        extra.append({"target": "the gates recognise their sharer: own piece first at ≥ 3x chance",
                      **dict(zip(("met", "evidence"), recognised()))})
    if oracle is not None and oracle.get("perpcs") is not None:
        extra.append({"target": "perpcs's perplexity at or below the oracle single-sharer adapter's",
                      **dict(zip(("met", "evidence"), oracle_level()))})
    return [goal("perpcs recovers ≥ 90% of oppu's perplexity gain", ("seed", "oppu", "perpcs"), recovers),
            goal("perpcs's perplexity below random's and retrieval's, paired Wilcoxon p < 0.05 each",
                 ("perpcs", "retrieval", "random"), significant),
            goal("perpcs beats retrieval and random on perplexity and fidelity", ("perpcs", "retrieval", "random"),
                 beats),
            goal("perpcs's compute ≤ 10% of oppu's tokens", ("perpcs", "oppu"), cheap),
            goal("perpcs stores ≤ 1/30 of oppu's bytes as piece references", ("perpcs", "oppu"), small),
            goal("perpcs+ft matches oppu's perplexity (within 2%) at ≤ half oppu's compute", ("perpcs+ft", "oppu"),
                 tuned),
            goal("perpcs+zo (forward passes only) beats perpcs alone on perplexity", ("perpcs+zo", "perpcs"),
                 lambda: (means["perpcs+zo"]["perplexity"] < means["perpcs"]["perplexity"],
                          f"perplexity {means['perpcs+zo']['perplexity']:.3f} vs perpcs "
                          f"{means['perpcs']['perplexity']:.3f}"))] + extra


def oracle_summary(rows: list[dict]) -> dict | None:
    """The best single sharer adapter per target, against the seed, oppu and perpcs on the same targets."""
    best = {r["user"]: r["best_perplexity"] for r in rows if r["kind"] == "oracle"}
    if not best:
        return None
    out = {"targets": len(best), "perplexity": float(np.mean(list(best.values())))}
    for m in ("seed", "oppu", "perpcs"):
        mine = per_target(rows, m)
        out[m] = float(np.mean([mine[u] for u in best])) if best.keys() <= mine.keys() else None
    if out["seed"] is not None and out["oppu"] is not None and out["seed"] > out["oppu"]:
        out["gain_recovery"] = (out["seed"] - out["perplexity"]) / (out["seed"] - out["oppu"])
    return out


def sweep_table(rows: list[dict]) -> dict[str, list[dict]]:
    sweeps: dict[str, list[dict]] = {}
    for r in rows:
        if r["kind"] == "sweep":
            sweeps.setdefault(r["sweep"], []).append({k: v for k, v in r.items() if k not in ("kind", "sweep")})
    return {name: sorted(points, key=lambda p: p["value"]) for name, points in sweeps.items()}


# --- formatting ---------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def markdown_table(report: dict) -> str:
    """Methods x metrics, means over the targets."""
    head = ["method", "perplexity", "gain recovery", "ROUGE-1", "ROUGE-L", "fidelity", "seconds", "tokens fwd",
            "tokens bwd", "compute vs oppu", "stored", "stored vs oppu", "adapter", "downloaded"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, v in report["means"].items():
        rec, ratio = report["gain_recovery"].get(m), report["cost_ratios"].get(m, {})
        cells = [m, f"{v['perplexity']:.3f}", _pct(rec), f"{v['rouge1']:.3f}", f"{v['rougeL']:.3f}",
                 f"{v['fidelity']:.2f}", f"{v['seconds']:.1f}", f"{v['tokens_forward']:,.0f}",
                 f"{v['tokens_backward']:,.0f}", _pct(ratio.get("tokens")), _bytes(v["bytes_stored"]),
                 _pct(ratio.get("bytes_stored")), _bytes(v["bytes_adapter"]), _bytes(v["bytes_downloaded"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTES = ("Means over the targets. Cost counts the method's own work, not the evaluation: compute = tokens "
         "forward + tokens backward of the LLM (the MiniLM embeddings of retrieval and rag are not counted in "
         "tokens, only in seconds); perpcs+ft, perpcs+zo and perpcs+rag include perpcs's cost (perpcs+zo runs no backward pass); "
         "lorahub's is its forward passes, one over the history per candidate weighting. rag and perpcs+rag "
         "score the same answer tokens as the others, after a prompt that holds the target's nearest history "
         "items: that longer prompt is paid at every inference and is not in compute. *Stored* is what the user "
         "keeps: perpcs keeps piece references (its choices as JSON), lorahub one weight per sharer, retrieval a "
         "piece-id list, the others their adapter; *adapter* is "
         "the A, B bytes of the adapter each runs with. Fidelity: share of greedy generations a MiniLM + "
         "logistic-regression classifier (balanced classes), trained on history answers only and those clipped "
         "to the generation budget, assigns to the target's label.")


def _sent(s: dict) -> float:
    return min(s["share_ratio"], s.get("max_share_ratio", 1.0))  # before the policy, sharers sent what was asked


def _markdown(report: dict) -> str:
    s, sharers = report["settings"], report["sharers"].values()
    run = (f"{len(report['sharers'])} sharers, {len(report['targets_users'])} targets · history {s['history']}, "
           f"test {s['test']} · LoRA rank {s['lora_rank']}, {s['lora_steps']} steps, "
           f"gates {s.get('gate_objective', 'lm')}"
           f"{'' if s.get('gate_objective', 'lm') == 'centroid' else ' ' + str(s['gate_steps']) + ' steps'}, "
           f"mix {s.get('mix', 'ab')}, "
           f"fine-tune {s['ft_steps']} steps · share ratio {s['share_ratio']} asked, {_sent(s)} sent (the sharers' "
           f"policy) · top-k {s['top_k']}, shortlist {s['shortlist']} · rng seed {s['rng_seed']}")
    sharer_cost = (f"Sharers (once for all targets, mean of {len(report['sharers'])}): upload "
                   f"{_bytes(np.mean([v['upload_bytes'] for v in sharers]))}, training "
                   f"{np.mean([v['train_seconds'] for v in sharers]):.1f} s, "
                   f"{np.mean([v['train_tokens'] for v in sharers]):,.0f} tokens (LoRA and gates, forward and "
                   f"backward).")
    seed = f"seed `{report['seed']}`" + (f" + catalog `{s['catalog']}`" if s.get("catalog") else "")
    parts = ["# bouquet bench", "", f"data `{s['data']}` · {seed} · {report['hardware']}  ", run, "",
             markdown_table(report), "", NOTES, ""]
    if report.get("fidelity_ceiling") is not None:
        parts += [f"Fidelity ceiling: the judge names the right label for {report['fidelity_ceiling']:.2f} of the "
                  f"targets' own held-out answers (clipped to {s['max_new_tokens']} tokens, as generations are).", ""]
    parts += [sharer_cost, "", "## targets", ""]
    for t in report["targets"]:
        mark = "not measured" if t["met"] is None else ("**met**" if t["met"] else "**not met**")
        parts.append(f"- {mark}: {t['target']} ({t['evidence']})")
    parts += _paired_lines(report)
    if report.get("seeds"):
        parts += ["", *_seed_choice(report["seeds"])]
    for name, points in report["sweeps"].items():
        parts += ["", f"## sweep: {name}", "",
                  f"| {name} | perpcs perplexity | pool pieces | tokens fwd | downloaded |", "|---|---|---|---|---|"]
        parts += [f"| {p['value']} | {p['perplexity']:.3f} | {p['pool_pieces']} | {p['tokens_forward']:,.0f} | "
                  f"{_bytes(p['bytes_downloaded'])} |" for p in points]
    parts += ["", "## plots", ""] + [f"![{Path(p).stem}]({p})" for p in report["plots"]]
    return "\n".join(parts) + "\n"


def _paired_lines(report: dict) -> list[str]:
    """Perpcs against each baseline target by target; the gates' own check; the oracle."""
    lines = []
    best = report.get("gain_recovery_best_oppu") or {}
    if best:
        lines += ["", "Gain recovery against OPPU at its best (the better of oppu and oppu-tuned): " +
                  ", ".join(f"{m} {_pct(v)}" for m, v in best.items() if m not in ("seed", "oppu")) + "."]
    if report.get("paired"):
        lines += ["", "## perpcs against each method, target by target", "",
                  "Perplexity difference perpcs − other per target (negative: perpcs better): mean, bootstrap 95% "
                  "interval of the mean, targets where perpcs is lower / higher, and two-sided paired tests.", "",
                  "| other | targets | mean diff | 95% interval | median | lower / higher | Wilcoxon p | sign p |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {o} | {c['n']} | {c['mean_diff']:+.3f} | [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | "
                  f"{c['median_diff']:+.3f} | {c['lower']} / {c['higher']} | {c['wilcoxon_p']:.3g} | {c['sign_p']:.3g} |"
                  for o, c in report["paired"].items()]
    g = report.get("gates")
    if g:
        rows = [r for r in report["rows"] if r["kind"] == "gates"]
        lines += ["", "## the gates' own check", "",
                  f"Each sharer's held-out records scored against every gate of the pool ({g['sharers']} sharers): "
                  f"its own piece ranks first at {g['top1']:.1%} of positions against {g['chance_top1']:.1%} by chance "
                  f"({g['top1_vs_chance']:.2f}x), mean reciprocal rank {g['mrr']:.3f} against {g['chance_mrr']:.3f}; "
                  f"{g['below_chance']} sharers below chance. Summed over all positions, the gates name the right "
                  f"sharer first for {g['user_top1']:.1%} of sharers (chance {g['user_chance_top1']:.1%}).", "",
                  "| sharer | top-1 | chance | MRR | chance MRR | sharer rank (all positions) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['user']} | {r['top1']:.1%} | {r['chance_top1']:.1%} | {r['mrr']:.3f} | {r['chance_mrr']:.3f} | "
                  f"{r['user_rank']:g} of {r['sharers']} |" for r in rows]
    o = report.get("oracle")
    if o:
        rec = f", {o['gain_recovery']:.1%} of oppu's gain" if o.get("gain_recovery") is not None else ""
        others = ", ".join(f"{m} {o[m]:.3f}" for m in ("seed", "oppu", "perpcs") if o.get(m) is not None)
        lines += ["", "## oracle: the best single sharer adapter", "",
                  f"On each target's held-out records, the best of its sharers' whole adapters (the ceiling of any "
                  f"retrieval): mean perplexity {o['perplexity']:.3f} over {o['targets']} targets{rec} ({others})."]
    return lines


def _seed_choice(seeds: dict) -> list[str]:
    """Who picked which catalog seed, how near it was, and which seed its rows ran on."""
    pieces = ", ".join(f"{name} {n}" for name, n in seeds["pool_pieces"].items())
    lines = ["## seed choice", "",
             f"Catalog `{seeds['catalog']}`. Before anything else every participant picked its seed on its own "
             f"history (its style against the base's answers, in the catalog's words; the seed with the nearest mix of attributes). "
             f"Sharers trained on their seed and shared into its pool; every method of a target ran on the "
             f"target's seed, or on the base when no sharer's pieces were there. Pool pieces per seed: {pieces}.",
             "", "| user | role | chosen seed | mix L1 | ran on |", "|---|---|---|---|---|"]
    for user, sel in sorted(seeds["participants"].items(), key=lambda it: (it[1]["role"], it[0])):
        l1 = "–" if sel["distance"] is None else f"{sel['distance']:.2f}"
        lines.append(f"| {user} | {sel['role']} | {sel['seed']} | {l1} | {sel.get('ran_on', sel['seed'])} |")
    return lines


def write_report(out: Path, s: BenchSettings, seed: str, hardware: str, sharers: dict[str, dict],
                 targets: list[str], rows: list[dict], fidelity_ceiling: float | None = None,
                 seeds: dict | None = None) -> dict:
    """Write report.json, report.md and the plots into `out`; return the report.

    `fidelity_ceiling` is the judge's score on the targets' own held-out answers (clipped to the generation
    budget): what a method that wrote exactly like the target would get, so fidelity figures can be read
    against it rather than against 1. `seeds` (a run with a catalog): the catalog, the pieces per seed and each
    participant's selection, with the seed a target's rows ran on.
    """
    means = method_means(rows)
    recovery, ratios = gain_recovery(means), cost_ratios(means)
    paired = comparisons(rows, "perpcs", PAIRED_WITH)
    gates, oracle = summarise_gates(rows), oracle_summary(rows)
    report = {"settings": s.to_json(), "seed": seed, "hardware": hardware, "sharers": sharers,
              "targets_users": targets, "means": means, "gain_recovery": recovery, "cost_ratios": ratios,
              "gain_recovery_best_oppu": best_gain_recovery(means), "paired": paired, "gates": gates,
              "oracle": oracle,
              "targets": check_targets(means, recovery, ratios, paired, gates, oracle), "sweeps": sweep_table(rows),
              "rows": rows,
              "fidelity_ceiling": fidelity_ceiling, "seeds": seeds}
    report["plots"] = write_plots(out, report, rows)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report))
    return report
