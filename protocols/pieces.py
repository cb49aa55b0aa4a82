"""The piece: one LoRA pair (A, B) at one position of one seed model, with its gate.

A piece is the unit that sharers contribute and newcomers assemble from. It is content
addressed: its id is the sha256 of a canonical encoding of its metadata and tensors, and the
contributor signs that digest with Ed25519. On disk and on the wire it is a safetensors blob
(tensors "A", "B", "gate"; metadata as strings).

Shapes, for a linear layer y = W x with W of shape (d_out, d_in):
    A: (rank, d_in)    B: (d_out, rank)    gate: (d_in,)
and the LoRA update is (alpha / rank) * B @ A.

A piece trained with DP-SGD (participants.dp_sgd) carries the (ε, δ) of its sharer's whole share in its signed
metadata ("dp_epsilon", "dp_delta"); a piece without them makes no formal privacy claim.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from protocols.identity import key_id, public_bytes, verify

FORMAT = "bouquet-piece-v1"
WIRE_DTYPES = (np.dtype("float32"), np.dtype("float16"))  # Flower records reject bfloat16
TENSORS = ("A", "B", "gate")
META_FIELDS = ("seed_id", "seed_hash", "position", "rank", "alpha", "contributor")


class PieceFormatError(ValueError):
    """Bytes that do not decode to a piece."""


@dataclass(frozen=True)
class Piece:
    seed_id: str
    seed_hash: str
    position: str  # module name in the seed, e.g. "model.layers.12.self_attn.q_proj"
    rank: int
    alpha: float
    A: np.ndarray
    B: np.ndarray
    gate: np.ndarray
    dp_epsilon: float | None = None  # DP-SGD's (ε, δ) for the share this piece came in; None: trained without
    dp_delta: float | None = None
    contributor: str = ""  # key id of the signer (see protocols.identity.key_id)
    public_key: bytes = b""
    signature: bytes = b""
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def meta(self) -> dict[str, str]:
        meta = {"seed_id": self.seed_id, "seed_hash": self.seed_hash, "position": self.position,
                "rank": str(int(self.rank)), "alpha": repr(float(self.alpha)), "contributor": self.contributor}
        if self.dp_epsilon is not None:  # only when set, so that a piece without DP keeps the digest it had
            meta |= {"dp_epsilon": repr(float(self.dp_epsilon)), "dp_delta": repr(float(self.dp_delta))}
        return meta

    def digest(self) -> bytes:
        """sha256 over the canonical encoding: metadata as sorted JSON, then each tensor's
        name, dtype, shape and little-endian C-order bytes."""
        if "digest" not in self._cache:
            h = hashlib.sha256()
            h.update(FORMAT.encode() + b"\n")
            h.update(json.dumps(self.meta(), sort_keys=True, separators=(",", ":")).encode())
            for name in TENSORS:
                arr = np.ascontiguousarray(getattr(self, name))
                arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
                h.update(f"\n{name}:{arr.dtype.str}:{list(arr.shape)}\n".encode())
                h.update(arr.tobytes())
            self._cache["digest"] = h.digest()
        return self._cache["digest"]

    @property
    def piece_id(self) -> str:
        return self.digest().hex()

    def signed(self, private_key) -> "Piece":
        """A copy signed by `private_key` (an Ed25519PrivateKey); sets contributor and key."""
        pub = public_bytes(private_key.public_key())
        unsigned = replace(self, contributor=key_id(pub), public_key=pub, signature=b"", _cache={})
        return replace(unsigned, signature=private_key.sign(unsigned.digest()), _cache={})

    def signature_ok(self) -> bool:
        """The signature verifies against the carried key, and the key matches the contributor id."""
        if not self.signature or not self.public_key or key_id(self.public_key) != self.contributor:
            return False
        return verify(self.public_key, self.signature, self.digest())

    def to_bytes(self) -> bytes:
        meta = self.meta() | {"format": FORMAT, "public_key": self.public_key.hex(),
                              "signature": self.signature.hex()}
        return st_save({name: np.ascontiguousarray(getattr(self, name)) for name in TENSORS}, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Piece":
        try:
            tensors = st_load(data)
            meta = _read_metadata(data)
        except Exception as err:  # safetensors raises several types on corrupt input
            raise PieceFormatError(f"not a safetensors piece: {err}") from None
        return cls.from_parts(meta, tensors)

    @classmethod
    def from_parts(cls, meta: dict[str, str], tensors: dict[str, np.ndarray]) -> "Piece":
        if meta.get("format", FORMAT) != FORMAT:
            raise PieceFormatError(f"unknown piece format {meta.get('format')!r}, expected {FORMAT}")
        missing = [k for k in META_FIELDS if k not in meta] + [t for t in TENSORS if t not in tensors]
        if missing:
            raise PieceFormatError(f"piece lacks {missing}")
        try:
            return cls(seed_id=meta["seed_id"], seed_hash=meta["seed_hash"], position=meta["position"],
                       rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                       A=tensors["A"], B=tensors["B"], gate=tensors["gate"],
                       dp_epsilon=_privacy(meta, "dp_epsilon"), dp_delta=_privacy(meta, "dp_delta"),
                       contributor=meta["contributor"],
                       public_key=bytes.fromhex(meta.get("public_key", "")),
                       signature=bytes.fromhex(meta.get("signature", "")))
        except ValueError as err:
            raise PieceFormatError(f"bad piece metadata: {err}") from None

    def wire_meta(self) -> str:
        """Metadata plus key and signature as one JSON string, for a Flower ConfigRecord."""
        return json.dumps(self.meta() | {"public_key": self.public_key.hex(), "signature": self.signature.hex()},
                          sort_keys=True)


def _privacy(meta: dict[str, str], name: str) -> float | None:
    """A DP figure from the metadata: absent, or a finite number > 0 (and both or neither present)."""
    if ("dp_epsilon" in meta) != ("dp_delta" in meta):
        raise PieceFormatError("a piece carries dp_epsilon and dp_delta together or neither")
    if name not in meta:
        return None
    value = float(meta[name])
    if not (np.isfinite(value) and value > 0):
        raise PieceFormatError(f"{name} must be a finite number > 0, got {meta[name]!r}")
    return value


def _read_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    return header.get("__metadata__", {}) or {}


def lora_delta_norm(piece: Piece) -> float:
    """Frobenius norm of the weight update (alpha/rank) B A, without forming it (r x r Grams)."""
    A = piece.A.astype(np.float64)
    B = piece.B.astype(np.float64)
    sq = float(np.trace((A @ A.T) @ (B.T @ B)))
    return abs(piece.scaling) * float(np.sqrt(max(sq, 0.0)))
