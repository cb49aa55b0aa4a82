"""Choosing which participants train and share pieces, from the profiles they revealed.

A pool is only as useful as it is varied: "diverse" clusters the participants' noised profile embeddings
and takes the most active member of each cluster, so that every kind of user is represented by someone
with enough data to train well. "most-active" and "random" are the baselines it is compared with.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.cluster import KMeans

STRATEGIES = ("random", "most-active", "diverse")


@dataclass(frozen=True)
class Profile:
    node_id: int
    history_count: int
    embedding: np.ndarray
    key_id: str = ""  # the device's signing key id: stable across runs, unlike node ids in a simulation

    @property
    def order(self) -> tuple[str, int]:
        return self.key_id, self.node_id


def select_sharers(profiles: Sequence[Profile], n: int, strategy: str, *, rng_seed: int) -> list[int]:
    """Node ids of up to n distinct sharers, in order of preference (all of them, in key order, if n covers them)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sharer selection {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if n < 0:
        raise ValueError(f"the number of sharers must not be negative, got {n}")
    first: dict[int, Profile] = {}
    for profile in profiles:
        first.setdefault(profile.node_id, profile)
    unique = sorted(first.values(), key=lambda p: p.order)  # the same order in every run with the same devices
    if n >= len(unique):
        return [p.node_id for p in unique]
    if strategy == "random":
        return [p.node_id for p in random.Random(rng_seed).sample(unique, n)]
    if strategy == "most-active":
        return [p.node_id for p in _by_activity(unique)[:n]]
    return _diverse(unique, n, rng_seed)


def _by_activity(profiles: Sequence[Profile]) -> list[Profile]:
    """Most history first; ties by key id, then node id."""
    return sorted(profiles, key=lambda p: (-p.history_count, *p.order))


def _diverse(profiles: list[Profile], n: int, rng_seed: int) -> list[int]:
    """The most active member of each of n k-means clusters, topped up with the most active others."""
    if n == 0:
        return []
    embeddings = np.stack([np.asarray(p.embedding, dtype=np.float64) for p in profiles])
    labels = KMeans(n_clusters=n, n_init=10, random_state=rng_seed).fit_predict(embeddings)
    leaders = [_by_activity([p for p, label in zip(profiles, labels) if label == c])[0] for c in sorted(set(labels))]
    chosen = [p.node_id for p in _by_activity(leaders)]
    rest = [p.node_id for p in _by_activity(profiles) if p.node_id not in chosen]
    return chosen + rest[: n - len(chosen)]
