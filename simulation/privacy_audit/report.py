"""The audit's report: every attack's success per setting, beside Per-Pcs's utility, and the targets met or not.

Computed from results.jsonl rows alone (nothing typed in); the plots are simulation.privacy_audit.plots. Every
mean over users carries its bootstrap 95% interval, and settings are compared on the same users, paired
(simulation.paired_stats).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from simulation.paired_stats import mean_interval, paired_difference, ratio_of_means
from simulation.privacy_audit.attacks import auc, chance_aucs, membership_scores, pooled_perplexity, tpr_at_fpr
from simulation.privacy_audit.plots import write_plots
from simulation.privacy_audit.settings import DEFAULT_POLICY, NO_DP, AuditSettings, epsilon_value

LOW_FPR = 0.01
# the membership inference attacks (simulation.privacy_audit.attacks.membership_scores) and their figures' prefix
MIA = {"drop": "mia", "ratio": "mia_ratio"}


class Rows:
    """The results rows, indexed by (kind, ε, share ratio, user)."""

    def __init__(self, rows: list[dict]):
        self.by_key = {(r["kind"], r["epsilon"], r.get("share_ratio"), r["user"]): r for r in rows}

    def get(self, kind: str, epsilon: str, ratio: float | None, user: str) -> dict | None:
        return self.by_key.get((kind, epsilon, ratio, user))


def _split(values, members: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(values, dtype=float)
    return x[:members], x[members:]


def sharer_figures(rows: Rows, s: AuditSettings, epsilon: str, ratio: float, user: str) -> dict | None:
    """One sharer's attacks and, as a target, its Per-Pcs utility, at one setting (None: not run yet)."""
    bare, attack, utility = (rows.get("bare", epsilon, None, user), rows.get("attack", epsilon, ratio, user),
                             rows.get("utility", epsilon, ratio, user))
    if bare is None or attack is None or utility is None:
        return None
    m = s.history
    figures = {"user": user, "sent": attack["pieces_sent"] / attack["pieces_cut"]}
    for name, score in membership_scores(bare["losses"], attack["losses"]).items():
        prefix = MIA[name]
        members, others = _split(score, m)
        figures |= {f"{prefix}_auc": auc(members, others), f"{prefix}_tpr": tpr_at_fpr(members, others, LOW_FPR),
                    f"{prefix}_members": members.tolist(), f"{prefix}_non_members": others.tolist()}
    for name in ("gate_activation", "gate_score"):
        score = np.mean([bare[name][pos] for pos in attack["positions"]], axis=0)
        figures[f"{name}_auc"] = auc(*_split(score, m))
    if "extraction" in attack:
        k = s.extraction_records
        mem, other = _split(attack["extraction"], min(k, s.history))
        raw_mem, raw_other = _split(attack["extraction_raw"], min(k, s.history))
        figures |= {"extraction_members": float(mem.mean()), "extraction_non_members": float(other.mean()),
                    "extraction_gap": float(mem.mean() - other.mean()), "extraction_auc": auc(mem, other),
                    "extraction_raw_members": float(raw_mem.mean()),
                    "extraction_raw_non_members": float(raw_other.mean())}
    seed_ppl = pooled_perplexity(*(np.asarray(bare[k][m:], dtype=float) for k in ("losses", "tokens")))
    figures |= {"seed_perplexity": seed_ppl, "perpcs_perplexity": utility["perplexity"],
                "gain": seed_ppl - utility["perplexity"], "received_max": max(utility["received"].values(), default=0.0),
                "received_all": sum(1 for v in utility["received"].values() if v >= 1.0)}
    return figures


