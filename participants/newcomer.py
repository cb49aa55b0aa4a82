"""The newcomer's pipeline: shortlist the pool's pieces by their gates, fetch those, check them, assemble, save.

The federated flow spans two messages (the gates arrive in one, the shortlisted pieces in the next), so the
ClientApp calls `shortlist_pieces` and `assemble_pieces` in turn; `assemble_from_pool` runs both around a
`fetch` for the benchmarks. The same two functions either way, so the benchmark measures what a device runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from participants.adapters import save_peft_adapter
from participants.assembly import Assembly, assemble, shortlist
from participants.seed_loading import LoadedSeed
from participants.settings import assembly_settings
from protocols.pieces import Piece
from protocols.records import PersonalRecord
from protocols.settings import ParticipantSettings

Gate = tuple[str, str, int, np.ndarray]  # (piece id, position, rank, gate vector)


def shortlist_pieces(seed: LoadedSeed, history: list[PersonalRecord], gates: Sequence[Gate],
                     s: ParticipantSettings) -> list[str]:
    """Phase 1: the ids of the pieces to download, scored on the device's own history."""
    return shortlist(seed, history, list(gates), assembly_settings(s)) if gates else []


def refused_pieces(pieces: Sequence[Piece], seed: LoadedSeed) -> list[str]:
    """Positions of received pieces whose signature or seed hash does not check out."""
    return [p.position for p in pieces if not p.signature_ok() or p.seed_hash != seed.descriptor.content_hash]


def assemble_pieces(seed: LoadedSeed, history: list[PersonalRecord], pieces: list[Piece], s: ParticipantSettings,
                    adapter_dir: str | Path | None = None, extra: dict | None = None) -> Assembly:
    """Phase 2: check what arrived, assemble, and keep the adapter as a PEFT folder when `adapter_dir` is given."""
    bad = refused_pieces(pieces, seed)
    if bad:
        raise ValueError(f"refusing {len(bad)} pieces whose signature or seed hash does not check out: {bad[:3]}")
    result = assemble(seed, history, pieces, assembly_settings(s))
    if adapter_dir is not None:
        save_peft_adapter(adapter_dir, result.weights, result.rank, result.alpha, seed.descriptor.seed_id,
                          extra={"seed_model": seed.descriptor.seed_id, "seed_hash": seed.descriptor.content_hash,
                                 "choices": result.choices} | (extra or {}))
    return result


@dataclass
class Newcomer:
    assembly: Assembly
    shortlisted: list[str]
    seconds: float  # both phases, without the fetch
    download_bytes: int  # the gates, then the shortlisted pieces' A and B


def assemble_from_pool(seed: LoadedSeed, history: list[PersonalRecord], gates: Sequence[Gate],
                       fetch: Callable[[list[str]], list[Piece]], s: ParticipantSettings,
                       adapter_dir: str | Path | None = None, extra: dict | None = None) -> Newcomer:
    """Both phases around `fetch(ids) -> pieces`, as a device runs them between two messages."""
    start = time.perf_counter()
    ids = shortlist_pieces(seed, history, gates, s)
    shortlist_seconds = time.perf_counter() - start
    pieces = fetch(ids)
    start = time.perf_counter()
    result = assemble_pieces(seed, history, pieces, s, adapter_dir, extra)
    seconds = shortlist_seconds + time.perf_counter() - start
    download = sum(g.nbytes for *_, g in gates) + sum(p.A.nbytes + p.B.nbytes for p in pieces)
    return Newcomer(result, ids, seconds, download)
