"""`bouquet bench`: Per-Pcs against its baselines, on the same seed and the same users, in one process.

Sharers train a private LoRA and gates, cut it into signed pieces and share a part of them into a
pool, once. Every target user then gets each method in turn (bare seed, its own LoRA (OPPU), the
nearest sharer's whole adapter, random pieces, Per-Pcs, Per-Pcs then a short fine-tune), scored on
its held-out items for quality and on the method's own work for cost. No Flower here: this compares
methods, `bouquet simulate` covers the federated loop. Every finished (target, method) and sweep
point is one line of results.jsonl, so a rerun with the same --out picks up where the last stopped.

With a seed catalog (--catalog) the run follows the federated flow: every sharer and target first picks
its seed on its own history (XPerT against the base, selections.json), sharers train on their seed and
share into its pool, and each target gets every method on its own seed, with that seed's sharers and
pieces. Seeds are taken one at a time (the catalog seeds, then the base) and dropped when done.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.pool import PiecePool
from coordinator.validation import RegisteredSeed, seed_shapes
from participants.adapters import branches, load_peft_adapter, save_peft_adapter
from participants.assembly import Assembly, AssemblySettings, assemble, random_assembly, shortlist
from participants.cutting import choose_share, cut_into_pieces
from participants.evaluation import generate, perplexity, rouge
from participants.gate_training import train_gates
from participants.lora_training import LoraSettings, train_private_lora
from participants.profile import embed_texts
from participants.progress import log, progress
from participants.seed_loading import LoadedSeed, forget_seed, is_loaded, load_seed
from participants.style_direction import choose_from_catalog
from protocols.catalog import Catalog, load_catalog
from protocols.pieces import Piece
from protocols.records import PersonalRecord
from protocols.seeds import materialize
from simulation.bench_report import write_report
from simulation.bench_settings import METHODS, BenchSettings, check_run_dir, is_styleqa
from simulation.datasets import STYLEQA_STYLES, UserData, load_users
from simulation.fidelity import FidelityJudge, style_label

Weights = dict[str, tuple[np.ndarray, np.ndarray]]
BASE = "base"  # the label of --seed-model in selections and rows


def split_users(s: BenchSettings) -> tuple[list[UserData], list[UserData]]:
    """Disjoint sharers and targets, drawn with the run's random seed. For styleqa they are spread over
    the styles in the same (shuffled) style order, so that targets find sharers of their own style."""
    rng = random.Random(s.random_seed)
    if is_styleqa(s.data):
        per_sharer, per_target = math.ceil(s.sharers / len(STYLEQA_STYLES)), math.ceil(s.targets / len(STYLEQA_STYLES))
        users = load_users(s.data, history_size=s.history, test_size=s.test, seed=s.random_seed,
                           styleqa_users_per_style=per_sharer + per_target)
        by_style: dict[str, list[UserData]] = {}
        for u in users:
            by_style.setdefault(style_label(u.user), []).append(u)
        styles = sorted(by_style)
        rng.shuffle(styles)
        sharers = [by_style[st][j] for j in range(per_sharer) for st in styles][: s.sharers]
        targets = [by_style[st][per_sharer + j] for j in range(per_target) for st in styles][: s.targets]
        return sharers, targets
    users = load_users(s.data, history_size=s.history, test_size=s.test, seed=s.random_seed)
    if len(users) < s.sharers + s.targets:
        raise ValueError(f"{s.data} gives {len(users)} users with {s.history}+{s.test} items, but {s.sharers} "
                         f"sharers + {s.targets} targets need {s.sharers + s.targets}: lower --sharers/--targets "
                         f"or --history/--test")
    chosen = rng.sample(users, s.sharers + s.targets)
    return chosen[: s.sharers], chosen[s.sharers:]


def lora_settings(s: BenchSettings) -> LoraSettings:
    return LoraSettings(rank=s.rank, alpha=s.alpha, steps=s.steps, lr=s.lr, batch_size=s.batch_size,
                        max_len=s.max_len, seed=s.random_seed)


def assembly_settings(s: BenchSettings, **changes) -> AssemblySettings:
    return replace(AssemblySettings(top_k=s.top_k, temperature=s.temperature, shortlist=s.shortlist,
                                    max_len=s.max_len), **changes)


def _sharer_key(s: BenchSettings, user: str) -> Ed25519PrivateKey:
    """A simulated device's signing key, derived from the run's seed: piece ids repeat from run to run."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"bench:{s.random_seed}:{user}".encode()).digest())


