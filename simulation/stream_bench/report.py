"""The stream bench's report, from results.jsonl rows only: means per method and buffer size, gain recovered
against the adapter trained on the whole stream, paired comparisons between rules over the same users, the cost of
scoring an item against a forward pass, the buffer's memory, which targets were met; report.md, report.json and
plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from simulation.figures import save_figure
from simulation.paired_stats import paired_comparison
from simulation.stream_bench.settings import StreamBenchSettings

METRICS = (("perplexity", True), ("rouge1", False))  # (name, lower is better)


def _per_user(rows: list[dict], method: str, buffer: int | None, metric: str) -> dict[str, float]:
    return {r["user"]: r[metric] for r in rows
            if r["kind"] == "method" and r["method"] == method and r.get("buffer") == buffer}


def method_means(rows: list[dict]) -> list[dict]:
    """One entry per (method, buffer size): means over users of the metrics, of the training set's size and of the
    adapter's training steps."""
    keys = sorted({(r["method"], r.get("buffer")) for r in rows if r["kind"] == "method"},
                  key=lambda k: (k[1] or 0, k[0]))
    out = []
    for method, b in keys:
        mine = [r for r in rows if r["kind"] == "method" and r["method"] == method and r.get("buffer") == b]
        out.append({"method": method, "buffer": b, "users": len(mine),
                    **{k: float(np.mean([r[k] for r in mine]))
                       for k in ("perplexity", "rouge1", "train_records", "steps")}})
    return out


def recovery(means: list[dict]) -> None:
    """Adds, per entry, the share of the whole-stream adapter's gain over the seed it recovers (perplexity and
    ROUGE-1); None when the whole stream does not improve on the seed."""
    ref = {m["method"]: m for m in means if m["buffer"] is None}
    if "seed" not in ref or "full" not in ref:
        return
    for m in means:
        for k, lower in METRICS:
            gain = (ref["seed"][k] - ref["full"][k]) * (1 if lower else -1)
            mine = (ref["seed"][k] - m[k]) * (1 if lower else -1)
            m[f"{k}_recovery"] = mine / gain if gain > 0 else None


def comparisons(rows: list[dict], s: StreamBenchSettings) -> list[dict]:
    """sdss against each other rule, and each rule with synthesis against without, per buffer size and metric,
    paired over the users both ran on."""
    pairs = []
    variants = [v for v, on in (("", s.synthesis in ("both", "off")), ("+syn", s.synthesis in ("both", "on"))) if on]
    for b in s.buffer_sizes:
        if "sdss" in s.rules:
            pairs += [(f"sdss{v}", f"{o}{v}", b) for v in variants for o in s.rules if o != "sdss"]
        if len(variants) == 2:
            pairs += [(f"{r}+syn", r, b) for r in s.rules]
    out = []
    for a, other, b in pairs:
        for metric, lower in METRICS:
            x, y = _per_user(rows, a, b, metric), _per_user(rows, other, b, metric)
            users = sorted(set(x) & set(y))
            if len(users) >= 2:
                out.append({"a": a, "b": other, "buffer": b, "metric": metric, **paired_comparison(
                    [x[u] for u in users], [y[u] for u in users], lower_is_better=lower, seed=s.rng_seed)})
    return out


def costs(rows: list[dict]) -> dict:
    c = [r for r in rows if r["kind"] == "cost"]
    if not c:
        return {}
    return {"users": len(c), "score_ms": float(np.mean([r["score_ms"] for r in c])),
            "offer_ms": float(np.mean([r["offer_ms"] for r in c])),
            "forward_ms": float(np.mean([r["forward_ms"] for r in c])),
            "ratio_mean": float(np.mean([r["ratio"] for r in c])), "ratio_max": float(np.max([r["ratio"] for r in c]))}


def memory(rows: list[dict]) -> list[dict]:
    out = []
    for b in sorted({r["buffer"] for r in rows if r["kind"] == "buffer"}):
        mine = [r for r in rows if r["kind"] == "buffer" and r["buffer"] == b]
        out.append({"buffer": b, "memory_bytes": float(np.mean([r["memory_bytes"] for r in mine])),
                    "file_bytes": float(np.mean([r["file_bytes"] for r in mine])),
                    "annotated": float(np.mean([r["annotated"] for r in mine]))})
    return out


