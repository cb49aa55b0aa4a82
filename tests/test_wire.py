"""Bad replies, tried as an attacker would, against the real ServerApp phases (run_round) over a fake Grid.

Each test runs a whole round with honest nodes beside the attackers and asserts that every bad reply is refused
with the node and the check named, that the honest nodes' round completes, that metrics.json is written, and that
every piece acknowledged as accepted is in the pool.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from numpy.lib import format as npy

from coordinator.pool import PiecePool
from coordinator.server_app import run_round
from coordinator.settings import RunSettings
from coordinator.validation import seed_shapes
from protocols import messages as M
from protocols.identity import key_id, public_bytes
from protocols.pieces import Piece
from protocols.seeds import TINY, materialize

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
IDENTITY_KEY = bytes.fromhex("01" + "00" * 31)  # a small-order point: (R = identity, S = 0) verifies anything
FORGED_SIGNATURE = IDENTITY_KEY + bytes(32)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages need a run id and a node id, which a real ServerApp process has."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


@pytest.fixture(scope="module")
def tiny():
    seed = materialize(TINY)
    return seed, seed_shapes(seed.path)


def piece(tiny, key, position=Q0, rng=0, *, seed_id=None, scale_a=1.0, scale_b=1.0, **changes) -> Piece:
    seed, shapes = tiny
    d_in, d_out = shapes[position]
    g = np.random.default_rng(rng)
    fields = dict(seed_id=seed_id or seed.seed_id, seed_hash=seed.content_hash, position=position, rank=4, alpha=8.0,
                  A=(g.standard_normal((4, d_in)) * 0.05 * scale_a).astype(np.float32),
                  B=(g.standard_normal((d_out, 4)) * 0.05 * scale_b).astype(np.float32),
                  gate=g.standard_normal(d_in).astype(np.float32))
    return Piece(**(fields | changes)).signed(key)


class Node:
    """An honest participant: reports a profile, shares two signed pieces, shortlists one piece per position."""

    def __init__(self, tiny, count=10, rng=0):
        self.tiny, self.count, self.rng = tiny, count, rng
        self.key = Ed25519PrivateKey.generate()
        self.key_id = key_id(public_bytes(self.key.public_key()))

    def profile(self, msg):
        return {M.PROFILE_RECORD: ConfigRecord({"count": self.count, "embedding": [0.01 * self.rng] * 384,
                                                "key-id": self.key_id})}

    def pieces(self):
        return [piece(self.tiny, self.key, Q0, self.rng), piece(self.tiny, self.key, V1, self.rng + 100)]

    def share(self, msg):
        arrays, meta = M.pieces_to_records(self.pieces())
        return {M.PIECES: arrays, M.PIECE_META: meta, M.METRICS: MetricRecord({"pieces-shared": 2})}

    def gates(self, msg):
        entries = M.gates_from_records(msg.content[M.GATE_ARRAYS], msg.content[M.GATE_META])
        first = {}
        for pid, pos, _, _ in entries:
            first.setdefault(pos, pid)
        return {M.SHORTLIST: ConfigRecord({"ids": list(first.values())}),
                M.METRICS: MetricRecord({"gates-received": len(entries)})}

    def assemble(self, msg):
        pieces = M.pieces_from_records(msg.content[M.PIECES], msg.content[M.PIECE_META])
        assert all(p.signature_ok() for p in pieces)
        return {M.METRICS: MetricRecord({"pieces-received": len(pieces)})}


class Attacker(Node):
    """An honest node except for one method, replaced by `bad` (which returns records, an Error or None)."""

    def __init__(self, tiny, step, bad, **kw):
        super().__init__(tiny, **kw)
        setattr(self, step, lambda msg: bad(self, msg))


class FakeGrid:
    """What the ServerApp needs of Flower's Grid: node ids, and one reply (or none) per message."""

    def __init__(self, nodes: dict[int, Node]):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        method = {M.STYLE: "style", M.PROFILE: "profile", M.SHARE: "share", M.GATES: "gates",
                  M.ASSEMBLE: "assemble"}
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do when they push
            answer = getattr(self.nodes[msg.metadata.dst_node_id], method[msg.metadata.message_type])(msg)
            if isinstance(answer, Error):
                out.append(Message(answer, reply_to=msg))
            elif answer is not None:
                out.append(Message(RecordDict(answer), reply_to=msg))
        return out


def settings(tmp_path, nodes, **kw) -> RunSettings:
    base = dict(seed_model=TINY, out_dir=str(tmp_path / "run"), sharer_selection="most-active", timeout=1.0,
                min_nodes=len(nodes))
    return RunSettings(**(base | kw))


