"""Sharer selection on synthetic profiles whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.sharers import Profile, select_sharers

# Three well-separated clusters of four nodes each; the most active of each cluster is 102, 111 and 123.
CLUSTERS = {0: [(100, 5), (101, 9), (102, 40), (103, 1)], 1: [(110, 7), (111, 12), (112, 3), (113, 6)],
            2: [(120, 50), (121, 2), (122, 70), (123, 80)]}  # fmt: skip


@pytest.fixture
def profiles() -> list[Profile]:
    rng = np.random.default_rng(0)
    out = []
    for cluster, members in CLUSTERS.items():
        center = np.zeros(16)
        center[cluster] = 1.0
        for node_id, count in members:
            vector = center + rng.normal(0.0, 0.05, size=16)
            out.append(Profile(node_id, count, (vector / np.linalg.norm(vector)).astype(np.float32)))
    order = rng.permutation(len(out))  # the input order must not matter
    return [out[i] for i in order]


def test_diverse_takes_the_most_active_node_of_each_cluster(profiles):
    chosen = select_sharers(profiles, 3, "diverse", rng_seed=0)
    assert sorted(chosen) == [102, 111, 123]
    assert select_sharers(profiles, 3, "diverse", rng_seed=5) == chosen
    # most-active alone would take three nodes of cluster 2 and one of cluster 0
    assert select_sharers(profiles, 3, "most-active", rng_seed=0) == [123, 122, 120]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # fewer distinct points than n
def test_diverse_tops_up_when_clusters_collapse():
    same = np.ones(4, dtype=np.float32) / 2
    profiles = [Profile(node, count, same) for node, count in [(1, 3), (2, 9), (3, 9), (4, 1)]]
    assert select_sharers(profiles, 3, "diverse", rng_seed=0) == [2, 3, 1]


def test_most_active_orders_by_count_then_node_id(profiles):
    tied = profiles + [Profile(99, 70, profiles[0].embedding)]
    assert select_sharers(tied, 5, "most-active", rng_seed=0) == [123, 99, 122, 120, 102]


def test_random_is_seeded_and_distinct(profiles):
    first = select_sharers(profiles, 5, "random", rng_seed=7)
    assert first == select_sharers(list(reversed(profiles)), 5, "random", rng_seed=7)
    assert len(set(first)) == 5 and set(first) <= {p.node_id for p in profiles}
    assert any(select_sharers(profiles, 5, "random", rng_seed=s) != first for s in range(8, 12))


def test_enough_room_returns_everyone_once_sorted(profiles):
    doubled = profiles + [Profile(profiles[0].node_id, 1000, profiles[0].embedding)]
    everyone = sorted(p.node_id for p in profiles)
    for strategy in ("random", "most-active", "diverse"):
        assert select_sharers(doubled, 12, strategy, rng_seed=0) == everyone
        assert select_sharers(doubled, 50, strategy, rng_seed=0) == everyone
        chosen = select_sharers(doubled, 11, strategy, rng_seed=0)
        assert len(chosen) == len(set(chosen)) == 11


def test_unknown_strategy_names_the_valid_ones(profiles):
    with pytest.raises(ValueError, match="random, most-active, diverse"):
        select_sharers(profiles, 2, "loudest", rng_seed=0)