def check_targets(s: StreamBenchSettings, means: list[dict], compared: list[dict], cost: dict) -> list[dict]:
    tenth = [b for b in s.buffer_sizes if abs(b - s.stream / 10) <= max(1, s.stream / 100)]
    targets = []
    entry = next((m for m in means if m["method"] == "sdss+syn" and m["buffer"] in tenth), None)
    if entry is None or entry.get("perplexity_recovery") is None:
        alone = next((m for m in means if m["method"] == "sdss" and m["buffer"] in tenth), None)
        seen = ("" if alone is None or alone.get("perplexity_recovery") is None else
                f"; selection alone (sdss, B = {alone['buffer']}) recovers {alone['perplexity_recovery']:.1%} of the "
                f"perplexity gain, ROUGE-1 {_pct(alone.get('rouge1_recovery'))}")
        targets.append({"target": "a buffer of 10% of the stream with selection plus synthesis recovers >= 90% of "
                                  "the whole stream's gain", "met": None,
                        "evidence": "not measured: needs sdss+syn at B = stream / 10, and the whole stream to beat "
                                    "the seed" + seen})
    else:
        r, r1 = entry["perplexity_recovery"], entry.get("rouge1_recovery")
        targets.append({"target": f"a buffer of 10% of the stream (B = {entry['buffer']}) with selection plus "
                                  f"synthesis recovers >= 90% of the whole stream's gain", "met": r >= 0.9,
                        "evidence": f"perplexity gain recovered {r:.1%}; ROUGE-1 gain recovered "
                                    f"{'–' if r1 is None else f'{r1:.1%}'}"})
    mine = [c for c in compared if c["a"].startswith("sdss") and c["b"].split("+")[0] in ("fifo", "random")
            and c["metric"] == "perplexity"]
    if mine:
        ok = all(c["better"] and c["p_value"] < 0.05 for c in mine)
        targets.append({"target": "sdss beats fifo and random at the same buffer size (perplexity, p < 0.05)",
                        "met": ok, "evidence": "; ".join(
                            f"B {c['buffer']} {c['a']} vs {c['b']}: {c['diff']:+.3f} [{c['ci_low']:+.3f}, "
                            f"{c['ci_high']:+.3f}], p {c['p_value']:.3f}" for c in mine)})
    else:
        targets.append({"target": "sdss beats fifo and random", "met": None,
                        "evidence": "not measured: needs sdss and fifo or random"})
    if cost:
        targets.append({"target": "scoring an incoming item costs at most one forward pass of it",
                        "met": cost["ratio_max"] <= 1.0,
                        "evidence": f"{cost['score_ms']:.1f} ms against {cost['forward_ms']:.1f} ms: "
                                    f"{cost['ratio_mean']:.2f}x on average, {cost['ratio_max']:.2f}x at most"})
    return targets


# --- formatting -----------------------------------------------------------------------------------------------


def _pct(x) -> str:
    return "–" if x is None else f"{x:.1%}"


_BUFFER_TRAINING = {"reference-steps": "as many as the reference: the same compute, the data the only difference",
                    "lora-steps": "lora-steps"}


