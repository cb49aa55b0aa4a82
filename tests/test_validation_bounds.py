"""Poisoned pieces, weak keys, and `bouquet pool verify`, each tried as an attacker (or a crash) would.

`test_poisoned_pieces_accepted` is the measured figure: every poisoned piece of POISONS is offered to the pool
and to a newcomer; it prints "poisoned pieces accepted: 0 of N tried" (run with -s to see it).
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_pool import Q, SEED, make_piece
from test_pool import make_piece as make_base

from coordinator.pool import PiecePool
from coordinator.validation import PieceRejected
from protocols.identity import key_id, verify, weak_key_reason
from protocols.piece_bounds import PieceBounds, mixed_problem
from protocols.pieces import Piece
from simulation.cli import main as cli

P = 2**255 - 19
SMALL_ORDER = [  # the 8 small-order points, canonical encodings
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
]
NON_CANONICAL = [  # the same points written with y >= p, or with the sign bit set on x = 0
    (P + 1).to_bytes(32, "little").hex(), P.to_bytes(32, "little").hex(),
    "0100000000000000000000000000000000000000000000000000000000000080",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
]
IDENTITY = bytes.fromhex(SMALL_ORDER[0])
FORGED = IDENTITY + bytes(32)  # R = identity, S = 0


def test_weak_keys_are_refused():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    # the attack is real: the library alone accepts the forged signature on any message under the identity key
    Ed25519PublicKey.from_public_bytes(IDENTITY).verify(FORGED, b"any content at all")
    for hexkey in SMALL_ORDER + NON_CANONICAL:
        assert weak_key_reason(bytes.fromhex(hexkey)), hexkey
        assert not verify(bytes.fromhex(hexkey), FORGED, b"any content at all")
    good = Ed25519PrivateKey.generate()
    from protocols.identity import public_bytes
    assert weak_key_reason(public_bytes(good.public_key())) is None
    assert verify(public_bytes(good.public_key()), good.sign(b"m"), b"m")


def forge(piece: Piece) -> Piece:
    return replace(piece, public_key=IDENTITY, contributor=key_id(IDENTITY), signature=FORGED, _cache={})


def poisons(**where) -> dict[str, tuple[Piece, str]]:
    """Each poisoned piece, and the check that must refuse it; `where`: seed_id and seed_hash to use."""
    def make_piece(**kw):
        return make_base(**(where | kw))

    base = make_piece()
    nan_a = base.A.copy()
    nan_a[1, 2] = np.nan
    return {
        "alpha 1e300, B = 0": (make_piece(alpha=1e300, B=np.zeros((64, 4), np.float32)), "norm"),
        "A x 1e6, B / 1e6": (make_piece(A=base.A * 1e6, B=base.B / 1e6), "norm"),
        "A x 1e3, B / 1e3 in float16": (make_piece(dtype=np.float16, A=(base.A * 1e3).astype(np.float16),
                                                   B=(base.B / 1e3).astype(np.float16)), "norm"),
        "B x 1e4, A / 1e4": (make_piece(A=base.A / 1e4, B=base.B * 1e4), "norm"),
        "alpha 1e6": (make_piece(alpha=1e6), "norm"),
        "inf alpha": (make_piece(alpha=float("inf")), "shape"),
        "negative alpha": (make_piece(alpha=-8.0), "shape"),
        "NaN in A": (make_piece(A=nan_a), "finite"),
        "overflow in float32": (make_piece(A=np.full((4, 64), 3e38, np.float32)), "norm"),
        "huge gate": (make_piece(gate=np.full(64, 1e4, np.float32)), "norm"),
        "weak key, forged signature": (forge(make_piece(seed=5)), "signature"),
        "tampered after signing": (replace(make_piece(), A=base.A + 1e-3, _cache={}), "signature"),
    }


def test_poisoned_pieces_accepted(tmp_path, tiny_seed):
    """Every poison is refused by the pool by name, and by a newcomer's own checks before mixing."""
    from participants.newcomer import refused_pieces

    tried = poisons()
    accepted = 0
    with PiecePool(tmp_path / "pool") as pool:
        pool.register_seed(SEED)
        for name, (piece, check) in tried.items():
            with pytest.raises(PieceRejected) as info:
                pool.add(piece)
            assert info.value.check == check, (name, str(info.value))
            assert piece.position in str(info.value)
        accepted += pool.count()
    # the newcomer: same poisons, on the tiny seed's own shapes and hash
    d = tiny_seed.descriptor
    on_tiny = [p for p, _ in poisons(seed_id=d.seed_id, seed_hash=d.content_hash).values()]
    bad = refused_pieces(on_tiny, tiny_seed)
    assert refused_pieces([make_piece(seed_id=d.seed_id, seed_hash=d.content_hash)], tiny_seed) == []
    accepted += len(tried) - len(bad)
    print(f"\npoisoned pieces accepted: {accepted} of {2 * len(tried)} tried (pool and newcomer)")
    assert accepted == 0


def test_newcomer_refuses_before_mixing_and_checks_the_mix(tiny_seed, make_records):
    from participants.newcomer import assemble_pieces
    from protocols.settings import ParticipantSettings

    d = tiny_seed.descriptor
    good = [make_piece(seed=i, seed_id=d.seed_id, seed_hash=d.content_hash) for i in range(2)]
    poisoned = make_piece(seed=9, seed_id=d.seed_id, seed_hash=d.content_hash, alpha=1e300,
                          B=np.zeros((64, 4), np.float32))
    s = ParticipantSettings(seed_model="tiny-random", top_k=2, shortlist=2)
    with pytest.raises(ValueError, match=r"alpha/rank = inf is above 64"):
        assemble_pieces(tiny_seed, make_records("u", "ZAP!", 4), good + [poisoned], s)
    result = assemble_pieces(tiny_seed, make_records("u", "ZAP!", 4), good, s)
    assert mixed_problem(result.weights, PieceBounds()) is None
    # two pieces each within bounds whose mix is not: the mixed result is checked before saving
    bounds = PieceBounds(max_delta_norm=1e-6)
    assert "update B A" in mixed_problem(result.weights, bounds)
    nan = {Q: (np.full((4, 64), np.nan, np.float32), np.zeros((64, 4), np.float32))}
    assert "NaN" in mixed_problem(nan, PieceBounds())


