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

Every reply is read inside its own guard (`Round.guard`), through coordinator.replies' typed readers: a reply
that is missing a record, has one of the wrong type, does not decode, or breaks a bound (RunSettings holds them
all) is refused with the node and the check named, and the round goes on for the others. `metrics.json` is
written whatever happens, with the error when a phase raised.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter, defaultdict
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from coordinator import replies as read
from coordinator.pool import PiecePool
from coordinator.round import Round, RoundReport, register_seed, wait_for_nodes, write_metrics
from coordinator.seed_fallback import usable_seed
from coordinator.settings import RunSettings
from coordinator.sharers import Profile, select_sharers
from coordinator.validation import ValidationPolicy
from protocols import messages as M
from protocols.catalog import Catalog, load_catalog
from protocols.pieces import PieceFormatError
from protocols.seeds import materialize

log = logging.getLogger("bouquet")


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
        with r.guard("style", nid):
            sel = read.record(rep, M.SELECTION, ConfigRecord)
            name = read.text(sel, "seed", 256)
            ranking = read.strings(sel, "ranking", len(ids)) if "ranking" in sel else []
            unknown = [n for n in [name, *ranking] if n and n not in ids]
            if unknown:
                raise read.BadReply("seed", f"seed names the catalog does not list: {unknown[:3]}")
            row = {"seed": name or "base", "distance": read.number(sel, "distance", low=0, infinite=True),
                   "reason": read.text(sel, "reason")}
            row = row | read.metrics(rep, M.METRICS) | row  # a metric never overwrites what the report says
            if name:
                r.node_seed[nid] = ids[name]
            r.preferences[nid] = [ids[n] for n in ranking]
            r.report.selections[str(nid)] = row


def choose_participants(r: Round) -> tuple[list[int], list[int]]:
    """Profiles in, sharers and newcomers out; nodes ordered by key id so that a rerun chooses the same."""
    replies = r.send(M.PROFILE, {n: r.content(n) for n in r.nodes}, "profile")
    profiles = []
    for nid, rep in replies.items():
        with r.guard("profile", nid):
            rec = read.record(rep, M.PROFILE_RECORD, ConfigRecord)
            profile = Profile(nid, int(read.number(rec, "count", whole=True, low=0, high=2**53)),
                              read.vector(rec, "embedding", r.settings.profile_dim),
                              read.text(rec, "key-id", 64, required=False))
            privacy = read.metrics(rep, M.METRICS) if M.METRICS in rep.content else {}
            profiles.append(profile)
            r.node_key[nid] = profile.key_id
            if privacy:
                r.report.profiles[str(nid)] = r.known_as(nid) | privacy
    for nid, row in r.report.selections.items():  # the seed choice came before any key id: name it now
        known = r.known_as(int(nid))
        r.report.selections[nid] = known | row | known
    s = r.settings
    if s.phases == "assemble":  # no sharing: the newcomers are nodes the pool holds no pieces of
        sharers, held = [], set(r.pool.contributors())
        profiles = [p for p in profiles if p.key_id not in held]
    else:
        sharers = select_sharers(profiles, s.sharers, s.sharer_selection, rng_seed=s.rng_seed)
    rest = [p.node_id for p in sorted(profiles, key=lambda p: p.order) if p.node_id not in sharers]
    wanted = 0 if s.phases == "share" else min(s.newcomers, len(rest))
    newcomers = random.Random(s.rng_seed).sample(rest, wanted)
    log.info("sharers: %s; newcomers: %s", sharers, newcomers)
    return sharers, newcomers


def collect_shares(r: Round, sharers: list[int]) -> None:
    """Sharers train and share; the pool validates every piece; one bad reply never stops the others."""
    replies = r.send(M.SHARE, {n: r.content(n) for n in sharers}, "share")
    for nid, rep in replies.items():
        with r.guard("share", nid):
            pieces = read_pieces(r.settings, rep)
            metrics = read.metrics(rep, M.METRICS)  # all reading done: nothing below fails after pieces are stored
            accepted, refused = r.pool.add_many(pieces, share_policy(r, nid))
            r.report.refused.extend(f"share: node {nid}: {err}" for err in refused)
            known = r.known_as(nid)
            r.report.sharers[str(nid)] = known | metrics | {"accepted": len(accepted), "refused": len(refused)} | known
    r.report.pool_by_seed = {seed.seed_id: r.pool.count(seed.seed_id) for seed in r.pool.seeds()}
    r.report.pool_pieces = sum(r.report.pool_by_seed.values())
    log.info("pool holds %s pieces per seed (%d refused)", r.report.pool_by_seed, len(r.report.refused))


def read_pieces(s: RunSettings, rep: Message) -> list:
    """A sharer's pieces, after the reply's size bounds: bytes and pieces are counted before anything decodes."""
    arrays = read.record(rep, M.PIECES, ArrayRecord)
    meta = read.record(rep, M.PIECE_META, ConfigRecord)
    size = arrays.count_bytes()
    if size > s.max_reply_bytes:
        raise read.BadReply("bounds", f"the reply carries {size} bytes of arrays, above max-reply-bytes "
                                      f"{s.max_reply_bytes}")
    count = len(meta["meta"]) if "meta" in meta and isinstance(meta["meta"], list) else 0
    if count > s.max_reply_pieces or len(arrays) > 3 * s.max_reply_pieces:
        raise read.BadReply("bounds", f"the reply carries {count} pieces ({len(arrays)} arrays), above "
                                      f"max-reply-pieces {s.max_reply_pieces}")
    try:
        return M.pieces_from_records(arrays, meta)
    except PieceFormatError as err:
        raise read.BadReply("decode", str(err)) from None