def setting_summary(per_sharer: list[dict]) -> dict:
    """Means over the sharers with their intervals, the worst sharer, and the attack pooled over all of them."""
    def column(name: str) -> list[float]:
        return [f[name] for f in per_sharer]

    out = {"users": len(per_sharer), "sent": float(np.mean(column("sent")))}
    for prefix in MIA.values():
        worst = max(per_sharer, key=lambda f: f[f"{prefix}_auc"])
        members = np.concatenate([f[f"{prefix}_members"] for f in per_sharer])
        others = np.concatenate([f[f"{prefix}_non_members"] for f in per_sharer])
        out |= {f"{prefix}_auc": mean_interval(column(f"{prefix}_auc")), f"{prefix}_auc_max": worst[f"{prefix}_auc"],
                f"{prefix}_auc_max_user": worst["user"], f"{prefix}_tpr": mean_interval(column(f"{prefix}_tpr")),
                f"{prefix}_pooled_auc": auc(members, others),
                f"{prefix}_pooled_tpr": tpr_at_fpr(members, others, LOW_FPR)}
    out |= {"gate_activation_auc": mean_interval(column("gate_activation_auc")),
            "gate_score_auc": mean_interval(column("gate_score_auc")),
            "seed_perplexity": float(np.mean(column("seed_perplexity"))),
            "perpcs_perplexity": float(np.mean(column("perpcs_perplexity"))), "gain": mean_interval(column("gain")),
            "received_max": max(column("received_max")), "received_all": sum(column("received_all"))}
    if "extraction_gap" in per_sharer[0]:
        out |= {name: float(np.mean(column(name))) for name in (
                    "extraction_members", "extraction_non_members", "extraction_raw_members",
                    "extraction_raw_non_members")}
        out |= {
                "extraction_gap": mean_interval(column("extraction_gap")),
                "extraction_auc": mean_interval(column("extraction_auc"))}
    return out


def compare(a: list[dict], b: list[dict]) -> dict:
    """Setting a against setting b on the same sharers: the MIA AUCs' paired differences, and a's Per-Pcs gain
    over the seed as a share of b's."""
    by_user = {f["user"]: f for f in b}
    a = [f for f in a if f["user"] in by_user]
    b = [by_user[f["user"]] for f in a]
    return {"users": len(a),
            **{f"{p}_auc": paired_difference([f[f"{p}_auc"] for f in a], [f[f"{p}_auc"] for f in b])
               for p in MIA.values()},
            "perplexity": paired_difference([f["perpcs_perplexity"] for f in a], [f["perpcs_perplexity"] for f in b]),
            "gain_kept": ratio_of_means([f["gain"] for f in a], [f["gain"] for f in b])}


def profile_summary(rows: Rows, s: AuditSettings, users: list[str], epsilons: list[str]) -> dict:
    out = {}
    for e in epsilons:
        found = [rows.get("profile", e, None, u) for u in users]
        found = [f for f in found if f is not None]
        if not found:
            continue
        splits = [_split(f["scores"], s.history) for f in found]
        aucs = [auc(m, o) for m, o in splits]
        members, others = np.concatenate([m for m, _ in splits]), np.concatenate([o for _, o in splits])
        matched = [f["nearest_is_self"] for f in found if "nearest_is_self" in f]  # rows of older runs lack it
        out[e] = {"auc": mean_interval(aucs), "auc_max": max(aucs), "pooled_tpr": tpr_at_fpr(members, others, LOW_FPR),
                  "matched": float(np.mean(matched)) if matched else None, "users": len(found)}
    return out


