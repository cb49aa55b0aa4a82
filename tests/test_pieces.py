import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocols import messages as M
from protocols.identity import key_id, load_or_create_key, public_bytes
from protocols.pieces import Piece, PieceFormatError, lora_delta_norm


def piece(rng, rank=4, d_in=8, d_out=6, dtype=np.float32):
    return Piece("seed", "ab" * 32, "model.layers.0.self_attn.q_proj", rank, 8.0,
                 rng.standard_normal((rank, d_in)).astype(dtype), rng.standard_normal((d_out, rank)).astype(dtype),
                 rng.standard_normal(d_in).astype(dtype))


def test_signed_piece_verifies_and_survives_bytes_and_records():
    rng = np.random.default_rng(0)
    key = Ed25519PrivateKey.generate()
    p = piece(rng).signed(key)
    assert p.signature_ok() and p.contributor == key_id(public_bytes(key.public_key()))
    back = Piece.from_bytes(p.to_bytes())
    assert back.piece_id == p.piece_id and back.signature_ok()
    arrays, meta = M.pieces_to_records([p, piece(rng).signed(key)])
    again = M.pieces_from_records(arrays, meta)
    assert [q.piece_id for q in again][0] == p.piece_id and all(q.signature_ok() for q in again)


def test_any_change_breaks_the_signature():
    rng = np.random.default_rng(1)
    p = piece(rng).signed(Ed25519PrivateKey.generate())
    B = p.B.copy()
    B[0, 0] += 1e-3
    from dataclasses import replace
    assert not replace(p, B=B, _cache={}).signature_ok()
    assert not replace(p, position="model.layers.1.self_attn.q_proj", _cache={}).signature_ok()
    other = Ed25519PrivateKey.generate()
    assert not replace(p, public_key=public_bytes(other.public_key()), _cache={}).signature_ok()


def test_float16_pieces_travel_and_bfloat16_like_types_are_refused_on_the_wire():
    rng = np.random.default_rng(2)
    p = piece(rng, dtype=np.float16).signed(Ed25519PrivateKey.generate())
    arrays, meta = M.pieces_to_records([p])
    assert M.pieces_from_records(arrays, meta)[0].A.dtype == np.float16
    with pytest.raises(TypeError, match="float32 or float16"):
        M.pieces_to_records([piece(rng, dtype=np.float64)])


def test_garbage_bytes_raise_a_format_error():
    with pytest.raises(PieceFormatError):
        Piece.from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")


def test_delta_norm_matches_the_dense_product():
    p = piece(np.random.default_rng(3))
    dense = p.scaling * p.B.astype(np.float64) @ p.A.astype(np.float64)
    assert lora_delta_norm(p) == pytest.approx(np.linalg.norm(dense), rel=1e-6)


def test_device_key_is_created_once_and_kept(tmp_path):
    k1 = load_or_create_key(tmp_path / "key.pem")
    k2 = load_or_create_key(tmp_path / "key.pem")
    assert public_bytes(k1.public_key()) == public_bytes(k2.public_key())
    assert (tmp_path / "key.pem").stat().st_mode & 0o077 == 0