def _share_seed(s: BenchSettings, sharer_index: int) -> int:
    return s.random_seed * 7919 + sharer_index


def _ab_bytes(weights: Weights) -> int:
    """Bytes of an adapter's A and B as a saved PEFT folder holds them (float32)."""
    return sum(4 * (A.size + B.size) for A, B in weights.values())


def _profile(records: list[PersonalRecord]) -> np.ndarray:
    """Unit-length mean MiniLM embedding of a history's "input\\noutput" texts."""
    mean = embed_texts([f"{r.input}\n{r.output}" for r in records]).mean(axis=0)
    return mean / np.linalg.norm(mean)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


# --- sharers ------------------------------------------------------------------------------------------


def prepare_sharers(seed: LoadedSeed, s: BenchSettings, sharers: list[UserData], out: Path,
                    pool: PiecePool) -> dict[str, dict]:
    """Train, cut and share every sharer not done yet; its full pieces stay on its device folder."""
    path = out / "sharers.json"
    stats: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    settings = lora_settings(s)
    with progress(len(sharers), "sharers") as bar:
        for i, u in enumerate(sharers):
            if u.user not in stats:
                weights, lora = train_private_lora(seed, u.history, settings, desc=f"{u.user}: private LoRA")
                gates, gate = train_gates(seed, u.history, weights, settings, steps=s.gate_steps, lr=s.gate_lr,
                                          desc=f"{u.user}: gates")
                pieces = cut_into_pieces(seed.descriptor, weights, gates, s.rank, s.alpha, _sharer_key(s, u.user))
                device = out / "devices" / u.user
                device.mkdir(parents=True, exist_ok=True)
                for p in pieces:
                    (device / f"{p.piece_id}.safetensors").write_bytes(p.to_bytes())
                shared = choose_share(pieces, s.rho, seed=_share_seed(s, i))
                _, refused = pool.add_many(shared)
                for r in refused:
                    log.warning("%s: %s", u.user, r)
                stats[u.user] = {
                    "upload_bytes": sum(p.A.nbytes + p.B.nbytes + p.gate.nbytes for p in shared),
                    "train_seconds": lora.seconds + gate.seconds, "train_tokens": lora.tokens + gate.tokens,
                    "lora_seconds": lora.seconds, "gate_seconds": gate.seconds, "lora_loss_first": lora.losses[0],
                    "lora_loss_last": lora.losses[-1], "pieces_cut": len(pieces), "pieces_shared": len(shared),
                    "pieces_refused": len(refused)}
                _write_json(path, stats)
            bar.update(sharer=u.user)
    return stats