def check_targets(s: AuditSettings, figures: dict, summaries: dict) -> list[dict]:
    """The issue's privacy targets, each met or not with the numbers that decide it (None: not measured)."""
    default = (NO_DP, DEFAULT_POLICY.max_share_ratio)
    goals = []

    def goal(text: str, met, evidence: str) -> None:
        goals.append({"target": text, "met": met, "evidence": evidence})

    at_default = summaries.get(default)
    text = f"at the default policy (share ratio {default[1]:g}), no newcomer receives all of any sharer's pieces"
    if at_default is None:
        goal(text, None, f"not measured: run --share-ratios with {default[1]:g}")
    else:
        goal(text, at_default["received_all"] == 0,
             f"the most any target received of one sharer's pieces (A, B): {at_default['received_max']:.0%}; every "
             f"sharer sent {at_default['sent']:.0%} of its pieces and gates")
    text = "at the default policy, MIA mean per-sharer AUC ≤ 0.55 and none above 0.65 (both attacks: loss drop, " \
           "loss ratio)"
    if at_default is None:
        goal(text, None, f"not measured: run --share-ratios with {default[1]:g}")
    else:
        means, maxes = chance_aucs(s.history, s.test, at_default["users"])
        goal(text, all(at_default[f"{p}_auc"]["mean"] <= 0.55 and at_default[f"{p}_auc_max"] <= 0.65
                       for p in MIA.values()),
             "; ".join(f"loss {name}: mean {_ci(at_default[f'{p}_auc'])}, max {at_default[f'{p}_auc_max']:.3f} "
                       f"({at_default[f'{p}_auc_max_user']})" for name, p in MIA.items())
             + f"; an attack that learns nothing, at these sizes, has its mean above 0.55 {np.mean(means > 0.55):.0%} "
               f"and its max above 0.65 {np.mean(maxes > 0.65):.0%} of the time")
    dp = [e for e in s.epsilons if e != NO_DP and epsilon_value(e) <= 8]
    text = "with DP-SGD at ε ≤ 8 (default share ratio): MIA mean per-sharer AUC ≤ 0.52 (both attacks), and Per-Pcs " \
           "keeps ≥ 80% of its non-DP perplexity gain over the seed"
    measured = [e for e in dp if (e, default[1]) in summaries and at_default is not None]
    if not measured:
        goal(text, None, "not measured: run --epsilons with a value ≤ 8 and --share-ratios with "
                         f"{default[1]:g}")
    for e in measured:
        at = summaries[(e, default[1])]
        kept = compare(figures[(e, default[1])], figures[default])["gain_kept"]
        means, _ = chance_aucs(s.history, s.test, at["users"])
        goal(f"{text} [ε = {e}]", all(at[f"{p}_auc"]["mean"] <= 0.52 for p in MIA.values()) and kept["ratio"] >= 0.8,
             "; ".join(f"loss {name}: mean AUC {_ci(at[f'{p}_auc'])}" for name, p in MIA.items())
             + f" (an attack that learns nothing has its mean above 0.52 {np.mean(means > 0.52):.0%} of the time); "
               f"gain kept {_pct(kept['ratio'])} [{_pct(kept['low'])}, {_pct(kept['high'])}]")
    return goals


# --- formatting -----------------------------------------------------------------------------------------------


def _ci(x: dict, digits: int = 3) -> str:
    if math.isnan(x["low"]):
        return f"{x['mean']:.{digits}f}"
    return f"{x['mean']:.{digits}f} [{x['low']:.{digits}f}, {x['high']:.{digits}f}]"


def _pct(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.0%}"


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else "<0.001"


def _setting(key: tuple) -> str:
    e, r = key
    return f"share ratio {r:g}, {'no DP' if e == NO_DP else f'ε = {e}'}"


