"""The Flower ServerApp: one bouquet round, from profiles to assembled adapters.

    profiles  -> choose sharers  -> sharers train, cut, sign, share  -> pool validates and stores
    newcomers: gates of the pool -> their shortlist -> those pieces  -> assembled adapter + metrics

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
from protocols.seeds import materialize

log = logging.getLogger("bouquet")


@dataclass
class RoundReport:
    sharers: dict[str, dict] = field(default_factory=dict)  # user -> share metrics
    newcomers: list[dict] = field(default_factory=list)  # per newcomer: user + metrics
    refused: list[str] = field(default_factory=list)  # reasons the pool gave
    unanswered: list[str] = field(default_factory=list)  # "<step>: node <id>: <why>"
    pool_pieces: int = 0
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


def run_round(grid: Grid, settings: RunSettings) -> RoundReport:
    report = RoundReport()
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ConfigRecord(settings.participant_config())
    t0 = time.perf_counter()

    seed = materialize(settings.seed)
    pool = PiecePool(out / "pool")
    pool.register_seed(RegisteredSeed(seed.seed_id, seed.content_hash, seed_shapes(seed.path)))

    wanted = settings.min_nodes or settings.num_sharers + settings.num_newcomers
    nodes = wait_for_nodes(grid, wanted, settings.timeout)
    log.info("%d nodes connected", len(nodes))

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
    replies = _send(grid, M.SHARE, {n: RecordDict({M.CONFIG: cfg}) for n in sharers}, settings.timeout, report,
                    "share")
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
    report.pool_pieces = pool.count(seed.seed_id)
    report.seconds["share"] = time.perf_counter() - t1
    log.info("pool holds %d pieces for %s (%d refused)", report.pool_pieces, seed.seed_id, len(report.refused))

    # 3. newcomers: gates first, then only the pieces they asked for
    t2 = time.perf_counter()
    if newcomers and report.pool_pieces:
        gate_arrays, gate_meta = M.gates_to_records(pool.gates(seed.seed_id))
        replies = _send(grid, M.GATES, {n: RecordDict({M.CONFIG: cfg, M.GATE_ARRAYS: gate_arrays,
                                                       M.GATE_META: gate_meta}) for n in newcomers},
                        settings.timeout, report, "gates")
        contents, gate_metrics = {}, {}
        for nid, rep in replies.items():
            gate_metrics[nid] = dict(rep.content[M.METRICS])
            arrays, meta = M.pieces_to_records(pool.get(list(rep.content[M.SHORTLIST]["ids"])))
            contents[nid] = RecordDict({M.CONFIG: cfg, M.PIECES: arrays, M.PIECE_META: meta})
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