def test_quota_and_expected_seed(tmp_path):
    from coordinator.validation import ValidationPolicy

    with PiecePool(tmp_path / "pool") as pool:
        pool.register_seed(SEED)
        pool.register_seed(replace(SEED, seed_id="other"))
        quota = ValidationPolicy(contributor_quota=2)
        ok, refused = pool.add_many([make_piece(seed=i) for i in range(3)], quota)
        assert len(ok) == 2 and [r.check for r in refused] == ["quota"]
        with pytest.raises(PieceRejected, match="not the seed 'other' the sender was asked to train on"):
            pool.add(make_piece(seed=7), ValidationPolicy(expected_seed="other"))


# --- bouquet pool verify ------------------------------------------------------------------------------------


@pytest.fixture
def filled(tmp_path):
    root = tmp_path / "pool"
    with PiecePool(root) as pool:
        pool.register_seed(SEED)
        ids, _ = pool.add_many([make_piece(seed=1), make_piece(seed=2), make_piece(seed=3)])
    return root, ids


def test_verify_compares_index_rows_and_rechecks_bounds(filled, capsys):
    root, ids = filled
    assert cli(["pool", "verify", str(root)]) == 0
    db = sqlite3.connect(root / "index.sqlite")
    db.execute("UPDATE pieces SET rank = 8, contributor = 'someone' WHERE piece_id = ?", (ids[0],))
    db.commit()
    db.close()
    with PiecePool(root) as pool:
        # a blob over the bounds that a lax writer stored: verify's own bounds catch it
        loose = make_piece(seed=4, A=make_piece().A * 1e6, B=make_piece().B / 1e6)
        pool._write_blob(loose.piece_id, loose.to_bytes())
        pool._db.execute("INSERT INTO pieces VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (loose.piece_id, "toy", Q, 4, 8.0, loose.contributor, 64, 64, "float32", 0.1, 0.0, 1))
        problems = pool.verify()
    assert any(ids[0] in p and "rank 4 (index: 8)" in p and "contributor" in p for p in problems)
    assert any(loose.piece_id in p and "A has Frobenius norm" in p for p in problems)
    assert cli(["pool", "verify", str(root)]) == 1


def test_verify_lists_and_repairs_crash_leftovers_but_not_a_live_writer(filled, capsys):
    root, ids = filled
    leftover = root / "blobs" / ids[0][:2] / f".{ids[0]}.abc123.tmp"
    leftover.write_bytes(b"half a blob")
    assert cli(["pool", "verify", str(root)]) == 1
    assert "1 temp file(s) left by a crashed writer" in capsys.readouterr().out
    assert cli(["pool", "verify", str(root), "--repair"]) == 0
    assert f"removed {leftover}" in capsys.readouterr().out and not leftover.exists()
    # a live writer between its blob's rename and its row holds the writers' lock: verify waits for it and
    # then sees the row, so the blob is never called an orphan
    import threading

    with PiecePool(root) as writer, PiecePool(root) as checker:
        piece = make_piece(seed=9)
        results = []
        with writer._writing():
            writer._write_blob(piece.piece_id, piece.to_bytes())  # in flight: blob there, no row yet
            thread = threading.Thread(target=lambda: results.append(checker.verify()))
            thread.start()
            thread.join(0.5)
            assert thread.is_alive()  # verify waits for the writer
            writer._db.execute("INSERT INTO pieces VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (piece.piece_id, "toy", Q, 4, 8.0, piece.contributor, 64, 64, "float32", 0.1, 0.0, 1))
        thread.join(30)
    assert results == [[]]


def test_verify_gives_one_line_for_a_corrupt_index_or_an_unwritable_folder(filled, capsys, monkeypatch):
    root, _ = filled
    (root / "index.sqlite-wal").unlink(missing_ok=True)
    (root / "index.sqlite").write_bytes(b"this is not a database" * 100)
    assert cli(["pool", "verify", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be read as a pool index" in err and "Traceback" not in err

    def read_only(self, root):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(PiecePool, "__init__", read_only)
    assert cli(["pool", "verify", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "readonly" in err and "write access" in err

    def no_permission(self, root):
        raise PermissionError(13, "Permission denied", str(root / ".lock"))

    monkeypatch.setattr(PiecePool, "__init__", no_permission)
    assert cli(["pool", "verify", str(root)]) == 2
    assert "Permission denied" in capsys.readouterr().err


def test_a_full_disk_during_ingestion_keeps_the_pool_consistent(tmp_path, monkeypatch):
    import errno

    with PiecePool(tmp_path / "pool") as pool:
        pool.register_seed(SEED)
        real, calls = PiecePool._write_blob, []

        def fills_up(self, piece_id, data):
            calls.append(piece_id)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, piece_id, data)

        monkeypatch.setattr(PiecePool, "_write_blob", fills_up)
        pieces = [make_piece(seed=i) for i in range(3)]
        accepted, refused = pool.add_many(pieces)
        assert accepted == [pieces[0].piece_id, pieces[2].piece_id]
        assert [r.check for r in refused] == ["store"] and "No space left" in refused[0].reason
        assert pool.count() == 2 and pool.verify() == []  # every acknowledged piece is there, nothing half-written