def node_of(report, node: Node) -> str | None:
    """The node id the report names `node` by (sharers are keyed by node id, each row with its key id)."""
    return next((nid for nid, row in report.sharers.items() if row.get("key-id") == node.key_id), None)


def refusals(report, node: int) -> list[str]:
    return [line for line in report.refused if f"node {node}" in line]


def assert_round_complete(tmp_path, report, honest: list[Node]):
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["error"] == "" and metrics["refused"] == report.refused
    with PiecePool(tmp_path / "run" / "pool") as pool:
        stored = {p.piece_id for p in pool.get([g[0] for s in pool.seeds() for g in pool.gates(s.seed_id)])}
        for node in honest:  # nothing acknowledged is lost
            if node_of(report, node) is not None:
                assert report.sharers[node_of(report, node)]["accepted"] == 2
                assert {p.piece_id for p in node.pieces()} <= stored
        assert pool.verify() == []
    return metrics


def npy_bytes(shape, dtype="<f4") -> bytes:
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


# --- the profile phase --------------------------------------------------------------------------------------


PROFILE_ATTACKS = {
    "missing record": (lambda n, m: {M.METRICS: MetricRecord({"x": 1})}, "'record'"),
    "wrong record type": (lambda n, m: {M.PROFILE_RECORD: MetricRecord({"count": 3})}, "'record'"),
    "NaN profile": (lambda n, m: {M.PROFILE_RECORD: ConfigRecord({"count": 3, "embedding": [float("nan")] * 384})},
                    "'profile'"),
    "wrong-length profile": (lambda n, m: {M.PROFILE_RECORD: ConfigRecord({"count": 3, "embedding": [0.0] * 5})},
                             "'profile'"),
    "text count": (lambda n, m: {M.PROFILE_RECORD: ConfigRecord({"count": "many", "embedding": [0.0] * 384})},
                   "'record'"),
    "negative count": (lambda n, m: {M.PROFILE_RECORD: ConfigRecord({"count": -5, "embedding": [0.0] * 384})},
                       "'bounds'"),
}


def test_bad_profiles_are_refused_and_the_round_goes_on(tmp_path, tiny):
    honest = [Node(tiny, count=50, rng=i) for i in range(3)]
    nodes = {10 + i: n for i, n in enumerate(honest)}
    bad = {20 + i: Attacker(tiny, "profile", fn, rng=20 + i) for i, (fn, _) in enumerate(PROFILE_ATTACKS.values())}
    nodes |= bad
    nodes[30] = Attacker(tiny, "profile", lambda n, m: Error(code=1, reason="x" * 100_000), rng=30)
    nodes[31] = Attacker(tiny, "profile", lambda n, m: None, rng=31)
    report = run_round(FakeGrid(nodes), settings(tmp_path, nodes, sharers=3, newcomers=0))
    for (nid, _), (name, (_, check)) in zip(bad.items(), PROFILE_ATTACKS.items()):
        (line,) = refusals(report, nid)
        assert line.startswith(f"profile: node {nid}: check {check}"), (name, line)
    assert any("node 30: error" in u and len(u) < 5000 for u in report.unanswered)
    assert any("node 31: no reply" in u for u in report.unanswered)
    assert sorted(report.sharers) == ["10", "11", "12"] and report.pool_pieces == 6
    assert [report.sharers[str(10 + i)]["key-id"] for i in range(3)] == [n.key_id for n in honest]
    assert_round_complete(tmp_path, report, honest)


# --- the share phase ----------------------------------------------------------------------------------------


def share_with(pieces_fn):
    def bad(node, msg):
        arrays, meta = M.pieces_to_records(pieces_fn(node))
        return {M.PIECES: arrays, M.PIECE_META: meta, M.METRICS: MetricRecord({})}
    return bad


def raw_share(arrays: dict, meta):
    return lambda node, msg: {M.PIECES: ArrayRecord(arrays), M.PIECE_META: ConfigRecord({"meta": meta}),
                              M.METRICS: MetricRecord({})}


def petabyte_arrays(tiny):
    fake = Array(dtype="float32", shape=(2**48,), stype="numpy.ndarray", data=npy_bytes((2**48,)) + b"\0" * 16)
    return {"0.A": fake, "0.B": fake, "0.gate": fake}


def forged(node):
    """A piece under the identity key, 'signed' with R = identity, S = 0: it verifies under the weak key."""
    p = piece(node.tiny, node.key, Q0, 7)
    return [replace(p, public_key=IDENTITY_KEY, contributor=key_id(IDENTITY_KEY), signature=FORGED_SIGNATURE,
                    _cache={})]


