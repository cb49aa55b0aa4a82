"""The newcomer's pipeline: shortlist the pool's pieces by their gates, fetch those, check them, (optionally) try
each contributor's pieces on a few history items and keep the most helpful, assemble, save.

The federated flow spans two messages (the gates arrive in one, the shortlisted pieces in the next), so the
ClientApp calls `shortlist_pieces` and `assemble_pieces` in turn; `assemble_from_pool` runs both around a
`fetch` for the benchmarks. The same two functions either way, so the benchmark measures what a device runs.
A device trusts no pool: it checks every piece it receives (signature under a strong key, its seed, dtype, shapes,
finite values, the bounds of protocols.piece_bounds) before mixing, and the mixed adapter before saving it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from participants.adapters import save_peft_adapter
from participants.assembly import Assembly, assemble, shortlist
from participants.chat_data import encode_all
from participants.contributor_probe import Probe, by_contributor, kept_pieces, probe_contributors
from participants.seed_loading import LoadedSeed
from participants.settings import assembly_settings
from protocols.piece_bounds import PieceBounds, mixed_problem, nonfinite_problem, size_problem
from protocols.pieces import TENSORS, WIRE_DTYPES, Piece
from protocols.records import PersonalRecord
from protocols.settings import ParticipantSettings

Gate = tuple[str, str, int, np.ndarray]  # (piece id, position, rank, gate vector)


def gate_phase_records(history: list[PersonalRecord], gates: Sequence[Gate], s: ParticipantSettings,
                       ) -> list[PersonalRecord]:
    """What phase 1 scores the gates on: the last `s.gate_records` history items (all when 0), or nothing when
    the shortlist would keep every piece anyway (no position has more candidates than it) or the probe will try
    each contributor's pieces (it needs their whole share: on the gates' shortlist alone it found the best
    sharer for 9 of 16 health-tweet targets, on the whole shares for 16)."""
    per_position = Counter(pos for _, pos, *_ in gates)
    if not gates or max(per_position.values()) <= s.shortlist or s.probe_records:
        return []
    return history[-s.gate_records:] if s.gate_records else history


def shortlist_pieces(seed: LoadedSeed, history: list[PersonalRecord], gates: Sequence[Gate],
                     s: ParticipantSettings) -> list[str]:
    """Phase 1: the ids of the pieces to download, scored on the device's own history."""
    scored = gate_phase_records(history, gates, s)
    if not scored:
        return [pid for pid, *_ in gates]
    return shortlist(seed, scored, list(gates), assembly_settings(s))


def contributor_probe(seed: LoadedSeed, history: list[PersonalRecord], pieces: list[Piece],
                      s: ParticipantSettings) -> Probe | None:
    """The probe of participants.contributor_probe on the last `s.probe_records` history items, or None when it is
    off or has nothing to choose (no more contributors than it keeps)."""
    if not s.probe_records or len(by_contributor(pieces)) <= s.probe_keep:
        return None
    return probe_contributors(seed, history[-s.probe_records:], pieces, s.probe_keep, max_len=s.max_len,
                              batch_size=s.assembly_batch_size)


def piece_problem(p: Piece, seed: LoadedSeed, bounds: PieceBounds) -> str | None:
    """Why a received piece must not be mixed, or None."""
    if not p.signature_ok():
        return "its signature does not verify under a strong Ed25519 key"
    if p.seed_hash != seed.descriptor.content_hash:
        return f"it was trained on seed weights {p.seed_hash[:12]}…, not this seed's"
    tensors = {name: getattr(p, name) for name in TENSORS}
    if any(not isinstance(t, np.ndarray) or t.dtype not in WIRE_DTYPES for t in tensors.values()):
        return "its tensors are not float32/float16 arrays"
    try:
        module = seed.model.get_submodule(p.position)
        d_in, d_out = module.in_features, module.out_features
    except AttributeError:
        return f"{p.position!r} is not a linear layer of this seed"
    expected = {"A": (p.rank, d_in), "B": (d_out, p.rank), "gate": (d_in,)}
    if not 1 <= p.rank <= bounds.max_rank or any(tensors[n].shape != shape for n, shape in expected.items()):
        return f"its shapes do not fit rank {p.rank} at this position (A {p.A.shape}, B {p.B.shape}, gate " \
               f"{p.gate.shape}; expected {expected})"
    return nonfinite_problem(tensors) or size_problem(p.A, p.B, p.alpha, p.rank, p.gate, bounds)


def refused_pieces(pieces: Sequence[Piece], seed: LoadedSeed, bounds: PieceBounds = PieceBounds()) -> list[str]:
    """'position (id …): why' for each received piece that fails a check."""
    found = ((p, piece_problem(p, seed, bounds)) for p in pieces)
    return [f"{p.position} (id {p.piece_id[:12]}…): {why}" for p, why in found if why]


def assemble_pieces(seed: LoadedSeed, history: list[PersonalRecord], pieces: list[Piece], s: ParticipantSettings,
                    adapter_dir: str | Path | None = None, extra: dict | None = None,
                    bounds: PieceBounds = PieceBounds()) -> Assembly:
    """Phase 2: check what arrived, assemble, check the mix, and keep the adapter as a PEFT folder when
    `adapter_dir` is given. The bounds are the device's own, never the coordinator's."""
    bad = refused_pieces(pieces, seed, bounds)
    if bad:
        raise ValueError(f"refusing the {len(pieces)} pieces received: {len(bad)} fail the device's checks, e.g. "
                         f"{'; '.join(bad[:3])}")
    start = time.perf_counter()
    probe = contributor_probe(seed, history, pieces, s)
    if probe is not None:
        pieces = kept_pieces(pieces, probe)
    probe_seconds = time.perf_counter() - start
    result = assemble(seed, history[-s.assembly_records:] if s.assembly_records else history, pieces,
                      assembly_settings(s))
    if probe is not None:  # its cost is the newcomer's too
        result.tokens += probe.tokens
        result.seconds += probe_seconds
    wrong = mixed_problem(result.weights, bounds)
    if wrong:
        raise ValueError(f"the assembled adapter is out of bounds and is not saved: {wrong}")
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
    shortlist_tokens: int = 0  # tokens through phase 1's forward passes (0 when it had nothing to choose)


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
    scored = encode_all(seed.tokenizer, gate_phase_records(history, gates, s), s.max_len)
    return Newcomer(result, ids, seconds, download, sum(len(e.input_ids) for e in scored))