def device_pieces(out: Path, user: str) -> list[Piece]:
    """A sharer's full adapter as pieces, read back from its device folder, in position order."""
    files = sorted((out / "devices" / user).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{out / 'devices' / user} holds no pieces; remove {user} from sharers.json to retrain")
    return sorted((Piece.from_bytes(f.read_bytes()) for f in files), key=lambda p: p.position)


# --- methods --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """An adapter for one target and what the method paid for it (evaluation excluded)."""
    adapter: dict | None  # position -> LoraBranch; None for the bare seed
    seconds: float = 0.0
    tokens_forward: int = 0
    tokens_backward: int = 0
    bytes_stored: int = 0  # what the user keeps: the adapter, or references to pool pieces
    bytes_adapter: int = 0  # the A, B bytes of the adapter it runs with
    bytes_downloaded: int = 0
    detail: dict = field(default_factory=dict)

    def costs(self) -> dict:
        return {k: getattr(self, k) for k in ("seconds", "tokens_forward", "tokens_backward", "bytes_stored",
                                              "bytes_adapter", "bytes_downloaded")}


@dataclass
class Bench:
    seed: LoadedSeed
    s: BenchSettings
    out: Path
    sharers: list[str]  # in sharing order
    pool_pieces: list[Piece]  # everything the pool holds for the seed
    sharer_pieces: dict[str, list[Piece]]  # each sharer's full adapter
    sharer_profiles: dict[str, np.ndarray]
    label: str = BASE  # the seed's catalog name, or "base"

    def adapter_dir(self, target: str, method: str) -> Path:
        return self.out / "adapters" / target / method

    def shared(self, n_sharers: int, rho: float) -> list[Piece]:
        """The pool the first n sharers would make at share ratio rho (the same draw as the real pool)."""
        pieces = [p for i, u in enumerate(self.sharers[:n_sharers])
                  for p in choose_share(self.sharer_pieces[u], rho, seed=_share_seed(self.s, i))]
        return sorted(pieces, key=lambda p: (p.position, p.piece_id))


def perpcs(seed: LoadedSeed, history: list[PersonalRecord], candidates: list[Piece],
           settings: AssemblySettings) -> tuple[Outcome, Assembly]:
    """Per-Pcs as a newcomer runs it: score every gate, fetch the shortlist, assemble from it."""
    by_id = {p.piece_id: p for p in candidates}
    gates = [(p.piece_id, p.position, p.rank, p.gate) for p in candidates]
    start = time.perf_counter()
    ids = shortlist(seed, history, gates, settings)
    result = assemble(seed, history, [by_id[i] for i in ids], settings)
    seconds = time.perf_counter() - start
    # the shortlist pass runs over the same history batches as the assembly pass
    return Outcome(branches(result.weights, 1.0, seed.device), seconds, tokens_forward=2 * result.tokens,
                   bytes_stored=len(json.dumps(result.choices)), bytes_adapter=_ab_bytes(result.weights),
                   bytes_downloaded=sum(g.nbytes for *_, g in gates)
                   + sum(by_id[i].A.nbytes + by_id[i].B.nbytes for i in ids),
                   detail={"shortlisted": len(ids), "candidates": len(candidates)}), result


def _seed_method(b: Bench, target: UserData, index: int) -> Outcome:
    return Outcome(None)


def _oppu(b: Bench, target: UserData, index: int) -> Outcome:
    start = time.perf_counter()
    weights, report = train_private_lora(b.seed, target.history, lora_settings(b.s), desc=f"{target.user}: oppu")
    seconds = time.perf_counter() - start
    save_peft_adapter(b.adapter_dir(target.user, "oppu"), weights, b.s.rank, b.s.alpha, b.seed.descriptor.seed_id)
    size = _ab_bytes(weights)
    return Outcome(branches(weights, b.s.alpha / b.s.rank, b.seed.device), seconds, report.tokens, report.tokens,
                   size, size, 0, {"loss_first": report.losses[0], "loss_last": report.losses[-1]})


def _retrieval(b: Bench, target: UserData, index: int) -> Outcome:
    start = time.perf_counter()
    mine = _profile(target.history)
    similarity = {u: float(v @ mine) for u, v in b.sharer_profiles.items()}
    nearest = max(b.sharers, key=lambda u: similarity[u])
    pieces = b.sharer_pieces[nearest]
    weights = {p.position: (p.A, p.B) for p in pieces}
    adapter = branches(weights, pieces[0].scaling, b.seed.device)
    size = _ab_bytes(weights)
    return Outcome(adapter, time.perf_counter() - start, bytes_stored=len(json.dumps([p.piece_id for p in pieces])),
                   bytes_adapter=size, bytes_downloaded=size,
                   detail={"sharer": nearest, "similarity": similarity[nearest]})


def _random(b: Bench, target: UserData, index: int) -> Outcome:
    settings = assembly_settings(b.s)
    start = time.perf_counter()
    result = random_assembly(b.pool_pieces, settings, seed=b.s.random_seed + index)
    seconds = time.perf_counter() - start
    by_id = {p.piece_id: p for p in b.pool_pieces}
    drawn = [by_id[pid] for pid, _ in (c for per_pos in result.choices[0].values() for c in per_pos)]
    # like Per-Pcs, the user keeps references to the drawn pieces and their weights
    return Outcome(branches(result.weights, 1.0, b.seed.device), seconds,
                   bytes_stored=len(json.dumps(result.choices)), bytes_adapter=_ab_bytes(result.weights),
                   bytes_downloaded=sum(p.A.nbytes + p.B.nbytes for p in drawn))


def _perpcs(b: Bench, target: UserData, index: int) -> Outcome:
    outcome, result = perpcs(b.seed, target.history, b.pool_pieces, assembly_settings(b.s))
    save_peft_adapter(b.adapter_dir(target.user, "perpcs"), result.weights, result.rank, result.alpha,
                      b.seed.descriptor.seed_id, extra={"choices": result.choices, "cost": outcome.costs()})
    return outcome


def _perpcs_ft(b: Bench, target: UserData, index: int) -> Outcome:
    """Fine-tune from the Per-Pcs adapter (saved by the perpcs method); its cost adds to Per-Pcs's."""
    folder = b.adapter_dir(target.user, "perpcs")
    if not (folder / "bouquet.json").exists():
        _perpcs(b, target, index)
    weights, rank, _ = load_peft_adapter(folder)
    before = json.loads((folder / "bouquet.json").read_text())["cost"]
    settings = replace(lora_settings(b.s), rank=rank, alpha=float(rank), steps=b.s.ft_steps)  # scaling is in B
    start = time.perf_counter()
    tuned, report = train_private_lora(b.seed, target.history, settings, init=weights, desc=f"{target.user}: ft")
    seconds = time.perf_counter() - start
    save_peft_adapter(b.adapter_dir(target.user, "perpcs+ft"), tuned, rank, float(rank), b.seed.descriptor.seed_id)
    size = _ab_bytes(tuned)
    return Outcome(branches(tuned, 1.0, b.seed.device), before["seconds"] + seconds,
                   before["tokens_forward"] + report.tokens, report.tokens, size, size, before["bytes_downloaded"],
                   {"loss_first": report.losses[0], "loss_last": report.losses[-1]})


RUNNERS: dict[str, Callable[[Bench, UserData, int], Outcome]] = {
    "seed": _seed_method, "oppu": _oppu, "retrieval": _retrieval, "random": _random, "perpcs": _perpcs,
    "perpcs+ft": _perpcs_ft}


def quality(b: Bench, target: UserData, adapter: dict | None, judge: FidelityJudge) -> dict:
    """Held-out perplexity, ROUGE of greedy generations, and style fidelity of those generations."""
    ppl = perplexity(b.seed, target.test, adapter, max_len=b.s.max_len)
    generations = generate(b.seed, target.test, adapter, max_new_tokens=b.s.max_new_tokens)
    return {"perplexity": ppl, **rouge(generations, [r.output for r in target.test]),
            "fidelity": judge.fidelity(target.user, generations), "generations": generations}


# --- sweeps -------------------------------------------------------------------------------------------------


def _doublings(limit: int) -> list[int]:
    return sorted({2 ** i for i in range(limit.bit_length()) if 2 ** i < limit} | {limit})


def sweep_values(name: str, s: BenchSettings) -> list:
    return {"rho": [0.25, 0.5, 0.75, 1.0], "topk": sorted(set(_doublings(s.sharers)) | {s.top_k}),
            "sharers": _doublings(s.sharers), "history": _doublings(s.history)}[name]


def sweep_point(b: Bench, name: str, value, targets: list[UserData]) -> dict:
    """Per-Pcs with one setting changed, perplexity only, averaged over the targets."""
    settings = assembly_settings(b.s)
    if name == "topk":
        settings = assembly_settings(b.s, top_k=value, shortlist=max(b.s.shortlist, value))
    candidates = b.shared(value if name == "sharers" else len(b.sharers), value if name == "rho" else b.s.rho)
    per_target, tokens, downloaded = {}, [], []
    for t in targets:
        history = t.history[:value] if name == "history" else t.history
        outcome, _ = perpcs(b.seed, history, candidates, settings)
        per_target[t.user] = perplexity(b.seed, t.test, outcome.adapter, max_len=b.s.max_len)
        tokens.append(outcome.tokens_forward)
        downloaded.append(outcome.bytes_downloaded)
    return {"kind": "sweep", "sweep": name, "value": value, "perplexity": float(np.mean(list(per_target.values()))),
            "per_target": per_target, "pool_pieces": len(candidates), "tokens_forward": float(np.mean(tokens)),
            "bytes_downloaded": float(np.mean(downloaded))}


# --- the run ----------------------------------------------------------------------------------------------


class Results:
    """results.jsonl: one finished unit of work per line, appended as soon as it is done."""

    def __init__(self, path: Path):
        self.path, self.rows = path, []
        if path.exists():
            lines = path.read_text().splitlines()
            for n, line in enumerate(lines):
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    if n < len(lines) - 1:
                        raise ValueError(f"{path}:{n + 1} is not JSON; the results file is damaged") from None
                    path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))  # a torn last line
        self.done = {self.key(r) for r in self.rows}

    @staticmethod
    def key(row: dict) -> tuple:
        return (row["kind"], row["target"], row["method"]) if row["kind"] == "method" else \
            (row["kind"], row["sweep"], row["value"])

    def rejudge(self, judge: FidelityJudge) -> None:
        """Score the stored generations again where the judge has changed since they were scored: fidelity
        is a function of the generations, so a better judge needs no model rerun."""
        stale = [r for r in self.rows if r["kind"] == "method" and r.get("judge") != judge.version]
        if not stale:
            return
        for r in stale:
            r["fidelity"], r["judge"] = judge.fidelity(r["target"], r["generations"]), judge.version
        log.info("re-scored the fidelity of %d stored results with judge %s", len(stale), judge.version)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        tmp.replace(self.path)

    def append(self, row: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.rows.append(row)
        self.done.add(self.key(row))


def token_clip(tokenizer, max_tokens: int):
    """Cut a text to its first `max_tokens` tokens, the budget the generations get."""
    def clip(text: str) -> str:
        return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]).strip()
    return clip


