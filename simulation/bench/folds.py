"""`bouquet bench --rotate`: every user a target once, its sharers the others (rotating folds).

Enough targets for a paired test, at the cost of a plain run: each user trains and shares once, into one pool;
a fold keeps from it the pieces of its sharers (the users after the target in a fixed order) and nothing of the
target's own. The target's OPPU is its own adapter, trained by the very call that the `oppu` method makes
(train_private_lora on its history with the run's LoRA settings), so it is reused rather than trained again.
"""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.pool import PiecePool
from participants.adapters import branches
from participants.profile import unit_profile
from participants.progress import progress
from participants.seed_loading import load_seed
from protocols.pieces import Piece
from simulation.bench.gate_check import check_gates, pieces_by_sharer
from simulation.bench.methods import BASE, RUNNERS, Bench, Outcome, ab_bytes
from simulation.bench.report import write_report
from simulation.bench.results import Results
from simulation.bench.run import _run_targets, _share, hardware, token_clip
from simulation.bench.seeds import SeedGroup
from simulation.bench.settings import BenchSettings, check_run_dir
from simulation.bench.sharers import device_pieces
from simulation.bench.users import fold_sharers, fold_users
from simulation.fidelity import FidelityJudge
from simulation.user_data import UserData


def own_adapter(full: dict[str, list[Piece]], stats: dict[str, dict]):
    """The `oppu` runner of a fold: the target's own shared adapter, with what training it cost."""
    def run(b: Bench, target: UserData, index: int) -> Outcome:
        pieces = full[target.user]
        weights = {p.position: (p.A, p.B) for p in pieces}
        cost = stats[target.user]
        size = ab_bytes(weights)
        return Outcome(branches(weights, pieces[0].scaling, b.seed.device), cost["lora_seconds"],
                       cost["lora_tokens"], cost["lora_tokens"], size, size, 0,
                       {"loss_first": cost["lora_loss_first"], "loss_last": cost["lora_loss_last"],
                        "reused": "the user's own sharer adapter"})
    return run


def run_folds(s: BenchSettings, out: Path) -> dict:
    """Run (or resume) a rotating-folds bench in `out`; write results.jsonl, report.json, report.md and plots."""
    users = fold_users(s)
    check_run_dir(out, s)
    seed = load_seed(s.seed_model)
    clip = token_clip(seed.tokenizer, s.max_new_tokens)
    judge = FidelityJudge(users, clip=clip)
    results = Results(out / "results.jsonl")
    results.rejudge(judge)
    path = out / "sharers.json"
    stats: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    with PiecePool(out / "pool") as pool:
        stats, pool_pieces = _share(SeedGroup(BASE, s.seed_model, sharers=users), s, out, pool, stats)
    full = {u.user: device_pieces(out, u.user) for u in users}
    shared = pieces_by_sharer(pool_pieces, full)
    profiles = {u.user: unit_profile(u.history) for u in users}
    folds = [fold_sharers(users, i, s.sharers) for i in range(len(users))]
    runners = RUNNERS | {"oppu": own_adapter(full, stats)}
    # the gates against the whole pool; each target's oracle among its own fold's sharers
    check_gates(seed, s, users, shared, [(t, {u.user: full[u.user] for u in fold})
                                         for t, fold in zip(users, folds)], results, s.max_len)
    with progress(len(users) * len(s.methods), "bench") as bar:
        for index, (target, fold) in enumerate(zip(users, folds)):
            if all(("method", target.user, m) in results.done for m in s.methods):
                bar.update(len(s.methods))
                continue
            names = [u.user for u in fold]
            b = Bench(seed, s, out, names, sorted((p for u in names for p in shared.get(u, [])),
                                                  key=lambda p: (p.position, p.piece_id)),
                      {u: full[u] for u in names}, {u: profiles[u] for u in names})
            _run_targets(b, [(index, target)], results, judge, bar, runners)
    ceiling = sum(judge.fidelity(t.user, [clip(r.output) for r in t.test]) for t in users) / len(users)
    return write_report(out, s, seed.descriptor.seed_id, hardware(seed), stats, [t.user for t in users],
                        results.rows, fidelity_ceiling=ceiling)
