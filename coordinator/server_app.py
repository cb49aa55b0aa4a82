"""The Flower ServerApp: one bouquet round, from seed choice to assembled adapters.

    (with a catalog) every participant picks its seed on its own device, from the seeds' explanations
    profiles  -> choose sharers  -> sharers train on their seed, cut, sign, share -> that seed's pool
    newcomers: gates of their seed's pool -> their shortlist -> those pieces -> assembled adapter + metrics

Pieces fit only the seed they were trained on, so the pool is kept per seed (its seed id and hash).

Every exchange has a timeout; a node that does not answer, or answers with an error, is left
out of what follows and reported. Nothing but pieces, piece ids, profiles and metrics comes back.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from coordinator.config import RunSettings
from coordinator.pool import PiecePool
from coordinator.sharers import Profile, select_sharers
from coordinator.validation import RegisteredSeed, seed_shapes
from protocols import messages as M
from protocols.catalog import load_catalog
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
    seconds: dict[str, float] = field(default_factory=dict)


def _send(grid: Grid, message_type: str, contents: dict[int, RecordDict], timeout: float,
          report: RoundReport, step: str) -> dict[int, Message]:
    """Send one message per node, wait up to `timeout`, return the good replies by node id."""
    msgs = [Message(content, dst_node_id=nid, message_type=message_type, group_id=step)
            for nid, content in contents.items()]
    replies, failed = {}, set()
    for rep in grid.send_and_receive(msgs, timeout=timeout):
        nid = rep.metadata.src_node_id
        if rep.has_error():
            failed.add(nid)
            report.unanswered.append(f"{step}: node {nid}: error {rep.error.code}: {rep.error.reason}")
            log.warning("%s: node %s answered with an error: %s", step, nid, rep.error.reason)
        else:
            replies[nid] = rep
    for nid in sorted(set(contents) - set(replies) - failed):
        report.unanswered.append(f"{step}: node {nid}: no reply within {timeout:.0f} s")
        log.warning("%s: node %s did not answer within %.0f s", step, nid, timeout)
    return replies


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def _register(pool: PiecePool, source: str) -> str:
    seed = materialize(source)
    pool.register_seed(RegisteredSeed(seed.seed_id, seed.content_hash, seed_shapes(seed.path)))
    return seed.seed_id


def choose_seeds(grid: Grid, nodes: list[int], settings: RunSettings, report: RoundReport,
                 pool: PiecePool) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Send the catalog (explanations only, no weights) to every node; each answers with the seed it picked on
    its own data and the catalog's seeds from nearest to farthest. Returns node -> seed source (a node that does
    not answer keeps the base) and node -> seed sources in the node's order of preference."""
    catalog = load_catalog(settings.catalog)
    base = materialize(settings.seed)
    if catalog.base_hash != base.content_hash:
        raise ValueError(f"the catalog at {settings.catalog} is built on {catalog.base!r}, not on this run's seed "
                         f"{settings.seed!r}; run with --seed {catalog.base}")
    content = RecordDict({M.CONFIG: ConfigRecord(settings.participant_config()),
                          M.CATALOG: ConfigRecord({"json": json.dumps(catalog.to_dict())})})
    replies = _send(grid, M.STYLE, {n: content for n in nodes}, settings.timeout, report, "style")
    chosen = {n: settings.seed for n in nodes}
    preferences: dict[int, list[str]] = {}
    for nid, rep in replies.items():
        sel = rep.content[M.SELECTION]
        name = str(sel["seed"])
        if name:
            chosen[nid] = _register(pool, catalog.seed_source(name))
        preferences[nid] = [catalog.seed_source(str(n)) for n in sel.get("ranking", [])]
        report.selections[str(sel["user"])] = {"seed": name or "base", "distance": float(sel["distance"]),
                                               "reason": str(sel["reason"])} | dict(rep.content[M.METRICS])
    return chosen, preferences