def _hardware(seed: LoadedSeed) -> str:
    import torch

    where = torch.cuda.get_device_name(seed.device) if seed.device.type == "cuda" else "cpu"
    return f"{where}, {seed.dtype}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def open_catalog(s: BenchSettings) -> Catalog | None:
    """The run's seed catalog, or None without one; refused when it explains seeds of another base."""
    if not s.catalog:
        return None
    catalog = load_catalog(s.catalog)
    mine = materialize(s.seed_model).content_hash
    if mine != catalog.base_hash:
        raise ValueError(f"the catalog at {s.catalog} is built on {catalog.base!r} (weights "
                         f"{catalog.base_hash[:12]}…), not on --seed-model {s.seed_model!r} ({mine[:12]}…): its "
                         f"seeds are deltas over that base; run with --seed-model {catalog.base}")
    return catalog


def choose_seeds(base: LoadedSeed, catalog: Catalog, users: list[tuple[str, UserData]], out: Path) -> dict[str, dict]:
    """Every participant's own choice, before anything else: XPerT on its history against the base, the nearest
    catalog seed. `users` are (role, user). Kept in out/selections.json, one user at a time, so a rerun
    chooses only for those not done; refused when the catalog's seeds changed since."""
    path = out / "selections.json"
    fingerprint = {"base_hash": catalog.base_hash, "seeds": {e.name: e.content_hash for e in catalog.entries}}
    saved = json.loads(path.read_text()) if path.exists() else {"catalog": fingerprint, "users": {}}
    if saved["catalog"] != fingerprint:
        raise ValueError(f"the catalog at {catalog.folder} has other seeds than when {path} was written; "
                         f"choose another --out")
    chosen = saved["users"]
    with progress(len(users), "seed choice") as bar:
        for role, u in users:
            if u.user not in chosen:
                start = time.perf_counter()
                selection, _ = choose_from_catalog(base, u.history, catalog)
                chosen[u.user] = {"role": role, "seed": selection.seed_id or BASE,
                                  "distance": selection.distance if math.isfinite(selection.distance) else None,
                                  "reason": selection.reason, "seconds": time.perf_counter() - start,
                                  "ranking": sorted(selection.distances, key=lambda k: (selection.distances[k], k))}
                _write_json(path, saved)
            bar.update(user=u.user)
    return {u.user: chosen[u.user] for _, u in users}


