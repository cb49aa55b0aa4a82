"""A direct look at the gates, and at the ceiling of any retrieval.

Own-piece rank: a sharer's gates should recognise its own writing. On the sharer's held-out records (never seen
in training), every gate of the pool is scored at every position as a newcomer's device scores them
(participants.assembly.gate_scores); where the sharer's own piece ranks among the candidates at that position gives
the top-1 rate and the mean reciprocal rank, against what a random order gives (1/n and H_n/n). The same, with the
scores of each sharer summed over all positions (standardised per position), says whether the gates as a whole
name the right sharer.

Oracle: for each target, the perplexity of every single sharer adapter on the target's held-out records; the best
one is what a perfect retrieval would reach.
"""

from __future__ import annotations

import numpy as np
import torch

from participants.adapters import branches
from participants.assembly import gate_scores
from participants.evaluation import perplexity
from participants.progress import progress
from participants.seed_loading import LoadedSeed
from participants.settings import assembly_settings
from protocols.pieces import Piece
from protocols.settings import ParticipantSettings
from simulation.user_data import UserData


def _harmonic(n: int) -> float:
    return float(sum(1.0 / i for i in range(1, n + 1)))


def own_piece_ranks(seed: LoadedSeed, sharer: UserData, pool: dict[str, list[Piece]], s: ParticipantSettings,
                    ) -> dict:
    """Where the sharer's own pieces rank among `pool`'s (sharer -> its pieces, itself included) on its held-out
    records: per position, and over all positions together."""
    owner = {p.piece_id: u for u, ps in pool.items() for p in ps}
    gates = [(p.piece_id, p.position, p.rank, p.gate) for ps in pool.values() for p in ps]
    scores = gate_scores(seed, sharer.test, gates, assembly_settings(s))
    ranks, candidates = [], []
    totals = {u: 0.0 for u in pool}
    for ids, total in scores.values():
        own = [i for i, pid in enumerate(ids) if owner[pid] == sharer.user]
        if not own or len(ids) < 2:
            continue
        ties = int((total == total[own[0]]).sum()) - 1  # equal scores (e.g. untrained gates) share the ranks
        ranks.append(1 + int((total > total[own[0]]).sum()) + ties / 2)
        candidates.append(len(ids))
        z = (total - total.mean()) / total.std().clamp(min=1e-12)
        for i, pid in enumerate(ids):
            totals[owner[pid]] += float(z[i])
    if not ranks:
        raise ValueError(f"{sharer.user} has no piece at a position other sharers share too")
    r, n = np.array(ranks, float), np.array(candidates, float)
    user_rank = 1 + sum(v > totals[sharer.user] for v in totals.values()) \
        + (sum(v == totals[sharer.user] for v in totals.values()) - 1) / 2
    return {"kind": "gates", "user": sharer.user, "positions": len(ranks), "candidates": float(n.mean()),
            "top1": float(np.mean(r == 1)), "mrr": float(np.mean(1 / r)), "chance_top1": float(np.mean(1 / n)),
            "chance_mrr": float(np.mean([_harmonic(int(k)) / k for k in n])), "user_rank": float(user_rank),
            "sharers": len(pool)}


@torch.no_grad()
def oracle(seed: LoadedSeed, target: UserData, adapters: dict[str, list[Piece]], max_len: int) -> dict:
    """Every single sharer adapter on the target's held-out records; the best is the retrieval ceiling."""
    ppl = {u: perplexity(seed, target.test, branches({p.position: (p.A, p.B) for p in ps}, ps[0].scaling,
                                                     seed.device), max_len=max_len)
           for u, ps in adapters.items()}
    best = min(ppl, key=ppl.get)
    return {"kind": "oracle", "user": target.user, "best": best, "best_perplexity": ppl[best],
            "perplexity_by_sharer": ppl}


def summarise_gates(rows: list[dict]) -> dict | None:
    """Means over the sharers, and how many rank their own piece first more often than chance."""
    rows = [r for r in rows if r["kind"] == "gates"]
    if not rows:
        return None
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("top1", "mrr", "chance_top1", "chance_mrr")}
    return mean | {"sharers": len(rows), "top1_vs_chance": mean["top1"] / mean["chance_top1"],
                   "below_chance": sum(r["top1"] < r["chance_top1"] for r in rows),
                   "user_top1": float(np.mean([r["user_rank"] == 1 for r in rows])),
                   "user_mrr": float(np.mean([1 / r["user_rank"] for r in rows])),
                   "user_chance_top1": float(np.mean([1 / r["sharers"] for r in rows]))}


def pieces_by_sharer(pool_pieces: list[Piece], full: dict[str, list[Piece]]) -> dict[str, list[Piece]]:
    """The pool's pieces grouped by the sharer whose adapter they were cut from (`full`: sharer -> its adapter)."""
    owner = {p.piece_id: u for u, ps in full.items() for p in ps}
    grouped: dict[str, list[Piece]] = {u: [] for u in full}
    for p in pool_pieces:
        if p.piece_id in owner:
            grouped[owner[p.piece_id]].append(p)
    return {u: ps for u, ps in grouped.items() if ps}


def check_gates(seed: LoadedSeed, s: ParticipantSettings, sharers: list[UserData], pool: dict[str, list[Piece]],
                oracles: list[tuple[UserData, dict[str, list[Piece]]]], results, max_len: int) -> None:
    """Append to `results` the own-piece rank of every sharer in `pool` and the oracle of every (target, the
    full adapters it may choose from) not done yet."""
    ranks = [u for u in sharers if ("gates", u.user) not in results.done and u.user in pool]
    ceilings = [(t, adapters) for t, adapters in oracles if ("oracle", t.user) not in results.done]
    if not ranks and not ceilings:
        return
    # one step per sharer ranked and per single adapter scored: over 16 users this is many minutes of work
    with progress(len(ranks) + sum(len(a) for _, a in ceilings), "gate check and oracles") as bar:
        for u in ranks:
            results.append(own_piece_ranks(seed, u, pool, s))
            bar.update()
        for t, adapters in ceilings:
            results.append(oracle(seed, t, adapters, max_len))
            bar.update(len(adapters))