def run_round(grid: Grid, settings: RunSettings) -> RoundReport:
    report = RoundReport()
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    pool = PiecePool(out / "pool")
    base_id = _register(pool, settings.seed)

    wanted = settings.min_nodes or settings.num_sharers + settings.num_newcomers
    nodes = wait_for_nodes(grid, wanted, settings.timeout)
    log.info("%d nodes connected", len(nodes))

    # 0. with a catalog, every participant picks its seed first; pieces then go to that seed's pool
    node_seed, preferences = (choose_seeds(grid, nodes, settings, report, pool) if settings.catalog
                              else ({n: base_id for n in nodes}, {}))
    report.seconds["seed-choice"] = time.perf_counter() - t0

    def cfg_for(node: int) -> ConfigRecord:
        return ConfigRecord(settings.participant_config() | {"seed": node_seed.get(node, base_id)})

    cfg = ConfigRecord(settings.participant_config())

    # 1. profiles, and the choice of sharers
    replies = _send(grid, M.PROFILE, {n: RecordDict({M.CONFIG: cfg}) for n in nodes}, settings.timeout,
                    report, "profile")
    profiles = [Profile(nid, int(r.content[M.PROFILE_RECORD]["count"]),
                        np.asarray(r.content[M.PROFILE_RECORD]["embedding"], dtype=np.float32))
                for nid, r in replies.items()]
    sharers = select_sharers(profiles, settings.num_sharers, settings.sharer_selection, seed=settings.seed_number)
    rest = sorted(set(replies) - set(sharers))
    newcomers = sorted(random.Random(settings.seed_number).sample(rest, min(settings.num_newcomers, len(rest))))
    log.info("sharers: %s; newcomers: %s", sharers, newcomers)
    report.seconds["profiles"] = time.perf_counter() - t0

    # 2. sharers train and share; the pool validates every piece
    t1 = time.perf_counter()
    replies = _send(grid, M.SHARE, {n: RecordDict({M.CONFIG: cfg_for(n)}) for n in sharers}, settings.timeout,
                    report, "share")
    for nid, rep in replies.items():
        user = str(rep.content[M.INFO]["user"])
        try:
            pieces = M.pieces_from_records(rep.content[M.PIECES], rep.content[M.PIECE_META])
        except ValueError as err:
            report.refused.append(f"{user}: the reply did not decode: {err}")
            continue
        accepted, refused = pool.add_many(pieces)
        report.refused.extend(f"{user}: {r}" for r in refused)
        report.sharers[user] = dict(rep.content[M.METRICS]) | {"accepted": len(accepted), "refused": len(refused)}
    report.pool_by_seed = {s.seed_id: pool.count(s.seed_id) for s in pool.seeds()}
    report.pool_pieces = sum(report.pool_by_seed.values())
    report.seconds["share"] = time.perf_counter() - t1
    log.info("pool holds %s pieces per seed (%d refused)", report.pool_by_seed, len(report.refused))

    # 3. newcomers: gates of their seed's pool first, then only the pieces they asked for. Pieces fit only their
    # own seed, so a newcomer whose seed has no pieces yet moves to the nearest seed (in its own ranking) that has
    # some, then to the base; one with nowhere to go is reported and left out.
    t2 = time.perf_counter()
    placed = []
    for n in newcomers:
        wanted = node_seed.get(n, base_id)
        options = [wanted] + [sid for sid in preferences.get(n, []) if sid != wanted] + [base_id]
        usable = next((sid for sid in options if report.pool_by_seed.get(sid)), None)
        if usable is None:
            report.unanswered.append(f"assemble: node {n}: no pieces for its seed, any other seed, or the base")
            continue
        if usable != wanted:
            log.warning("node %s: no pieces for its seed %s yet; it assembles on %s", n, wanted, usable)
            report.fallbacks[str(n)] = {"wanted": wanted, "used": usable}
        node_seed[n] = usable
        placed.append(n)
    newcomers = placed
    if newcomers:
        gate_records = {sid: M.gates_to_records(pool.gates(sid)) for sid in {node_seed.get(n, base_id)
                                                                              for n in newcomers}}
        replies = _send(grid, M.GATES, {n: RecordDict({M.CONFIG: cfg_for(n),
                                                       M.GATE_ARRAYS: gate_records[node_seed.get(n, base_id)][0],
                                                       M.GATE_META: gate_records[node_seed.get(n, base_id)][1]})
                                        for n in newcomers}, settings.timeout, report, "gates")
        contents, gate_metrics = {}, {}
        for nid, rep in replies.items():
            gate_metrics[nid] = dict(rep.content[M.METRICS]) | {"seed": node_seed.get(nid, base_id)}
            arrays, meta = M.pieces_to_records(pool.get(list(rep.content[M.SHORTLIST]["ids"])))
            contents[nid] = RecordDict({M.CONFIG: cfg_for(nid), M.PIECES: arrays, M.PIECE_META: meta})
        replies = _send(grid, M.ASSEMBLE, contents, settings.timeout, report, "assemble")
        for nid, rep in sorted(replies.items()):
            report.newcomers.append({"user": str(rep.content[M.INFO]["user"])} | gate_metrics[nid]
                                    | dict(rep.content[M.METRICS]))
    report.seconds["assemble"] = time.perf_counter() - t2
    pool.close()
    (out / "metrics.json").write_text(json.dumps(asdict(report), indent=1))
    return report


def make_server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp with fixed settings (simulation), or reading them from the run config (`flwr run`)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_round(grid, settings or RunSettings.from_run_config(dict(context.run_config)))

    return server


app = make_server_app()