def _markdown(report: dict) -> str:
    s, summaries = report["settings"], report["summaries"]
    head = ["ε (DP-SGD)", "share ratio (cap)", "sent", "MIA AUC [95% CI]", "max (sharer)",
            f"TPR @ {LOW_FPR:.0%} FPR pooled", "MIA ratio AUC [95% CI]", "max (sharer)",
            f"TPR @ {LOW_FPR:.0%} FPR pooled", "gate σ(g·x) AUC", "gate score AUC", "extraction gap", "extraction AUC",
            "Per-Pcs ppl", "gain over seed [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for item in summaries:
        v = item["summary"]
        extraction = [_ci(v["extraction_gap"]), _ci(v["extraction_auc"])] if "extraction_gap" in v else ["–", "–"]
        lines.append("| " + " | ".join([
            item["epsilon"], f"{item['share_ratio']:g}", f"{v['sent']:.0%}", _ci(v["mia_auc"]),
            f"{v['mia_auc_max']:.3f} ({v['mia_auc_max_user']})", f"{v['mia_pooled_tpr']:.3f}",
            _ci(v["mia_ratio_auc"]), f"{v['mia_ratio_auc_max']:.3f} ({v['mia_ratio_auc_max_user']})",
            f"{v['mia_ratio_pooled_tpr']:.3f}",
            _ci(v["gate_activation_auc"]), _ci(v["gate_score_auc"]), *extraction, f"{v['perpcs_perplexity']:.3f}",
            _ci(v["gain"])]) + " |")
    first = summaries[0]["summary"] if summaries else None
    parts = ["# bouquet privacy audit", "",
             f"data `{s['data']}` · seed `{report['seed']}` · {report['hardware']}  ",
             f"{len(report['users'])} users, each a sharer attacked (members: its {s['history']} history records, "
             f"which it trained on; non-members: its {s['test']} held-out records) and a target assembling from the "
             f"others' shares · LoRA rank {s['lora_rank']}, {s['lora_steps']} steps, gates {s['gate_steps']} steps · "
             f"share ratio asked {s['share_ratio']:g}, each sharer sending min(asked, its policy's cap) · DP-SGD "
             f"δ {s['piece_delta']:g}, clip {s['piece_clip_norm']:g} · top-k {s['top_k']} · rng seed "
             f"{s['rng_seed']}", *_dp_lines(report["sharers"]), "",
             "## privacy and utility per setting", "", *lines, "", NOTES.format(test=s["test"])]
    if first is not None:
        parts += ["", f"The seed's held-out perplexity, the same at every setting: {first['seed_perplexity']:.3f} "
                      f"(mean over the targets)."]
    extraction = [item for item in summaries if "extraction_gap" in item["summary"]]
    if extraction:
        parts += ["", f"## extraction ({s['ngram']}-grams of {s['extraction_records']} members' and as many "
                      f"non-members' generations per sharer)", "",
                  "| ε | share ratio | members: beyond the prompt | non-members: beyond the prompt | members: all "
                  "of the answer | non-members: all of the answer |", "|---|---|---|---|---|---|"]
        for item in extraction:
            v = item["summary"]
            parts.append(f"| {item['epsilon']} | {item['share_ratio']:g} | {v['extraction_members']:.3f} | "
                         f"{v['extraction_non_members']:.3f} | {v['extraction_raw_members']:.3f} | "
                         f"{v['extraction_raw_non_members']:.3f} |")
        parts += ["", "*All of the answer* counts n-grams the answer shares with its prompt too: copying the "
                      "prompt scores there, and says nothing of membership."]
    if report["comparisons"]:
        parts += ["", "## paired comparisons (same sharers)", "",
                  "| setting | against | MIA AUC difference [95% CI] | p | MIA ratio AUC difference | p | "
                  "Per-Pcs ppl difference | p | Per-Pcs gain kept [95% CI] |", "|---|---|---|---|---|---|---|---|---|"]
        for c in report["comparisons"]:
            a, r, d, g = c["mia_auc"], c["mia_ratio_auc"], c["perplexity"], c["gain_kept"]
            parts.append(f"| {c['setting']} | {c['against']} | {a['mean']:+.3f} [{a['low']:+.3f}, {a['high']:+.3f}] | "
                         f"{_p(a['p'])} | {r['mean']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] | {_p(r['p'])} | "
                         f"{d['mean']:+.3f} | {_p(d['p'])} | {_pct(g['ratio'])} [{_pct(g['low'])}, {_pct(g['high'])}] |")
    parts += ["", "## targets", ""]
    for t in report["targets"]:
        mark = "not measured" if t["met"] is None else ("**met**" if t["met"] else "**not met**")
        parts.append(f"- {mark}: {t['target']} ({t['evidence']})")
    if report["per_sharer"]:
        keys = [item["key"] for item in summaries]
        parts += ["", "## MIA AUC per sharer (loss drop / loss ratio)", "",
                  "| sharer | " + " | ".join(_setting(k) for k in keys) + " |", "|" + "---|" * (len(keys) + 1)]
        for user in report["users"]:
            cells = [_per_sharer_cell(report["per_sharer"][_name(k)].get(user)) for k in keys]
            parts.append(f"| {user} | " + " | ".join(cells) + " |")
    if report["profile"]:
        parts += ["", "## profile attack", "",
                  "The released profile (participants.profile: clipped mean embedding plus Gaussian noise for (ε, δ) "
                  f"per release, δ = {DEFAULT_POLICY.profile_delta:g}, clip {DEFAULT_POLICY.profile_clip_norm:g}; "
                  f"the default policy's ε is {DEFAULT_POLICY.profile_epsilon:g}) against each record's embedding, "
                  "one release per user. *Nearest its user*: what the profile is worth to the coordinator, the share "
                  "of users whose released profile is nearer their own held-out records' profile than any other "
                  "user's (chance: 1 / users).", "",
                  f"| profile ε | AUC [95% CI] | max | TPR @ {LOW_FPR:.0%} FPR pooled | nearest its user |",
                  "|---|---|---|---|---|"]
        for e, v in report["profile"].items():
            matched = "–" if v.get("matched") is None else f"{v['matched']:.3f} (chance {1 / v['users']:.3f})"
            parts.append(f"| {'none (no noise)' if e == NO_DP else e} | {_ci(v['auc'])} | {v['auc_max']:.3f} | "
                         f"{v['pooled_tpr']:.3f} | {matched} |")
    parts += ["", "## plots", ""] + [f"![{Path(p).stem}]({p})" for p in report["plots"]]
    return "\n".join(parts) + "\n"


NOTES = ("Per setting, means over the sharers with bootstrap 95% intervals over sharers. *MIA*: membership "
         "inference, score = the record's answer loss under the seed minus under the seed with the sharer's shared "
         "pieces; AUC per sharer (members positive); TPR at 1% FPR pooled over all sharers' records (per sharer, "
         "with {test} non-members, it can only be read at 0 false positives). *MIA ratio*: the stronger attack "
         "that scores the log of those two losses' ratio instead, the loss drop relative to the record's difficulty "
         "on the seed. *Gate*: the shared gates' mean "
         "σ(g·x), or the newcomer's score LN(x)·LN(g)/√d, over the shared positions and the answer-predicting "
         "tokens of the record on the bare seed. *Extraction gap*: the share of a greedy generation's word "
         "n-grams, prompted with the record's input under the shared pieces, found in the record's answer but not "
         "in its prompt, members minus non-members; its AUC takes that share as the score. *Per-Pcs ppl*: the "
         "target's held-out perplexity after assembling from the other users' shares; *gain*: the seed's minus "
         "it. *Sent*: the share of its pieces each sharer sent.")


def _dp_lines(sharers: dict[str, dict]) -> list[str]:
    """What the accountant gave each ε's sharers (at most the ε asked)."""
    lines = []
    for label, stats in sharers.items():
        spent = [v["epsilon"] for v in stats.values() if v.get("epsilon") is not None]
        if label != NO_DP and spent:
            lines += ["", f"DP-SGD at piece-epsilon {label}: the accountant's ε per share {min(spent):.2f}–"
                          f"{max(spent):.2f} over {len(spent)} sharers (LoRA and gates together)."]
    return lines


def _per_sharer_cell(figures: dict | None) -> str:
    return "–" if figures is None else f"{figures['mia_auc']:.3f} / {figures['mia_ratio_auc']:.3f}"


def _name(key: tuple) -> str:
    return f"{key[0]}@{key[1]:g}"


def write_report(out: Path, s: AuditSettings, seed: str, hardware: str, users: list[str], rows: list[dict],
                 sharers: dict[str, dict]) -> dict:
    """Write report.json, report.md and the plots into `out`; return the report."""
    index = Rows(rows)
    keys = [(e, r) for e in s.epsilons for r in sorted(s.share_ratios, reverse=True)]
    figures: dict[tuple, list[dict]] = {}
    for key in keys:
        found = [sharer_figures(index, s, key[0], key[1], u) for u in users]
        if all(f is not None for f in found):
            figures[key] = found
    summaries = {key: setting_summary(found) for key, found in figures.items()}
    reference = max((k for k in figures if k[0] == NO_DP), key=lambda k: k[1], default=None)
    comparisons = []
    for key in figures:
        against = [reference] if key[0] == NO_DP else [(NO_DP, key[1])]
        for other in against:
            if other is not None and other != key and other in figures:
                comparisons.append({"setting": _setting(key), "against": _setting(other)}
                                   | compare(figures[key], figures[other]))
    report = {"settings": s.to_json(), "seed": seed, "hardware": hardware, "users": users, "sharers": sharers,
              "summaries": [{"key": k, "epsilon": k[0], "share_ratio": k[1], "summary": v} for k, v in summaries.items()],
              "comparisons": comparisons, "targets": check_targets(s, figures, summaries),
              "per_sharer": {_name(k): {f["user"]: {n: v for n, v in f.items() if not isinstance(v, list)}
                                        for f in found} for k, found in figures.items()},
              "profile": profile_summary(index, s, users, _profile_labels(rows))}
    report["plots"] = write_plots(out, report, figures)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report))
    return report


def _profile_labels(rows: list[dict]) -> list[str]:
    labels = dict.fromkeys(r["epsilon"] for r in rows if r["kind"] == "profile")
    return sorted(labels, key=lambda e: (0, 0.0) if e == NO_DP else (1, -float(e)))  # no noise, then less noise