def _markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# bouquet stream-bench", "",
             f"data `{s['data']}` · seed `{report['seed']}` · {report['hardware']}  ",
             f"{len(report['users'])} users · stream {s['stream']} items, test {s['test']} (the items after the "
             f"stream) · buffer sizes {', '.join(map(str, s['buffer_sizes']))} · {s['rounds']} annotation rounds · "
             f"LoRA rank {s['lora_rank']}, lr {s['lora_lr']:g}, batches of {s['batch_size']} × ≤{s['max_len']} "
             "tokens · "
             + ("synthesis off · " if s["synthesis"] == "off" else
                f"synthesis K = {s['pairs']} written by the {s.get('synthesis_writer', 'seed')}, kept at ROUGE-1 in "
                f"[{s['rouge_low']}, {s['rouge_high']}]"
                + (", annotated items repeated to match the pairs" if s.get("repeat_annotated") else "") + " · ") +
             f"generation {s['max_new_tokens']} tokens · rng seed {s['rng_seed']}", "",
             "| method | B | perplexity | gain recovered | ROUGE-1 | ROUGE-1 gain recovered | training records | "
             "steps |", "|---|---|---|---|---|---|---|---|"]
    for m in report["means"]:
        lines.append(f"| {m['method']} | {m['buffer'] or '–'} | {m['perplexity']:.3f} | "
                     f"{_pct(m.get('perplexity_recovery'))} | {m['rouge1']:.4f} | {_pct(m.get('rouge1_recovery'))} "
                     f"| {m['train_records']:.1f} | {m['steps']:.0f} |")
    lines += ["", f"Means over users. *seed*: no adapter; *full*: an adapter trained on every item of the stream, "
                  f"all annotated, for {s['full_epochs']:g} pass(es) over it; a rule's rows train on the items its "
                  f"buffer had annotated (at most B), *+syn* also on the pairs the model wrote and kept for them, for "
                  f"the steps shown ({_BUFFER_TRAINING.get(s.get('buffer_training'), 'lora-steps')}). "
                  "Gain recovered: (seed - method) / (seed - full) for perplexity, the other way round for ROUGE-1.",
              "", "## paired comparisons", "",
              "a − b per user, mean with its bootstrap 95% interval; p: Wilcoxon signed-rank, two-sided; wins: users "
              "where a is better.", "",
              "| B | a | b | metric | mean a − b | 95% interval | p | wins |", "|---|---|---|---|---|---|---|---|"]
    for c in report["comparisons"]:
        lines.append(f"| {c['buffer']} | {c['a']} | {c['b']} | {c['metric']} | {c['diff']:+.4f} | "
                     f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {c['p_value']:.3f} | {c['wins']}/{c['n']} |")
    c = report["cost"]
    if c:
        lines += ["", "## cost of scoring an item", "",
                  f"One item at a time, over {c['users']} users: scoring (a forward pass of its prompt through the "
                  f"backbone, then the sdss decision) {c['score_ms']:.1f} ms, of which the decision {c['offer_ms']:.2f} "
                  f"ms; one full forward pass of the same prompt (with the LM head) {c['forward_ms']:.1f} ms: "
                  f"{c['ratio_mean']:.2f}x on average, {c['ratio_max']:.2f}x at most."]
    lines += ["", "## the buffer's memory", "", "| B | in memory (text, embeddings and token states, scorer) | buffer.json | annotated |",
              "|---|---|---|---|"]
    lines += [f"| {m['buffer']} | {m['memory_bytes'] / 1024:.1f} KiB | {m['file_bytes'] / 1024:.1f} KiB | "
              f"{m['annotated']:.1f} |" for m in report["memory"]]
    if report["synthesis"]:
        syn = report["synthesis"]
        lines += ["", f"Synthesis: {syn['written']} pairs written for {syn['items']} annotated items, {syn['kept']} "
                      f"kept ({_pct(syn['kept'] / syn['written'] if syn['written'] else None)})."]
    lines += ["", "## targets", ""]
    for t in report["targets"]:
        mark = "not measured" if t["met"] is None else ("**met**" if t["met"] else "**not met**")
        lines.append(f"- {mark}: {t['target']} ({t['evidence']})")
    lines += ["", "## plots", ""] + [f"![{Path(p).stem}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def write_plots(out: Path, report: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = report["means"]
    ref = {m["method"]: m for m in means if m["buffer"] is None}
    names = []
    for metric, label in (("perplexity", "held-out perplexity"), ("rouge1", "held-out ROUGE-1")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in sorted({m["method"] for m in means if m["buffer"] is not None}):
            points = sorted((m["buffer"], m[metric]) for m in means if m["method"] == method)
            ax.plot(*zip(*points), marker="o", linestyle="--" if method.endswith("+syn") else "-", label=method)
        for name, color in (("seed", "gray"), ("full", "black")):
            if name in ref:
                ax.axhline(ref[name][metric], color=color, linestyle=":", label=name)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="buffer size B", ylabel=label, title=f"{label} against buffer size")
        ax.legend(fontsize="small", ncol=2)
        names.append(save_figure(fig, out / f"{metric}_vs_buffer.png"))
    return names


def write_report(out: Path, s: StreamBenchSettings, seed: str, hardware: str, rows: list[dict],
                 users: list[str]) -> dict:
    means = method_means(rows)
    recovery(means)
    compared = comparisons(rows, s)
    cost = costs(rows)
    syn = [r for r in rows if r["kind"] == "synthesis"]
    report = {"settings": s.to_json(), "seed": seed, "hardware": hardware, "users": users, "means": means,
              "comparisons": compared, "cost": cost, "memory": memory(rows),
              "synthesis": {k: int(sum(r[k] for r in syn)) for k in ("items", "written", "kept")} if syn else {},
              "targets": check_targets(s, means, compared, cost)}
    report["plots"] = write_plots(out, report)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=lambda x: None if x is None or (
        isinstance(x, float) and math.isnan(x)) else x))
    (out / "report.md").write_text(_markdown(report))
    return report
