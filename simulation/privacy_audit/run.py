"""`bouquet privacy-audit`: attacks on what sharers release, against the share ratio and ε, beside Per-Pcs's utility.

For each ε ("none": no DP) every user trains as a sharer once, with the device's own pipeline
(participants.sharing.train_and_share, through the bench's simulation.bench.sharers), and keeps its whole adapter.
For each share ratio, each sharer's share is then drawn as its device draws it, capped by its policy, and:

    attack    its shared pieces are attacked with its history as members and its held-out records as non-members
              (simulation.privacy_audit.attacks: membership inference, extraction, gates)
    utility   every user, as a target, runs the newcomer's pipeline (Per-Pcs) on the pool of the other users'
              shares and is scored on its held-out records

The profile attack needs no training: each user's profile is released at each ε of the profile's Gaussian
mechanism (participants.profile.noised_profile) and attacked the same way. Every finished unit of work is one line
of results.jsonl holding the raw per-record figures, so a rerun with the same --out resumes (and may add share
ratios or ε), and the report is computed from those lines alone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

from participants.adapters import branches
from participants.cutting import choose_share
from participants.evaluation import generate, perplexity
from participants.profile import noised_profile, record_embeddings, unit_profile
from participants.progress import log, progress
from participants.seed_loading import LoadedSeed, load_seed
from protocols.pieces import Piece
from simulation.bench.methods import perpcs
from simulation.bench.results import Results
from simulation.bench.run import hardware
from simulation.bench.settings import check_run_dir
from simulation.bench.sharers import device_pieces, prepare_sharers, share_seed
from simulation.datasets import load_users
from simulation.federation import pinned_policy
from simulation.privacy_audit.attacks import extraction_overlap, ngram_overlap, record_pass
from simulation.privacy_audit.report import write_report
from simulation.privacy_audit.settings import DEFAULT_POLICY, NO_DP, AuditSettings, epsilon_label, epsilon_value
from simulation.user_data import UserData


class AuditResults(Results):
    """results.jsonl of an audit: a row per (kind, ε, share ratio, user)."""

    @staticmethod
    def key(row: dict) -> tuple:
        return row["kind"], row["epsilon"], row.get("share_ratio"), row["user"]


def audit_users(s: AuditSettings) -> list[UserData]:
    users = load_users(s.data, history_size=s.history, test_size=s.test, max_users=s.users, seed=s.rng_seed)
    if len(users) < 2 or (s.users is not None and len(users) < s.users):
        raise ValueError(f"{s.data} gives {len(users)} users with {s.history}+{s.test} items; the audit needs "
                         f"{s.users or 2}: lower --users, --history or --test")
    return users


def dp_training(s: AuditSettings, label: str):
    """The DP-SGD a sharer trains with at this ε (None: without DP), from its policy as a device reads it."""
    return s.sharer_policy(epsilon=label).dp_sgd()


def sharer_folder(out: Path, label: str) -> Path:
    return out / ("no-dp" if label == NO_DP else f"dp-epsilon-{label}")


def profile_epsilons(s: AuditSettings) -> list[str]:
    """The profile is attacked without noise, at the default policy's ε, and at every ε of the run."""
    given = [e for e in s.epsilons if e != NO_DP]
    return list(dict.fromkeys([NO_DP, epsilon_label(DEFAULT_POLICY.profile_epsilon), *given]))


def adapter_of(seed: LoadedSeed, pieces: list[Piece]) -> dict:
    """The shared pieces applied as one LoRA at their positions (what an attacker holding them can run)."""
    return branches({p.position: (p.A, p.B) for p in pieces}, pieces[0].scaling, seed.device)


def run_audit(s: AuditSettings, out: str | Path) -> dict:
    """Run (or resume) the audit in `out`; write results.jsonl, report.json, report.md and the plots."""
    out = Path(out)
    users = audit_users(s)
    check_run_dir(out, s, may_grow=("share_ratios", "epsilons"))
    seed = load_seed(s.seed_model)
    results = AuditResults(out / "results.jsonl")
    stats = {}
    for label in s.epsilons:
        stats[label] = _audit_at(seed, s, users, label, out, results)
    _profile_attack(s, users, results)
    return write_report(out, s, seed.descriptor.seed_id, hardware(seed), [u.user for u in users], results.rows,
                        stats)


