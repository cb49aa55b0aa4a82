"""The Flower ServerApp: one bouquet round, as a short list of phases.

    connect      wait for the nodes
    seeds        (with a catalog) every node picks its seed on its own device, from the seeds' explanations
    profiles     every node sends a count and a noised profile; the coordinator chooses sharers and newcomers
    share        sharers train on their seed, cut, sign and share; the pool validates and keeps the pieces
    gates        each newcomer gets its seed's gates (or a fallback seed's) and answers with a shortlist
    assemble     each newcomer gets only its shortlisted pieces, assembles and reports metrics

Each phase builds its outgoing messages, sends them, and collects the replies, as Flower's strategies split
`configure_*` from `aggregate_*`. Pieces fit only the seed they were trained on, so the pool is kept per seed
(its seed id and content hash). Every exchange has a timeout; a node that does not answer, or answers with an
error, is left out of what follows and reported. Nodes are ordered by their signing key id, which a device
keeps from run to run, so the same devices and `rng-seed` give the same sharers and newcomers.
"""

from __future__ import annotations

import json
import logging
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from coordinator.pool import PiecePool
from coordinator.seed_fallback import usable_seed
from coordinator.settings import RunSettings
from coordinator.sharers import Profile, select_sharers
from coordinator.validation import RegisteredSeed, seed_shapes
from protocols import messages as M
from protocols.catalog import Catalog, load_catalog
from protocols.seeds import materialize

log = logging.getLogger("bouquet")


@dataclass
class RoundReport:
    sharers: dict[str, dict] = field(default_factory=dict)  # user -> share metrics
    newcomers: list[dict] = field(default_factory=list)  # per newcomer: user + metrics
    refused: list[str] = field(default_factory=list)  # reasons the pool gave
    unanswered: list[str] = field(default_factory=list)  # "<step>: node <id>: <why>"
    pool_pieces: int = 0
    selections: dict[str, dict] = field(default_factory=dict)  # user -> chosen seed, distance, reason
    pool_by_seed: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, dict] = field(default_factory=dict)  # node -> the seed it wanted, the one it used
    seconds: dict[str, float] = field(default_factory=dict)  # per phase


@dataclass
class Round:
    """What the phases share: the grid, the settings, the pool, and what is known of each node so far."""
    grid: Grid
    settings: RunSettings
    pool: PiecePool
    base_id: str
    report: RoundReport = field(default_factory=RoundReport)
    nodes: list[int] = field(default_factory=list)
    node_seed: dict[int, str] = field(default_factory=dict)  # node -> seed id it runs on
    preferences: dict[int, list[str]] = field(default_factory=dict)  # node -> seed ids, nearest first
    seed_refs: dict[str, ConfigRecord] = field(default_factory=dict)  # catalog seed id -> its name and hash

    def content(self, node: int, **records) -> RecordDict:
        """A message's records: the participants' settings, and the catalog seed the node runs on if any."""
        seed = self.node_seed.get(node, self.base_id)
        extra = {M.SEED: self.seed_refs[seed]} if seed in self.seed_refs else {}
        return RecordDict({M.CONFIG: ConfigRecord(self.settings.participant_config()), **extra, **records})

    def send(self, message_type: str, contents: dict[int, RecordDict], step: str) -> dict[int, Message]:
        """Send one message per node, wait up to the timeout, return the good replies by node id."""
        timeout = self.settings.timeout
        msgs = [Message(content, dst_node_id=nid, message_type=message_type, group_id=step)
                for nid, content in contents.items()]
        replies, failed = {}, set()
        for rep in self.grid.send_and_receive(msgs, timeout=timeout):
            nid = rep.metadata.src_node_id
            if rep.has_error():
                failed.add(nid)
                self.report.unanswered.append(f"{step}: node {nid}: error {rep.error.code}: {rep.error.reason}")
                log.warning("%s: node %s answered with an error: %s", step, nid, rep.error.reason)
            else:
                replies[nid] = rep
        for nid in sorted(set(contents) - set(replies) - failed):
            self.report.unanswered.append(f"{step}: node {nid}: no reply within {timeout:.0f} s")
            log.warning("%s: node %s did not answer within %.0f s", step, nid, timeout)
        return replies

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.report.seconds[name] = time.perf_counter() - start


