"""`bouquet bench`: Per-Pcs against its baselines, on the same seed and the same users, in one process.

Sharers run the device's sharer pipeline once and share into a pool. Every target user then gets each method in
turn (simulation.bench.methods), scored on its held-out items for quality and on the method's own work for
cost. No Flower here: this compares methods, `bouquet simulate` covers the federated loop, and both call the
same device functions. Every finished (target, method) and sweep point is one line of results.jsonl, so a rerun
with the same --out picks up where the last stopped.

With a seed catalog (--catalog) the run follows the federated flow: every sharer and target first picks its seed
on its own history (selections.json), sharers train on their seed and share into its pool, and each target gets
every method on its own seed, with that seed's sharers and pieces. Seeds are taken one at a time (the catalog
seeds, then the base) and dropped when done.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from coordinator.pool import PiecePool
from coordinator.validation import RegisteredSeed, seed_shapes
from participants.profile import unit_profile
from participants.precision import describe, resolve_precision
from participants.progress import log, progress
from participants.seed_loading import LoadedSeed, forget_seed, is_loaded, load_seed, pick_device
from protocols.pieces import Piece
from protocols.seeds import materialize
from simulation.bench.gate_check import check_gates, pieces_by_sharer
from simulation.bench.methods import BASE, RUNNERS, Bench, quality
from simulation.bench.report import write_report
from simulation.bench.results import Results
from simulation.bench.seeds import SeedGroup, choose_seeds, open_catalog, seed_groups
from simulation.bench.settings import BenchSettings, check_run_dir
from simulation.bench.sharers import device_pieces, prepare_sharers
from simulation.bench.sweeps import sweep_point, sweep_values
from simulation.bench.users import split_users
from simulation.fidelity import FidelityJudge
from simulation.user_data import UserData


def token_clip(tokenizer, max_tokens: int):
    """Cut a text to its first `max_tokens` tokens, the budget the generations get."""
    def clip(text: str) -> str:
        return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]).strip()
    return clip


def hardware(seed: LoadedSeed) -> str:
    return describe(seed.device, seed.precision)


def _share(g: SeedGroup, s: BenchSettings, out: Path, pool: PiecePool, stats: dict) -> tuple[dict, list[Piece]]:
    """Register the group's seed with the pool, let its sharers not done yet train and share (loading the seed
    only then), and return the sharers' stats and everything the pool holds for the seed."""
    desc = materialize(g.source)
    pool.register_seed(RegisteredSeed(desc.seed_id, desc.content_hash, seed_shapes(desc.path)))
    if any(u.user not in stats for u in g.sharers):
        stats = prepare_sharers(load_seed(g.source, precision=s.precision), s, g.sharers, out, pool,
                                s.sent_share_ratio())
    return stats, pool.get([pid for pid, *_ in pool.gates(desc.seed_id)])


def _bench(g: SeedGroup, s: BenchSettings, out: Path, pool_pieces: list[Piece]) -> Bench:
    return Bench(load_seed(g.source, precision=s.precision), s, out, [u.user for u in g.sharers], pool_pieces,
                 {u.user: device_pieces(out, u.user) for u in g.sharers},
                 {u.user: unit_profile(u.history) for u in g.sharers}, g.label)


def _run_targets(b: Bench, targets: list[tuple[int, UserData]], results: Results, judge: FidelityJudge,
                 bar, runners=RUNNERS) -> None:
    for index, target in targets:
        for method in b.s.methods:
            if ("method", target.user, method) not in results.done:
                outcome = runners[method](b, target, index)
                results.append({"kind": "method", "target": target.user, "method": method, "seed": b.label}
                               | outcome.costs() | quality(b, target, outcome.adapter, judge, outcome.prompts)
                               | {"detail": outcome.detail, "judge": judge.version})
            bar.update(target=target.user, method=method)