@dataclass
class SeedGroup:
    """One seed in use and the participants on it, in the run's order."""
    label: str  # catalog seed name, or "base"
    source: str  # what load_seed takes
    sharers: list[UserData] = field(default_factory=list)
    targets: list[tuple[int, UserData]] = field(default_factory=list)  # (index among all targets, user)


def seed_groups(s: BenchSettings, catalog: Catalog | None, sharers: list[UserData], targets: list[UserData],
                selections: dict[str, dict]) -> list[SeedGroup]:
    """The seeds in use, catalog seeds by name first and the base last (targets may fall back to it)."""
    base = SeedGroup(BASE, s.seed_model)
    groups: dict[str, SeedGroup] = {}

    def group(user: str) -> SeedGroup:
        label = selections[user]["seed"] if catalog is not None else BASE
        if label == BASE:
            return base
        return groups.setdefault(label, SeedGroup(label, catalog.seed_source(label)))

    for u in sharers:
        group(u.user).sharers.append(u)
    shared_on = {g.label for g in [base, *groups.values()] if g.sharers}
    for index, t in enumerate(targets):
        chosen = selections[t.user]["seed"] if catalog is not None else BASE
        if catalog is not None and chosen not in shared_on:
            # pieces fit only their own seed: take the nearest seed (in the target's own ranking) that has sharers
            nearer = [label for label in selections[t.user].get("ranking", []) if label in shared_on]
            label = nearer[0] if nearer else BASE
            log.info("%s: no sharer chose %s; it runs on the nearest seed with sharers, %s", t.user, chosen, label)
            (base if label == BASE else groups[label]).targets.append((index, t))
            continue
        group(t.user).targets.append((index, t))
    return [groups[k] for k in sorted(groups)] + [base]


