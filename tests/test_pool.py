"""The piece pool: validation refuses each kind of bad piece by name, storage survives a restart,
and verify() finds corruption on disk."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.pool import PiecePool
from coordinator.validation import PieceRejected, RegisteredSeed, ValidationPolicy, seed_shapes
from protocols.pieces import Piece

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
SEED = RegisteredSeed("toy", "ab" * 32, {Q: (64, 64), K: (64, 32)})
KEY = Ed25519PrivateKey.generate()


def make_piece(position: str = Q, rank: int = 4, seed: int = 0, dtype=np.float32, key=KEY, **changes) -> Piece:
    d_in, d_out = SEED.shapes[position]
    rng = np.random.default_rng(seed)
    fields = dict(seed_id=SEED.seed_id, seed_hash=SEED.content_hash, position=position, rank=rank, alpha=8.0,
                  A=(rng.standard_normal((rank, d_in)) * 0.05).astype(dtype),
                  B=(rng.standard_normal((d_out, rank)) * 0.05).astype(dtype),
                  gate=rng.standard_normal(d_in).astype(dtype))
    return Piece(**(fields | changes)).signed(key)


def flip_tensor_byte(blob: bytes, offset: int = 5) -> bytes:
    """Flip one byte inside the tensor data (past the 8-byte length and the JSON header)."""
    start = 8 + int.from_bytes(blob[:8], "little")
    data = bytearray(blob)
    data[start + offset] ^= 0xFF
    return bytes(data)


@pytest.fixture
def pool(tmp_path):
    with PiecePool(tmp_path / "pool") as p:
        p.register_seed(SEED)
        yield p


def refused(pool: PiecePool, piece: Piece, check: str) -> PieceRejected:
    with pytest.raises(PieceRejected) as info:
        pool.add(piece)
    err = info.value
    assert err.check == check
    assert piece.position in str(err) and f"'{check}'" in str(err)
    assert pool.count() == 0 and not list(pool.blobs.glob("*/*"))
    return err


def test_valid_piece_round_trips(pool):
    piece = make_piece()
    pid = pool.add(piece)
    assert pid == piece.piece_id
    assert pool.add(piece) == pid and pool.count() == 1  # storing again is a no-op
    (back,) = pool.get([pid])
    assert back.piece_id == pid and back.signature_ok()
    for name in ("A", "B", "gate"):
        np.testing.assert_array_equal(getattr(back, name), getattr(piece, name))
    ((gid, position, rank, gate),) = pool.gates("toy")
    assert (gid, position, rank) == (pid, Q, 4)
    np.testing.assert_array_equal(gate, piece.gate)
    assert pool.positions("toy") == [Q] and pool.contributors() == {piece.contributor: 1}
    assert pool.bytes_stored() == len(piece.to_bytes())
    with pytest.raises(KeyError, match="f" * 64):
        pool.get(["f" * 64])


def test_flipped_byte_fails_signature(pool):
    tampered = Piece.from_bytes(flip_tensor_byte(make_piece().to_bytes()))
    refused(pool, tampered, "signature")


def test_each_check_refuses_by_name(pool):
    rng = np.random.default_rng(1)
    nan_b = make_piece().B.copy()
    nan_b[0, 0] = np.nan
    err = refused(pool, make_piece(B=nan_b), "finite")
    assert "B holds 1 NaN/inf" in str(err)
    refused(pool, make_piece(A=rng.standard_normal((4, 32)).astype(np.float32)), "shape")
    refused(pool, make_piece(B=np.full((64, 4), 1e3, np.float32)), "norm")
    refused(pool, make_piece(seed_hash="cd" * 32), "seed")
    refused(pool, make_piece(seed_id="other"), "seed")
    refused(pool, replace(make_piece(), position="model.layers.9.mlp.up_proj").signed(KEY), "position")
    refused(pool, make_piece(dtype=np.float64), "dtype")
    stranger = ValidationPolicy(allowed_contributors=frozenset({"0" * 16}))
    with pytest.raises(PieceRejected, match="'contributor'"):
        pool.add(make_piece(), stranger)


def test_add_many_keeps_the_good_ones(pool):
    good = [make_piece(seed=1), make_piece(K, seed=2)]
    bad = make_piece(seed_hash="00" * 32)
    accepted, rejected = pool.add_many([good[0], bad, good[1]])
    assert accepted == [p.piece_id for p in good]
    assert [r.check for r in rejected] == ["seed"] and bad.piece_id[:12] in rejected[0].piece


def test_reopen_and_verify(tmp_path):
    root = tmp_path / "pool"
    other = Ed25519PrivateKey.generate()
    pieces = [make_piece(seed=1), make_piece(K, seed=2), make_piece(rank=8, seed=3, key=other)]
    with PiecePool(root) as pool:
        pool.register_seed(SEED)
        ids, _ = pool.add_many(pieces)
    with PiecePool(root) as pool:
        assert pool.seeds() == [SEED]
        assert pool.count("toy") == 3 and sorted(p.piece_id for p in pool.get(ids)) == sorted(ids)
        assert sorted(pool.contributors().values()) == [1, 2]
        assert [g[0] for g in pool.gates("toy", rank=8)] == [ids[2]]
        assert pool.verify() == []
        with pytest.raises(ValueError, match="already registered"):
            pool.register_seed(replace(SEED, content_hash="ee" * 32))
        blob = pool._blob_path(ids[1])
        blob.write_bytes(flip_tensor_byte(blob.read_bytes()))
        (problem,) = pool.verify()
        assert ids[1] in problem
        (pool.blobs / "zz").mkdir()
        (pool.blobs / "zz" / "stray.safetensors").write_bytes(b"x")
        assert "1 orphan" in pool.verify()[-1]


def test_seed_shapes_of_tiny_model(tmp_path, monkeypatch):
    from protocols.seeds import materialize

    monkeypatch.setenv("BOUQUET_CACHE", str(tmp_path / "cache"))
    shapes = seed_shapes(materialize("tiny-random").path)
    assert shapes[Q] == (64, 64) and shapes[K] == (64, 32)
    assert "model.layers.1.mlp.down_proj" in shapes and "lm_head" not in shapes