def run_bench(s: BenchSettings, out: str | Path) -> dict:
    """Run (or resume) the benchmark in `out`; write results.jsonl, report.json, report.md and plots."""
    out = Path(out)
    resolve_precision(s.precision, pick_device())  # bf16 asked of hardware without it: refused before any work
    if s.rotate:
        from simulation.bench.folds import run_folds

        return run_folds(s, out)
    catalog = open_catalog(s)
    sharers, targets = split_users(s)
    check_run_dir(out, s)
    base = load_seed(s.seed_model, precision=s.precision)
    clip = token_clip(base.tokenizer, s.max_new_tokens)
    judge = FidelityJudge(sharers + targets, clip=clip)
    results = Results(out / "results.jsonl")
    results.rejudge(judge)
    selections = {} if catalog is None else choose_seeds(
        base, catalog, [("sharer", u) for u in sharers] + [("target", t) for t in targets], out)
    path = out / "sharers.json"
    stats: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    ran_on: dict[str, str] = {}  # target -> the seed its rows use (and why, for a fallback), or why it has none
    pool_by_seed: dict[str, int] = {}
    base_bench = None  # the sweeps run on it (they are refused with a catalog)
    with PiecePool(out / "pool") as pool, progress(len(targets) * len(s.methods), "bench") as bar:
        stranded: list[tuple[int, UserData]] = []  # targets whose own seed got no pieces: they go to the base
        for g in seed_groups(s, catalog, sharers, targets, selections):
            if g.label == BASE:
                g.targets = sorted(g.targets + stranded, key=lambda it: it[0])
            held = is_loaded(g.source, precision=s.precision)
            stats, pool_pieces = _share(g, s, out, pool, stats)
            pool_by_seed[g.label] = len(pool_pieces)
            if pool_pieces:
                for _, t in g.targets:
                    chosen = selections.get(t.user, {}).get("seed", g.label)
                    ran_on.setdefault(t.user, g.label if chosen == g.label else
                                      f"{g.label} (fallback: no sharer on {chosen})")
                missing = any(("method", t.user, m) not in results.done for _, t in g.targets for m in s.methods)
                b = _bench(g, s, out, pool_pieces) if missing or (g.label == BASE and s.sweep) else None
                if b is not None:
                    _run_targets(b, g.targets, results, judge, bar)
                else:
                    bar.update(len(g.targets) * len(s.methods))
                if catalog is None:  # the gates' own check and each target's best single sharer
                    full = {u.user: device_pieces(out, u.user) for u in g.sharers}
                    check_gates(load_seed(g.source), s, g.sharers, pieces_by_sharer(pool_pieces, full),
                                [(t, full) for _, t in g.targets], results, s.max_len)
                if g.label == BASE:
                    base_bench = b
                b = None
            elif catalog is None:
                raise ValueError(f"the pool at {out / 'pool'} holds no pieces for {s.seed_model}: every share "
                                 f"was refused")
            elif g.label != BASE:
                for _, t in g.targets:
                    ran_on[t.user] = f"{BASE} (fallback: no pieces on {g.label})"
                    log.warning("%s: no pieces on its seed %s; it falls back to the base", t.user, g.label)
                stranded += g.targets
            else:
                for _, t in g.targets:
                    ran_on[t.user] = "skipped: no pieces on its seed nor on the base"
                    log.warning("%s: no pieces on its seed nor on the base; it is left out", t.user)
                bar.update(len(g.targets) * len(s.methods))
            if not held:
                forget_seed(g.source, precision=s.precision)  # one catalog seed in memory at a time
    evaluated = [t for t in targets if not ran_on[t.user].startswith("skipped")]
    if not evaluated:
        raise ValueError(f"no target could be evaluated: every target's seed, and the base, got no pieces "
                         f"(pieces per seed: {pool_by_seed}); use more --sharers")
    points = [(name, v) for name in s.sweep for v in sweep_values(name, s)]
    with progress(len(points), "sweeps") as bar:
        for name, value in points:
            if ("sweep", name, value) not in results.done:
                results.append(sweep_point(base_bench, name, value, targets))
            bar.update(sweep=name, value=value)
    ceiling = float(np.mean([judge.fidelity(t.user, [clip(r.output) for r in t.test]) for t in evaluated]))
    seeds = None if catalog is None else {
        "catalog": s.catalog, "pool_pieces": pool_by_seed,
        "participants": {u: sel | ({"ran_on": ran_on[u]} if u in ran_on else {}) for u, sel in selections.items()}}
    return write_report(out, s, base.descriptor.seed_id, hardware(base), stats, [t.user for t in evaluated],
                        results.rows, fidelity_ceiling=ceiling, seeds=seeds)
