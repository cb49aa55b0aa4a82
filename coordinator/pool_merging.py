"""Merging the pool's contributors into seeds: the coordinator's arithmetic on shared pieces, no model needed.

    pool_root / pool_seed    which pool folder, and which of its seeds, to merge from
    group_by_contributor     the pieces per contributor
    contributor_sketches     a unit vector per contributor that compares their updates ΔW
    cluster_contributors     KMeans over the sketches
    mean_delta               one LoRA whose update is exactly the mean of the members' updates

The catalog build (catalog_build.from_pool) writes each cluster's mean as a seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from coordinator.pool import PiecePool
from protocols.pieces import Piece

Weights = dict[str, tuple[np.ndarray, np.ndarray]]  # position -> (A, B), float32: a LoRA as a device trains it


def pool_root(folder: str | Path) -> Path:
    """A pool folder, or a run folder holding one in pool/ (checked before opening, which would create one)."""
    root = Path(folder).expanduser()
    if (root / "pool" / "index.sqlite").is_file():
        root = root / "pool"
    if not (root / "index.sqlite").is_file():
        raise FileNotFoundError(f"{folder} is neither a piece pool nor a run folder holding one (no index.sqlite)")
    return root


def pool_seed(pool: PiecePool, seed_source: str | None) -> str:
    """The seed whose pieces to merge: `seed_source`, or the pool's only seed with pieces when None."""
    known = [s.seed_id for s in pool.seeds() if pool.count(s.seed_id)]
    if seed_source is None:
        if len(known) != 1:
            raise ValueError(f"the pool at {pool.root} holds pieces of {len(known)} seeds "
                             f"({', '.join(known) or 'none'}); name the one to build from")
        return known[0]
    if seed_source not in known:
        raise ValueError(f"the pool at {pool.root} holds no pieces of seed {seed_source!r}; it has: "
                         f"{', '.join(known) or 'none'}")
    return seed_source


def group_by_contributor(pieces: Iterable[Piece]) -> dict[str, list[Piece]]:
    members: dict[str, list[Piece]] = {}
    for p in pieces:
        members.setdefault(p.contributor, []).append(p)
    return dict(sorted(members.items()))


def _delta_at(pieces: Sequence[Piece]) -> dict[str, np.ndarray]:
    """Per position: the mean update (alpha/r)·B@A of one contributor's pieces there (usually one piece)."""
    by_position: dict[str, list[np.ndarray]] = {}
    for p in pieces:
        update = p.scaling * (p.B.astype(np.float64) @ p.A.astype(np.float64))
        by_position.setdefault(p.position, []).append(update)
    return {pos: np.mean(updates, axis=0) for pos, updates in by_position.items()}


def contributor_sketches(members: dict[str, list[Piece]], inputs: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """A unit vector per contributor: its update ΔW at every position applied to the same few random inputs.

    Why this vector: the seed written for a cluster is the mean ΔW of its members, so members should be close
    in ΔW. A and B themselves cannot be compared (B·M and M⁻¹·A give the same update), gates say where a
    piece fires rather than what it changes, and the full ΔW is large; ΔW·X for a shared Gaussian X keeps
    Frobenius inner products in expectation at (inputs · d_out) numbers per position. Each vector is scaled
    to unit length, because the size of an update follows steps, learning rate and data volume, not style.
    A position a contributor did not share counts as no update there.
    """
    deltas = {c: _delta_at(pieces) for c, pieces in members.items()}
    shapes: dict[str, tuple[int, int]] = {}
    for d in deltas.values():
        for pos, dw in d.items():
            shapes.setdefault(pos, dw.shape)
    rng = np.random.default_rng(seed)
    probes = {pos: rng.standard_normal((shapes[pos][1], inputs)) for pos in sorted(shapes)}
    sketches = {}
    for c, d in deltas.items():
        parts = [(d[pos] @ x if pos in d else np.zeros((shapes[pos][0], inputs))).ravel() for pos, x in probes.items()]
        v = np.concatenate(parts)
        norm = np.linalg.norm(v)
        sketches[c] = v / norm if norm > 0 else v
    return sketches


def cluster_contributors(sketches: dict[str, np.ndarray], k: int, seed: int = 0) -> list[list[str]]:
    """KMeans (seeded) over the sketches; clusters listed by their first member, members sorted."""
    from sklearn.cluster import KMeans

    names = sorted(sketches)
    if k == len(names):
        return [[n] for n in names]
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(np.stack([sketches[n] for n in names]))
    clusters: dict[int, list[str]] = {}
    for name, label in zip(names, labels, strict=True):
        clusters.setdefault(int(label), []).append(name)
    return sorted(clusters.values(), key=lambda members: members[0])


def mean_delta(members: Sequence[Sequence[Piece]]) -> tuple[Weights, int, float]:
    """One LoRA whose update is exactly the mean of the members' updates at every position.

    Stack the members' A's (rank Σr) and their B's, each B scaled by its own (alpha/r) / n, and write it with
    alpha = rank so that PEFT's scaling is 1: then B_cat·A_cat = (1/n) Σ (alpha_m/r_m) B_m·A_m exactly.
    n counts the members that shared a piece at that position (one that did not is not a zero vote), and
    several pieces of one member at one position count as their mean. Positions with fewer members are
    padded with zero rows/columns up to the largest rank, since one adapter has one rank.
    """
    per_position: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    counts: dict[str, int] = {}  # members with a piece at the position
    for pieces in members:
        mine: dict[str, list[Piece]] = {}
        for p in pieces:
            mine.setdefault(p.position, []).append(p)
        for pos, at in mine.items():
            counts[pos] = counts.get(pos, 0) + 1
            for p in at:
                per_position.setdefault(pos, []).append((p.A.astype(np.float64),
                                                         p.B.astype(np.float64) * p.scaling / len(at)))
    if not per_position:
        raise ValueError("no pieces to merge: every cluster needs at least one contributor with pieces")
    rank = max(sum(A.shape[0] for A, _ in pairs) for pairs in per_position.values())
    weights: Weights = {}
    for pos, pairs in sorted(per_position.items()):
        A = np.concatenate([a for a, _ in pairs], axis=0)
        B = np.concatenate([b for _, b in pairs], axis=1) / counts[pos]
        pad = rank - A.shape[0]
        A = np.pad(A, ((0, pad), (0, 0)))
        B = np.pad(B, ((0, 0), (0, pad)))
        weights[pos] = (A.astype(np.float32), B.astype(np.float32))
    return weights, rank, float(rank)