def alpha_huge(node):
    return [piece(node.tiny, node.key, Q0, 8, alpha=1e300, B=np.zeros((64, 4), np.float32))]


def a_up_b_down(node):
    return [piece(node.tiny, node.key, Q0, 9, scale_a=1e6, scale_b=1e-6)]


def other_seed(node):
    return [piece(node.tiny, node.key, Q0, 10, seed_id="catalog:zappy")]


def someone_elses_key(node):
    return [piece(node.tiny, Ed25519PrivateKey.generate(), Q0, 11)]


def nan_piece(node):
    p = piece(node.tiny, node.key, Q0, 12)
    bad_a = p.A.copy()
    bad_a[0, 0] = np.nan
    return [piece(node.tiny, node.key, Q0, 12, A=bad_a)]


SHARE_ATTACKS = {  # name: (reply, the check named, the words of the reason)
    "missing pieces record": (lambda n, m: {M.METRICS: MetricRecord({})},
                              "'record'", "no 'pieces' record"),
    "wrong record types": (lambda n, m: {M.PIECES: ConfigRecord({"a": 1}), M.PIECE_META: ArrayRecord({}),
                                         M.METRICS: MetricRecord({})},
                           "'record'", "expected a ArrayRecord"),
    "meta is text": (raw_share({}, "not a list"), "'decode'", "not a list"),
    "undecodable arrays": (raw_share({k: Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=b"junk")
                                      for k in ("0.A", "0.B", "0.gate")}, ["{}"]), "'decode'", "header"),
    "petabyte header": (lambda n, m: raw_share(petabyte_arrays(n.tiny), ["{}"])(n, m), "'decode'",
                        "claims shape (281474976710656,)"),
    "weak key, forged signature": (share_with(forged), "'signature'", "small-order point"),
    "alpha 1e300, B = 0": (share_with(alpha_huge), "'norm'", "alpha/rank"),
    "A x 1e6, B / 1e6": (share_with(a_up_b_down), "'norm'", "A has Frobenius norm"),
    "NaN in A": (share_with(nan_piece), "'finite'", "A holds 1 NaN"),
    "a seed it was not asked to train on": (share_with(other_seed), "'seed'", "not registered"),
    "pieces signed by another key": (share_with(someone_elses_key), "'contributor'", "allowed contributors"),
}


def test_bad_shares_are_refused_and_honest_pieces_kept(tmp_path, tiny):
    honest = [Node(tiny, count=50, rng=i) for i in range(3)]
    nodes = {10 + i: n for i, n in enumerate(honest)}
    bad = {20 + i: Attacker(tiny, "share", fn, count=40, rng=20 + i) for i, (fn, *_) in
           enumerate(SHARE_ATTACKS.values())}
    nodes |= bad
    report = run_round(FakeGrid(nodes), settings(tmp_path, nodes, sharers=len(nodes), newcomers=0))
    for (nid, _), (name, (_, check, words)) in zip(bad.items(), SHARE_ATTACKS.items()):
        lines = refusals(report, nid)
        assert len(lines) == 1 and f"check {check}" in lines[0] and words in lines[0], (name, lines)
        assert lines[0].startswith(f"share: node {nid}")
    assert report.pool_pieces == 6  # the honest nodes' pieces, and nothing else
    assert_round_complete(tmp_path, report, honest)


def test_reply_bounds_and_the_contributor_quota(tmp_path, tiny):
    honest = Node(tiny, count=50, rng=0)
    greedy = Attacker(tiny, "share", share_with(lambda n: [piece(n.tiny, n.key, Q0, i) for i in range(5)]),
                      count=40, rng=1)
    heavy = Attacker(tiny, "share", share_with(lambda n: [piece(n.tiny, n.key, Q0, 1, A=np.zeros((4, 64),
                                                                                                np.float32))]),
                     count=45, rng=2)
    nodes = {1: honest, 2: greedy, 3: heavy}
    s = settings(tmp_path, nodes, sharers=3, newcomers=0, max_reply_pieces=3,
                 contributor_quota=2)
    report = run_round(FakeGrid(nodes), s)
    (line,) = refusals(report, 2)
    assert "check 'bounds'" in line and "max-reply-pieces 3" in line
    assert report.sharers["1"]["accepted"] == 2
    # the quota: a contributor with 2 pieces already gets no third, in a later round
    again = Attacker(tiny, "share", share_with(lambda n: honest.pieces() + [piece(tiny, honest.key, Q0, 77)]),
                     count=50, rng=0)
    again.key, again.key_id = honest.key, honest.key_id
    report = run_round(FakeGrid({1: again}), replace(s, sharers=1, min_nodes=1))
    (line,) = refusals(report, 1)
    assert "check 'quota'" in line and "already holds 2 pieces" in line
    assert report.sharers["1"] == {"key-id": honest.key_id, "accepted": 2, "refused": 1}
    # bytes: a reply over max-reply-bytes is refused before decoding
    report = run_round(FakeGrid({5: heavy}), replace(s, sharers=1, min_nodes=1, max_reply_bytes=100))
    (line,) = refusals(report, 5)
    assert "check 'bounds'" in line and "max-reply-bytes 100" in line
    assert_round_complete(tmp_path, report, [])