def register_seed(pool: PiecePool, source: str) -> str:
    seed = materialize(source)
    pool.register_seed(RegisteredSeed(seed.seed_id, seed.content_hash, seed_shapes(seed.path)))
    return seed.seed_id


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


# --- the phases ---------------------------------------------------------------------------------------------


def open_catalog(settings: RunSettings) -> Catalog:
    catalog = load_catalog(settings.catalog)
    base = materialize(settings.seed_model)
    if catalog.base_hash != base.content_hash:
        raise ValueError(f"the catalog at {settings.catalog} is built on {catalog.base!r}, not on this run's "
                         f"seed-model {settings.seed_model!r}; run with --seed-model {catalog.base}")
    return catalog


def choose_seeds(r: Round, catalog: Catalog) -> None:
    """Send the catalog (explanations only, no weights) to every node; each answers with the seed it picked on
    its own data and the catalog's seeds from nearest to farthest. A node that does not answer keeps the base."""
    ids = {}
    for entry in catalog.entries:
        ids[entry.name] = register_seed(r.pool, catalog.seed_source(entry.name))
        r.seed_refs[ids[entry.name]] = ConfigRecord({"catalog-seed": entry.name, "content-hash": entry.content_hash})
    catalog_record = ConfigRecord({"json": json.dumps(catalog.to_dict())})
    replies = r.send(M.STYLE, {n: r.content(n, **{M.CATALOG: catalog_record}) for n in r.nodes}, "style")
    for nid, rep in replies.items():
        sel = rep.content[M.SELECTION]
        name = str(sel["seed"])
        if name:
            r.node_seed[nid] = ids[name]
        r.preferences[nid] = [ids[str(n)] for n in sel.get("ranking", [])]
        r.report.selections[str(sel["user"])] = {"seed": name or "base", "distance": float(sel["distance"]),
                                                 "reason": str(sel["reason"])} | dict(rep.content[M.METRICS])


def choose_participants(r: Round) -> tuple[list[int], list[int]]:
    """Profiles in, sharers and newcomers out; nodes ordered by key id so that a rerun chooses the same."""
    replies = r.send(M.PROFILE, {n: r.content(n) for n in r.nodes}, "profile")
    profiles = [Profile(nid, int(rep.content[M.PROFILE_RECORD]["count"]),
                        np.asarray(rep.content[M.PROFILE_RECORD]["embedding"], dtype=np.float32),
                        str(rep.content[M.PROFILE_RECORD].get("key-id", "")))
                for nid, rep in replies.items()]
    s = r.settings
    sharers = select_sharers(profiles, s.sharers, s.sharer_selection, rng_seed=s.rng_seed)
    rest = [p.node_id for p in sorted(profiles, key=lambda p: p.order) if p.node_id not in sharers]
    newcomers = random.Random(s.rng_seed).sample(rest, min(s.newcomers, len(rest)))
    log.info("sharers: %s; newcomers: %s", sharers, newcomers)
    return sharers, newcomers


def collect_shares(r: Round, sharers: list[int]) -> None:
    """Sharers train and share; the pool validates every piece; one bad reply never stops the others."""
    replies = r.send(M.SHARE, {n: r.content(n) for n in sharers}, "share")
    for nid, rep in replies.items():
        user = str(rep.content[M.INFO]["user"])
        try:
            pieces = M.pieces_from_records(rep.content[M.PIECES], rep.content[M.PIECE_META])
        except ValueError as err:
            r.report.refused.append(f"{user}: the reply did not decode: {err}")
            continue
        accepted, refused = r.pool.add_many(pieces)
        r.report.refused.extend(f"{user}: {reason}" for reason in refused)
        r.report.sharers[user] = dict(rep.content[M.METRICS]) | {"accepted": len(accepted), "refused": len(refused)}
    r.report.pool_by_seed = {seed.seed_id: r.pool.count(seed.seed_id) for seed in r.pool.seeds()}
    r.report.pool_pieces = sum(r.report.pool_by_seed.values())
    log.info("pool holds %s pieces per seed (%d refused)", r.report.pool_by_seed, len(r.report.refused))