def _share(g: SeedGroup, s: BenchSettings, out: Path, pool: PiecePool, stats: dict) -> tuple[dict, list[Piece]]:
    """Register the group's seed with the pool, let its sharers not done yet train and share (loading the seed
    only then), and return the sharers' stats and everything the pool holds for the seed."""
    desc = materialize(g.source)
    pool.register_seed(RegisteredSeed(desc.seed_id, desc.content_hash, seed_shapes(desc.path)))
    if any(u.user not in stats for u in g.sharers):
        stats = prepare_sharers(load_seed(g.source), s, g.sharers, out, pool)
    return stats, pool.get([pid for pid, *_ in pool.gates(desc.seed_id)])


def _bench(g: SeedGroup, s: BenchSettings, out: Path, pool_pieces: list[Piece]) -> Bench:
    return Bench(load_seed(g.source), s, out, [u.user for u in g.sharers], pool_pieces,
                 {u.user: device_pieces(out, u.user) for u in g.sharers},
                 {u.user: _profile(u.history) for u in g.sharers}, g.label)


def _run_targets(b: Bench, targets: list[tuple[int, UserData]], results: Results, judge: FidelityJudge,
                 bar) -> None:
    for index, target in targets:
        for method in METHODS:
            if ("method", target.user, method) not in results.done:
                outcome = RUNNERS[method](b, target, index)
                results.append({"kind": "method", "target": target.user, "method": method, "seed": b.label}
                               | outcome.costs() | quality(b, target, outcome.adapter, judge)
                               | {"detail": outcome.detail, "judge": judge.version})
            bar.update(target=target.user, method=method)


def run_bench(s: BenchSettings, out: str | Path) -> dict:
    """Run (or resume) the benchmark in `out`; write results.jsonl, report.json, report.md and plots."""
    out = Path(out)
    catalog = open_catalog(s)
    sharers, targets = split_users(s)
    check_run_dir(out, s)
    base = load_seed(s.seed_model)
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
    with PiecePool(out / "pool") as pool, progress(len(targets) * len(METHODS), "bench") as bar:
        stranded: list[tuple[int, UserData]] = []  # targets whose own seed got no pieces: they go to the base
        for g in seed_groups(s, catalog, sharers, targets, selections):
            if g.label == BASE:
                g.targets = sorted(g.targets + stranded, key=lambda it: it[0])
            held = is_loaded(g.source)
            stats, pool_pieces = _share(g, s, out, pool, stats)
            pool_by_seed[g.label] = len(pool_pieces)
            if pool_pieces:
                for _, t in g.targets:
                    chosen = selections.get(t.user, {}).get("seed", g.label)
                    ran_on.setdefault(t.user, g.label if chosen == g.label else
                                      f"{g.label} (fallback: no sharer on {chosen})")
                missing = any(("method", t.user, m) not in results.done for _, t in g.targets for m in METHODS)
                b = _bench(g, s, out, pool_pieces) if missing or (g.label == BASE and s.sweep) else None
                if b is not None:
                    _run_targets(b, g.targets, results, judge, bar)
                else:
                    bar.update(len(g.targets) * len(METHODS))
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
                bar.update(len(g.targets) * len(METHODS))
            if not held:
                forget_seed(g.source)  # one catalog seed in memory at a time
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
    return write_report(out, s, base.descriptor.seed_id, _hardware(base), stats, [t.user for t in evaluated],
                        results.rows, fidelity_ceiling=ceiling, seeds=seeds)