def share_policy(r: Round, node: int) -> ValidationPolicy:
    """What the pool holds this node's pieces to: the run's bounds and quota, the seed it was asked to train
    on, and the signing key its profile reported (when it reported one)."""
    key = r.node_key.get(node)
    return ValidationPolicy(bounds=r.settings.piece_bounds(), contributor_quota=r.settings.contributor_quota,
                            expected_seed=r.node_seed.get(node, r.base_id),
                            allowed_contributors=frozenset({key}) if key else None)


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
    served = {seed: serve_gates(r.pool.gates(seed, skipped=r.report.skipped), r.settings.max_gates_served)
              for seed in {r.node_seed[n] for n in newcomers}}
    gate_records = {seed: M.gates_to_records(entries) for seed, entries in served.items()}
    replies = r.send(M.GATES, {n: r.content(n, **dict(zip((M.GATE_ARRAYS, M.GATE_META),
                                                            gate_records[r.node_seed[n]])))
                               for n in newcomers}, "gates")
    shortlists = {}
    for nid, rep in replies.items():
        with r.guard("gates", nid):
            positions = {pid: position for pid, position, *_ in served[r.node_seed[nid]]}
            ids = checked_shortlist(read.record(rep, M.SHORTLIST, ConfigRecord), positions, r.settings.shortlist)
            row = {"node": nid, **r.known_as(nid), "seed": r.node_seed[nid]}
            row = row | read.metrics(rep, M.METRICS) | row
            shortlists[nid] = ids
            r.report.newcomers.append(row)
    return shortlists


def serve_gates(entries: list, limit: int) -> list:
    """At most `limit` gates: all of them, or the same number per position (the pool's order: by piece id)."""
    if len(entries) <= limit:
        return entries
    by_position = defaultdict(list)
    for entry in entries:
        by_position[entry[1]].append(entry)
    each = max(1, limit // len(by_position))
    log.warning("serving %d of %d gates (%d per position, max-gates-served %d)", min(limit, each * len(by_position)),
                len(entries), each, limit)
    return [e for group in by_position.values() for e in group[:each]][:limit]


def checked_shortlist(rec: ConfigRecord, positions: dict[str, str], per_position: int) -> list[str]:
    """The shortlisted ids, duplicates removed: each one served to this newcomer, at most `per_position` at a
    position."""
    ids = list(dict.fromkeys(read.strings(rec, "ids", max(1, len(positions)) * per_position * 4)))
    unknown = [pid for pid in ids if pid not in positions]
    if unknown:
        raise read.BadReply("shortlist", f"{len(unknown)} ids the pool did not serve for this seed, e.g. "
                                         f"{unknown[0][:16]!r}")
    over = sorted(pos for pos, n in Counter(positions[pid] for pid in ids).items() if n > per_position)
    if over:
        raise read.BadReply("shortlist", f"more than shortlist = {per_position} ids at {len(over)} positions, e.g. "
                                         f"{over[0]}")
    return ids


def collect_assemblies(r: Round, shortlists: dict[int, list[str]]) -> None:
    """Phase 2: each newcomer gets only the pieces it asked for, assembles, and reports metrics."""
    contents = {}
    for nid, ids in shortlists.items():
        with r.guard("assemble", nid):  # a piece withdrawn since the shortlist: this newcomer only
            arrays, meta = M.pieces_to_records(r.pool.get(ids, skipped=r.report.skipped))
            contents[nid] = r.content(nid, **{M.PIECES: arrays, M.PIECE_META: meta})
    replies = r.send(M.ASSEMBLE, contents, "assemble")
    rows = {row["node"]: row for row in r.report.newcomers}
    done = []
    for nid in shortlists:
        if nid in replies:
            with r.guard("assemble", nid):
                known = {k: rows[nid][k] for k in ("node", "key-id", "seed") if k in rows[nid]}
                done.append(rows[nid] | read.metrics(replies[nid], M.METRICS) | known)
    r.report.newcomers = done


def run_phases(r: Round) -> None:
    settings = r.settings
    with r.phase("connect"):
        r.nodes = wait_for_nodes(r.grid, settings.min_nodes or settings.sharers + settings.newcomers,
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


def run_round(grid: Grid, settings: RunSettings) -> RoundReport:
    """One round; metrics.json is written whatever happens, with the error when a phase raised (which is then
    raised again, so that the run fails visibly)."""
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = RoundReport()
    try:
        with PiecePool(out / "pool") as pool:
            run_phases(Round(grid, settings, pool, register_seed(pool, settings.seed_model), report))
    except BaseException as err:
        report.error = f"{type(err).__name__}: {err}"
        log.error("the round stopped: %s; metrics.json has what is known", report.error)
        raise
    finally:
        write_metrics(out / "metrics.json", report)
    return report


def make_server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp with fixed settings (simulation), or reading them from the run config (`flwr run`)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_round(grid, settings or RunSettings.from_run_config(dict(context.run_config)))

    return server


app = make_server_app()
