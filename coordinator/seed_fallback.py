"""Which seed a newcomer assembles on: pieces fit only the seed they were trained on.

A newcomer asks for its own seed. When that seed's pool has nothing for it, it moves to the nearest seed in its
own ranking (its device's order of preference) that has something, then to the base; with nowhere to go it is
left out and reported. The ServerApp and the benchmarks both place newcomers with this one rule.
"""

from __future__ import annotations

from collections.abc import Container, Sequence


def usable_seed(wanted: str, ranking: Sequence[str], base: str, available: Container[str]) -> str | None:
    """The first of `wanted`, then `ranking` in order, then `base`, that is in `available`; None if none is."""
    return next((seed for seed in (wanted, *ranking, base) if seed in available), None)