# --- the gates and assemble phases --------------------------------------------------------------------------


SHORTLIST_ATTACKS = {
    "ids the pool does not hold": (lambda n, m: {M.SHORTLIST: ConfigRecord({"ids": ["f" * 64]}),
                                                 M.METRICS: MetricRecord({})}, "'shortlist'", "did not serve"),
    "ids as text": (lambda n, m: {M.SHORTLIST: ConfigRecord({"ids": "all"}), M.METRICS: MetricRecord({})},
                    "'record'", "expected a list of texts"),
    "too many per position": (lambda n, m: {M.SHORTLIST: ConfigRecord({"ids": list(m.content[M.GATE_META]["ids"])}),
                                            M.METRICS: MetricRecord({})}, "'shortlist'", "more than shortlist = 1"),
    "no metrics": (lambda n, m: {M.SHORTLIST: ConfigRecord({"ids": []})}, "'record'", "no 'metrics' record"),
}


def test_bad_shortlists_and_assemblies_are_refused(tmp_path, tiny):
    sharers = [Node(tiny, count=50, rng=i) for i in range(3)]
    nodes = {10 + i: n for i, n in enumerate(sharers)}
    newcomer = Node(tiny, count=1, rng=5)
    duplicates = Attacker(tiny, "gates", lambda n, m: {M.SHORTLIST: ConfigRecord(
        {"ids": Node.gates(n, m)[M.SHORTLIST]["ids"] * 3}), M.METRICS: MetricRecord({})}, count=1, rng=6)
    no_metrics = Attacker(tiny, "assemble", lambda n, m: {M.SHORTLIST: ConfigRecord({"ids": []})}, count=1, rng=7)
    nodes |= {40: newcomer, 41: duplicates, 42: no_metrics}
    bad = {30 + i: Attacker(tiny, "gates", fn, count=1, rng=30 + i) for i, (fn, *_) in
           enumerate(SHORTLIST_ATTACKS.values())}
    nodes |= bad
    s = settings(tmp_path, nodes, sharers=3, newcomers=len(nodes) - 3, top_k=1, shortlist=1)
    report = run_round(FakeGrid(nodes), s)
    for (nid, _), (name, (_, check, words)) in zip(bad.items(), SHORTLIST_ATTACKS.items()):
        lines = refusals(report, nid)
        assert len(lines) == 1 and lines[0].startswith(f"gates: node {nid}: check {check}") and words in lines[0], \
            (name, lines)
    (line,) = refusals(report, 42)
    assert line.startswith("assemble: node 42: check 'record'") and "'metrics'" in line
    done = {row["node"]: row for row in report.newcomers}
    assert sorted(done) == [40, 41]  # duplicates removed, not refused
    assert done[40]["pieces-received"] == 2 and done[41]["pieces-received"] == 2
    assert [done[n]["key-id"] for n in (40, 41)] == [newcomer.key_id, duplicates.key_id]
    assert_round_complete(tmp_path, report, sharers)


def test_a_missing_or_corrupt_blob_is_skipped_and_reported(tmp_path, tiny):
    sharers = [Node(tiny, count=50, rng=i) for i in range(2)]
    with PiecePool(tmp_path / "run" / "pool") as pool:
        from coordinator.round import register_seed

        register_seed(pool, TINY)
        ids, _ = pool.add_many(sharers[0].pieces() + sharers[1].pieces())
        pool._blob_path(ids[0]).unlink()
        blob = pool._blob_path(ids[1])
        blob.write_bytes(blob.read_bytes()[:-7] + b"garbage")
    nodes = {1: Node(tiny, count=1, rng=5)}
    report = run_round(FakeGrid(nodes), settings(tmp_path, nodes, sharers=1, newcomers=1, phases="assemble"))
    assert any(ids[0] in line and "skipped" in line for line in report.skipped)
    assert report.newcomers and report.newcomers[0]["pieces-received"] >= 1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped"] == report.skipped