def _audit_at(seed: LoadedSeed, s: AuditSettings, users: list[UserData], label: str, out: Path,
              results: AuditResults) -> dict:
    """Train the sharers at this ε (those not done yet), then attack and assemble at every share ratio."""
    folder = sharer_folder(out, label)
    stats = prepare_sharers(seed, s, users, folder, None, s.share_ratio, dp=dp_training(s, label))
    full = {u.user: device_pieces(folder, u.user) for u in users}
    with progress(len(users) * (1 + 2 * len(s.share_ratios)), f"audit at epsilon {label}") as bar:
        for u in users:
            if ("bare", label, None, u.user) not in results.done:
                gates = {p.position: p.gate for p in full[u.user]}
                found = record_pass(seed, u.history + u.test, max_len=s.max_len, gates=gates)
                results.append({"kind": "bare", "epsilon": label, "user": u.user, "losses": found.losses.tolist(),
                                "tokens": found.tokens.tolist(),
                                "gate_activation": {k: v.tolist() for k, v in found.gate_activation.items()},
                                "gate_score": {k: v.tolist() for k, v in found.gate_score.items()}})
            bar.update(step="seed pass", user=u.user)
        for ratio in s.share_ratios:
            sent = s.sent_share_ratio(ratio)
            shares = {u.user: choose_share(full[u.user], sent, rng_seed=share_seed(s, i)) for i, u in enumerate(users)}
            for u in users:
                if ("attack", label, ratio, u.user) not in results.done:
                    results.append(_attack(seed, s, u, shares[u.user], full[u.user]) | {"epsilon": label,
                                                                                         "share_ratio": ratio})
                bar.update(step=f"attack at {ratio}", user=u.user)
            for t in users:
                if ("utility", label, ratio, t.user) not in results.done:
                    results.append(_utility(seed, s, t, shares, full) | {"epsilon": label, "share_ratio": ratio})
                bar.update(step=f"Per-Pcs at {ratio}", user=t.user)
    return stats


def _attack(seed: LoadedSeed, s: AuditSettings, u: UserData, shared: list[Piece], full: list[Piece]) -> dict:
    """The sharer's records under its shared pieces: their losses, and generations for the extraction attack."""
    adapter = adapter_of(seed, shared)
    found = record_pass(seed, u.history + u.test, max_len=s.max_len, adapter=adapter)
    row = {"kind": "attack", "user": u.user, "positions": sorted(p.position for p in shared),
           "pieces_sent": len(shared), "pieces_cut": len(full), "losses": found.losses.tolist()}
    if s.extraction:
        k = s.extraction_records
        prompted = u.history[:k] + u.test[:k]
        row["generations"] = generate(seed, prompted, adapter, max_new_tokens=s.max_new_tokens)
        row["extraction"] = [extraction_overlap(g, r, s.ngram) for g, r in zip(row["generations"], prompted)]
        row["extraction_raw"] = [ngram_overlap(g, r.output, s.ngram) for g, r in zip(row["generations"], prompted)]
    return row


def _utility(seed: LoadedSeed, s: AuditSettings, target: UserData, shares: dict[str, list[Piece]],
             full: dict[str, list[Piece]]) -> dict:
    """Per-Pcs for the target from the others' shares: its held-out perplexity, and what it received of whom."""
    candidates = sorted((p for user, ps in shares.items() if user != target.user for p in ps),
                        key=lambda p: (p.position, p.piece_id))
    outcome, done = perpcs(seed, target.history, candidates, s)
    owner = {p.piece_id: user for user, ps in shares.items() for p in ps}
    received = Counter(owner[pid] for pid in done.shortlisted)
    return {"kind": "utility", "user": target.user, "pool_pieces": len(candidates),
            "perplexity": perplexity(seed, target.test, outcome.adapter, max_len=s.max_len),
            "received": {user: n / len(full[user]) for user, n in sorted(received.items())}}


def _profile_attack(s: AuditSettings, users: list[UserData], results: AuditResults) -> None:
    """Each user's profile released at each ε (and without noise), scored against its records' embeddings."""
    labels = profile_epsilons(s)
    todo = [(u, e) for u in users for e in labels if ("profile", e, None, u.user) not in results.done]
    if not todo:
        return
    log.info("profile attack: %d releases", len(todo))
    embeddings = {u.user: record_embeddings(u.history + u.test) for u in {u.user: u for u, _ in todo}.values()}
    # the profile's use to the coordinator: is the released profile nearest its own user's other (held-out) records?
    others = {u.user: unit_profile(u.test) for u in users}
    for u, label in todo:
        if label == NO_DP:
            released = unit_profile(u.history)
        else:
            policy = replace(pinned_policy(s.rng_seed, u.user), profile_epsilon=epsilon_value(label))
            released = noised_profile(u.history, rng=policy.rng("profile"), clip_norm=policy.profile_clip_norm,
                                      epsilon=policy.profile_epsilon, delta=policy.profile_delta).embedding
        nearest = max(others, key=lambda name: float(others[name] @ released))
        results.append({"kind": "profile", "epsilon": label, "user": u.user,
                        "scores": (embeddings[u.user] @ released).astype(float).tolist(),
                        "nearest_is_self": nearest == u.user})
