"""What the pool checks before it stores a piece, and how it says why it refused one.

Checks run in a fixed order and stop at the first failure, so each later check may rely on the
earlier ones (the shape check knows the position exists; the norm check knows the values are finite).
The numeric bounds (A, B and alpha/rank each, not only the update) are protocols.piece_bounds', which the
newcomer applies again to what it receives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from protocols.identity import weak_key_reason
from protocols.piece_bounds import PieceBounds, nonfinite_problem, size_problem
from protocols.pieces import TENSORS, Piece

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALLOWED_DTYPES = (np.dtype("float32"), np.dtype("float16"))


@dataclass(frozen=True)
class RegisteredSeed:
    seed_id: str
    content_hash: str
    shapes: dict[str, tuple[int, int]]  # position (module name) -> (d_in, d_out)


@dataclass
class ValidationPolicy:
    bounds: PieceBounds = PieceBounds()
    allowed_contributors: frozenset[str] | None = None  # None: anyone with a valid signature
    expected_seed: str | None = None  # the seed the coordinator asked the sender to train on (None: any registered)
    contributor_quota: int | None = None  # pieces one contributor may hold in the pool (None: no limit)

    @property
    def max_rank(self) -> int:
        return self.bounds.max_rank


def describe(piece: Piece) -> str:
    """A short label that names a piece in messages and logs."""
    return f"{piece.position} (id {piece.piece_id[:12]}…, contributor {piece.contributor or 'none'})"


class PieceRejected(ValueError):
    """A piece that failed a check; `.piece` labels it and `.check` names the failed check."""

    def __init__(self, piece: Piece, check: str, reason: str):
        self.piece = describe(piece)
        self.check = check
        self.reason = reason
        super().__init__(f"refused piece {self.piece}: check {check!r}: {reason}")


Check = Callable[[Piece, "RegisteredSeed | None", ValidationPolicy], "str | None"]


def _signature(piece: Piece, seed: RegisteredSeed | None, policy: ValidationPolicy) -> str | None:
    weak = weak_key_reason(piece.public_key) if piece.public_key else None
    if weak:
        return f"refusing the carried Ed25519 key: {weak}"
    if not piece.signature_ok():
        return "the Ed25519 signature does not verify against the carried key and contributor id"
    return None


def _contributor(piece: Piece, seed: RegisteredSeed | None, policy: ValidationPolicy) -> str | None:
    allowed = policy.allowed_contributors
    if allowed is not None and piece.contributor not in allowed:
        return f"contributor {piece.contributor!r} is not among the {len(allowed)} allowed contributors"
    return None


def _seed(piece: Piece, seed: RegisteredSeed | None, policy: ValidationPolicy) -> str | None:
    if seed is None or seed.seed_id != piece.seed_id:
        return f"seed {piece.seed_id!r} is not registered with the pool"
    if policy.expected_seed is not None and piece.seed_id != policy.expected_seed:
        return f"seed {piece.seed_id!r} is not the seed {policy.expected_seed!r} the sender was asked to train on"
    if piece.seed_hash != seed.content_hash:
        return (f"seed hash {piece.seed_hash[:12]}… differs from the registered "
                f"{seed.content_hash[:12]}… of seed {seed.seed_id!r}")
    return None


def _position(piece: Piece, seed: RegisteredSeed | None, policy: ValidationPolicy) -> str | None:
    if piece.position not in seed.shapes:
        return f"position {piece.position!r} is not a LoRA target of seed {seed.seed_id!r}"
    return None


def _dtype(piece: Piece, seed: RegisteredSeed | None, policy: ValidationPolicy) -> str | None:
    tensors = {name: getattr(piece, name) for name in TENSORS}
    for name, arr in tensors.items():
        if not isinstance(arr, np.ndarray):
            return f"{name} is a {type(arr).__name__}, not a numpy array"
        if arr.dtype not in ALLOWED_DTYPES:
            return f"{name} is {arr.dtype}, expected float32 or float16"
    if len({arr.dtype for arr in tensors.values()}) > 1:
        return "A, B and gate mix dtypes (" + ", ".join(f"{n}: {a.dtype}" for n, a in tensors.items()) + ")"
    return None


def _shape(piece: Piece, seed: RegisteredSeed | None, policy: ValidationPolicy) -> str | None:
    d_in, d_out = seed.shapes[piece.position]
    rank = piece.rank
    if not isinstance(rank, (int, np.integer)) or not 1 <= rank <= policy.max_rank:
        return f"rank {rank!r} is outside 1..{policy.max_rank}"
    if not math.isfinite(piece.alpha) or piece.alpha <= 0:
        return f"alpha {piece.alpha!r} is not a finite positive number"
    expected = {"A": (rank, d_in), "B": (d_out, rank), "gate": (d_in,)}
    for name, shape in expected.items():
        got = tuple(getattr(piece, name).shape)
        if got != shape:
            return f"{name} is {got}, expected {shape} for rank {rank} at a (d_in={d_in}, d_out={d_out}) position"
    return None


def _finite(piece: Piece, seed: RegisteredSeed | None, policy: ValidationPolicy) -> str | None:
    return nonfinite_problem({name: getattr(piece, name) for name in TENSORS})


def _norm(piece: Piece, seed: RegisteredSeed | None, policy: ValidationPolicy) -> str | None:
    """A, B, alpha/rank, the update and the gate each within protocols.piece_bounds, in float32."""
    return size_problem(piece.A, piece.B, piece.alpha, piece.rank, piece.gate, policy.bounds)


CHECKS: tuple[tuple[str, Check], ...] = (
    ("signature", _signature), ("contributor", _contributor), ("seed", _seed), ("position", _position),
    ("dtype", _dtype), ("shape", _shape), ("finite", _finite), ("norm", _norm),
)


def validate(piece: Piece, seed: RegisteredSeed | None, policy: ValidationPolicy | None = None) -> None:
    """Raise PieceRejected at the first failed check; `seed` is the registered seed of piece.seed_id
    (None when that id is not registered)."""
    policy = policy or ValidationPolicy()
    for name, check in CHECKS:
        reason = check(piece, seed, policy)
        if reason is not None:
            raise PieceRejected(piece, name, reason)


def seed_shapes(folder: str | Path) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every LoRA target linear in the seed at `folder`, read from a weightless
    (meta-device) skeleton so that no weights are loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {name: (module.in_features, module.out_features) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS}