# --- the seed-choice phase, strays, and a phase that raises -------------------------------------------------


def test_seed_names_the_catalog_does_not_list(tmp_path, tiny):
    from conftest import tiny_catalog

    catalog = tiny_catalog(tmp_path / "catalog")

    def style(seed, ranking=("zappy", "formal")):
        return lambda n, m: {M.SELECTION: ConfigRecord({"seed": seed, "distance": 0.1, "reason": "r",
                                                        "ranking": list(ranking)}),
                             M.METRICS: MetricRecord({"seed": 7.0})}  # a metric never overwrites the row

    honest = [Attacker(tiny, "style", style("zappy"), count=50, rng=i) for i in range(2)]
    nodes = {1: honest[0], 2: honest[1],
             3: Attacker(tiny, "style", style("../../etc/passwd"), rng=3),
             4: Attacker(tiny, "style", style("", ranking=("zappy", "nope")), rng=4),
             5: Attacker(tiny, "style", lambda n, m: {M.SELECTION: ConfigRecord({"seed": 3})}, rng=5)}
    zappy_hash = next(e.content_hash for e in catalog.entries if e.name == "zappy")
    for n in honest:
        n.pieces = lambda n=n: [piece(tiny, n.key, Q0, n.rng, seed_id="catalog:zappy", seed_hash=zappy_hash)]
    report = run_round(FakeGrid(nodes), settings(tmp_path, nodes, sharers=2, newcomers=0,
                                                 catalog=str(catalog.folder)))
    for nid, check in ((3, "'seed'"), (4, "'seed'"), (5, "'record'")):
        (line,) = refusals(report, nid)
        assert line.startswith(f"style: node {nid}: check {check}"), line
    assert sorted(report.selections) == ["1", "2"]
    assert [report.selections[n]["key-id"] for n in ("1", "2")] == [n.key_id for n in honest]
    assert all(row["seed"] == "zappy" for row in report.selections.values())
    assert report.pool_by_seed.get("catalog:zappy") == 2  # stored in the pool of the seed each was asked for
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["error"] == ""


def test_a_stray_reply_and_a_phase_that_raises_still_write_metrics(tmp_path, tiny):
    class Broken(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            if messages and messages[0].metadata.message_type == M.SHARE:
                raise RuntimeError("the link went down")
            replies = super().send_and_receive(messages, timeout)
            return replies + replies[:1] + [Message(RecordDict({}), reply_to=replace_dst(messages[0], 99))]

    def replace_dst(msg, node):
        return Message(msg.content, dst_node_id=node, message_type=msg.metadata.message_type)

    nodes = {1: Node(tiny, count=50, rng=0), 2: Node(tiny, count=50, rng=1)}
    with pytest.raises(RuntimeError, match="link went down"):
        run_round(Broken(nodes), settings(tmp_path, nodes, sharers=2, newcomers=0))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["error"] == "RuntimeError: the link went down" and "profiles" in metrics["seconds"]
    assert any("node 1: check 'sender'" in line for line in metrics["refused"])  # the second reply
    assert any("node 99: check 'sender'" in line for line in metrics["refused"])  # a node not asked


def test_a_lost_node_is_reported_as_itself_and_a_reply_from_another_node_is_refused(tmp_path, tiny):
    """Flower's SuperLink answers for a node it lost, with an error from node id 1: the report names the lost
    node, not the SuperLink. A node answering a message sent to another is refused."""
    class Lossy(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            replies = super().send_and_receive(messages, timeout)
            if messages and messages[0].metadata.message_type == M.PROFILE:
                for rep in replies:
                    if rep.metadata.reply_to_message_id == messages[2].metadata.message_id:  # node 3: lost
                        rep.metadata.__dict__["_src_node_id"] = 1
                        rep.__dict__["_error"], rep.__dict__["_content"] = Error(code=0, reason="node lost"), None
                    if rep.metadata.reply_to_message_id == messages[3].metadata.message_id:  # node 4's, sent by 2
                        rep.metadata.__dict__["_src_node_id"] = 2
            return replies

    nodes = {n: Node(tiny, count=50, rng=n) for n in (1, 2, 3, 4)}
    report = run_round(Lossy(nodes), settings(tmp_path, nodes, sharers=2, newcomers=0))
    assert any(line.startswith("profile: node 3: error 0: node lost") for line in report.unanswered)
    assert any(line.startswith("profile: node 2: check 'sender'") for line in report.refused)
    assert any(line.startswith("profile: node 4: no reply") for line in report.unanswered)
    assert len(report.sharers) == 2 and not any("node 1" in line for line in report.refused + report.unanswered)