def place_newcomers(r: Round, newcomers: list[int]) -> list[int]:
    """Each newcomer on its own seed, or the fallback rule's; those with nowhere to go are reported."""
    available = {seed for seed, count in r.report.pool_by_seed.items() if count}
    placed = []
    for n in newcomers:
        wanted = r.node_seed.get(n, r.base_id)
        usable = usable_seed(wanted, r.preferences.get(n, []), r.base_id, available)
        if usable is None:
            r.report.unanswered.append(f"assemble: node {n}: no pieces for its seed, any other seed, or the base")
            continue
        if usable != wanted:
            log.warning("node %s: no pieces for its seed %s yet; it assembles on %s", n, wanted, usable)
            r.report.fallbacks[str(n)] = {"wanted": wanted, "used": usable}
        r.node_seed[n] = usable
        placed.append(n)
    return placed


def collect_shortlists(r: Round, newcomers: list[int]) -> dict[int, list[str]]:
    """Phase 1 of assembly: each newcomer scores its seed's gates and names the pieces it wants."""
    gate_records = {seed: M.gates_to_records(r.pool.gates(seed)) for seed in {r.node_seed[n] for n in newcomers}}
    replies = r.send(M.GATES, {n: r.content(n, **dict(zip((M.GATE_ARRAYS, M.GATE_META),
                                                            gate_records[r.node_seed[n]])))
                               for n in newcomers}, "gates")
    for nid, rep in replies.items():
        r.report.newcomers.append({"node": nid, "seed": r.node_seed[nid]} | dict(rep.content[M.METRICS]))
    return {nid: list(rep.content[M.SHORTLIST]["ids"]) for nid, rep in replies.items()}


def collect_assemblies(r: Round, shortlists: dict[int, list[str]]) -> None:
    """Phase 2: each newcomer gets only the pieces it asked for, assembles, and reports metrics."""
    contents = {}
    for nid, ids in shortlists.items():
        arrays, meta = M.pieces_to_records(r.pool.get(ids))
        contents[nid] = r.content(nid, **{M.PIECES: arrays, M.PIECE_META: meta})
    replies = r.send(M.ASSEMBLE, contents, "assemble")
    rows = {row["node"]: row for row in r.report.newcomers}
    r.report.newcomers = [{"user": str(replies[nid].content[M.INFO]["user"])} | rows[nid]
                          | dict(replies[nid].content[M.METRICS]) for nid in shortlists if nid in replies]


def run_round(grid: Grid, settings: RunSettings) -> RoundReport:
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with PiecePool(out / "pool") as pool:
        r = Round(grid, settings, pool, register_seed(pool, settings.seed_model))
        with r.phase("connect"):
            r.nodes = wait_for_nodes(grid, settings.min_nodes or settings.sharers + settings.newcomers,
                                     settings.timeout)
            log.info("%d nodes connected", len(r.nodes))
        if settings.catalog:
            with r.phase("seed-choice"):
                choose_seeds(r, open_catalog(settings))
        with r.phase("profiles"):
            sharers, newcomers = choose_participants(r)
        with r.phase("share"):
            collect_shares(r, sharers)
        with r.phase("gates"):
            newcomers = place_newcomers(r, newcomers)
            shortlists = collect_shortlists(r, newcomers) if newcomers else {}
        with r.phase("assemble"):
            if shortlists:
                collect_assemblies(r, shortlists)
    (out / "metrics.json").write_text(json.dumps(asdict(r.report), indent=1))
    return r.report


def make_server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp with fixed settings (simulation), or reading them from the run config (`flwr run`)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_round(grid, settings or RunSettings.from_run_config(dict(context.run_config)))

    return server


app = make_server_app()
