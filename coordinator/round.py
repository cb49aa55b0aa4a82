"""One round's plumbing: what the phases share (the grid, the settings, the pool, what is known of each node),
how a message goes out and its replies come back, the guard every reply is read in, and the report.

The phases themselves (coordinator/server_app.py) are short functions over a `Round`.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from coordinator import replies as read
from coordinator.pool import PiecePool
from coordinator.settings import RunSettings
from coordinator.validation import RegisteredSeed, seed_shapes
from protocols import messages as M
from protocols.files import write_atomic
from protocols.seeds import materialize

log = logging.getLogger("bouquet")


@dataclass
class RoundReport:
    """What the coordinator keeps of a round. It knows nodes by their node id and, once a node has sent its
    profile, by its signing key id ("key-id" in a row): never by a name, a path or anything of a device's data."""
    sharers: dict[str, dict] = field(default_factory=dict)  # node id -> key id + share metrics
    newcomers: list[dict] = field(default_factory=list)  # per newcomer: node id, key id, seed + metrics
    refused: list[str] = field(default_factory=list)  # "<step>: node <id>: check '<check>': <why>", pieces too
    unanswered: list[str] = field(default_factory=list)  # "<step>: node <id>: <why>"
    skipped: list[str] = field(default_factory=list)  # pool blobs that were missing or corrupt when served
    pool_pieces: int = 0
    selections: dict[str, dict] = field(default_factory=dict)  # node id -> key id, chosen seed, distance, reason
    profiles: dict[str, dict] = field(default_factory=dict)  # node id -> key id + its profile's (ε, δ), as reported
    pool_by_seed: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, dict] = field(default_factory=dict)  # node id -> the seed it wanted, the one it used
    seconds: dict[str, float] = field(default_factory=dict)  # per phase
    error: str = ""  # what stopped the round, when something did


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
    node_key: dict[int, str] = field(default_factory=dict)  # node -> the signing key id its profile reported
    seed_refs: dict[str, ConfigRecord] = field(default_factory=dict)  # catalog seed id -> its name and hash

    def known_as(self, node: int) -> dict:
        """How the report names a node besides its id: the signing key id its profile reported, if any."""
        return {"key-id": self.node_key[node]} if self.node_key.get(node) else {}

    def content(self, node: int, **records) -> RecordDict:
        """A message's records: the participants' settings, and the catalog seed the node runs on if any."""
        seed = self.node_seed.get(node, self.base_id)
        extra = {M.SEED: self.seed_refs[seed]} if seed in self.seed_refs else {}
        return RecordDict({M.CONFIG: ConfigRecord(self.settings.participant_config()), **extra, **records})

    def send(self, message_type: str, contents: dict[int, RecordDict], step: str) -> dict[int, Message]:
        """Send one message per node, wait up to the timeout, return the good replies by node id, in the order
        of `contents` (never the order they arrived in, so that what follows is the same in every run).

        A reply belongs to the node its message went to (Flower's reply-to id); only that node, or the SuperLink
        answering with an error for a node it lost, may send it."""
        timeout = self.settings.timeout
        msgs = [Message(content, dst_node_id=nid, message_type=message_type, group_id=step)
                for nid, content in contents.items()]
        arrived = self.grid.send_and_receive(msgs, timeout=timeout)
        asked = {m.metadata.message_id: nid for m, nid in zip(msgs, contents)}  # ids are set when sent
        replies, failed = {}, set()
        for rep in arrived:
            nid, sender = asked.get(rep.metadata.reply_to_message_id), rep.metadata.src_node_id
            if nid is None or nid in replies or nid in failed or (
                    sender != nid and not (sender == SUPERLINK_NODE_ID and rep.has_error())):
                self.refuse(step, sender, "sender", "a reply to no message of this step, a reply from another "
                                                    "node than the one asked, or a second reply")
            elif rep.has_error():
                failed.add(nid)
                reason = str(rep.error.reason)[:read.MAX_TEXT]
                self.report.unanswered.append(f"{step}: node {nid}: error {rep.error.code}: {reason}")
                log.warning("%s: node %s answered with an error: %s", step, nid, reason)
            else:
                replies[nid] = rep
        for nid in sorted(set(contents) - set(replies) - failed):
            self.report.unanswered.append(f"{step}: node {nid}: no reply within {timeout:.0f} s")
            log.warning("%s: node %s did not answer within %.0f s", step, nid, timeout)
        return {nid: replies[nid] for nid in contents if nid in replies}

    def refuse(self, step: str, node: int, check: str, reason: str) -> None:
        self.report.refused.append(f"{step}: node {node}: check {check!r}: {reason}")
        log.warning("%s: node %s: refused by check %r: %s", step, node, check, reason)

    @contextmanager
    def guard(self, step: str, node: int):
        """Handle one node's reply: whatever in it fails, that node is refused and reported, no one else."""
        try:
            yield
        except read.BadReply as err:
            self.refuse(step, node, err.check, err.reason)
        except Exception as err:  # a reply that breaks what no check foresaw still stops only itself
            log.exception("%s: node %s: the reply broke its handling", step, node)
            self.refuse(step, node, "reply", f"{type(err).__name__}: {str(err)[:read.MAX_TEXT]}")

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


def write_metrics(path: Path, report: RoundReport) -> None:
    """Atomically: a reader never sees half a report."""
    write_atomic(path, json.dumps(asdict(report), indent=1, default=str).encode(), 0o644)
