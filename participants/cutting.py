"""Cutting a trained adapter into signed pieces, and choosing the share that leaves the device."""

from __future__ import annotations

import random

import numpy as np

from participants.lora_training import LoraWeights
from protocols.pieces import Piece
from protocols.seeds import SeedDescriptor


def cut_into_pieces(seed: SeedDescriptor, weights: LoraWeights, gates: dict[str, np.ndarray], rank: int,
                    alpha: float, private_key, dtype=np.float32,
                    dp: tuple[float, float] | None = None) -> list[Piece]:
    """One signed piece per position: (A, B) of that module and its gate; `dp` = the (ε, δ) they were trained at."""
    pieces = []
    for pos in sorted(weights):
        A, B = weights[pos]
        piece = Piece(seed_id=seed.seed_id, seed_hash=seed.content_hash, position=pos, rank=rank, alpha=alpha,
                      A=A.astype(dtype), B=B.astype(dtype), gate=gates[pos].astype(dtype),
                      dp_epsilon=dp[0] if dp else None, dp_delta=dp[1] if dp else None)
        pieces.append(piece.signed(private_key))
    return pieces


def choose_share(pieces: list[Piece], ratio: float, *, rng_seed: int) -> list[Piece]:
    """A random share of the pieces (ratio in [0, 1]); at least one piece when ratio > 0."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"share ratio must be within [0, 1], got {ratio}")
    n = min(len(pieces), max(1, round(ratio * len(pieces)))) if ratio > 0 else 0
    chosen = sorted(random.Random(rng_seed).sample(range(len(pieces)), n))
    return [pieces[i] for i in chosen]
