"""Seeds from the pool: one per cluster of contributors, the exact mean of the members' LoRA updates
(coordinator.pool_merging), written as one LoRA and explained like any seed. Each seed records its contributors
(their key ids, in seeds/<name>/contributors.json), so the operator sees which seeds a withdrawal touches.

A seed is published to every participant, so it must not be one contributor's update in disguise: every cluster
merges at least `min_contributors` contributors (default 5), or the build refuses, naming the clusters that are
too small and the largest --clusters that could work. It refuses rather than merging a small cluster into its
neighbour, so that the catalog always has the number of seeds the operator asked for, each from the clustering
it reports."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from catalog_build.build import build_catalog, plain_base
from catalog_build.settings import ExplainSettings, SeedJob
from coordinator.explain_seed import minilm_embed
from coordinator.pool import PiecePool
from coordinator.pool_merging import (
    cluster_contributors,
    contributor_sketches,
    group_by_contributor,
    mean_delta,
    pool_root,
    pool_seed,
)
from coordinator.service import CONTRIBUTORS_FILE
from protocols.catalog import SEEDS_DIR, Catalog
from protocols.explanations import Embed
from protocols.files import write_json
from protocols.pieces import Piece

MIN_CONTRIBUTORS = 5


def build_catalog_from_pool(out: str | Path, pool_dir: str | Path, seed_source: str | None, clusters: int,
                            probes: Sequence[str] = (), explain: ExplainSettings = ExplainSettings(),
                            max_new_tokens: int = 256, sketch_inputs: int = 4, random_seed: int = 0,
                            embed: Embed = minilm_embed, batch_size: int = 8,
                            min_contributors: int = MIN_CONTRIBUTORS) -> Catalog:
    """One seed per cluster of the pool's contributors: the exact mean of its members' LoRA updates.

    `seed_source` is the seed the pieces were trained on (None: the pool's only seed); it becomes the
    catalog's base. Contributors are clustered by a sketch of their updates (`contributor_sketches`); every
    cluster must hold at least `min_contributors` of them.
    """
    if min_contributors < 1:
        raise ValueError(f"--min-contributors must be at least 1, got {min_contributors}")
    root = pool_root(pool_dir)
    with PiecePool(root) as pool:
        seed_id = pool_seed(pool, seed_source)
        ids = [pid for pid, *_ in pool.gates(seed_id)]
        pieces = pool.get(ids)
    base = plain_base(seed_id)
    registered_hash = {p.seed_hash for p in pieces}
    if registered_hash - {base.content_hash}:
        raise ValueError(f"the pool's pieces for {seed_id!r} were trained on weights {min(registered_hash)[:12]}…, "
                         f"but {seed_id!r} here has {base.content_hash[:12]}…; build with the seed they came from")
    members = group_by_contributor(pieces)
    if not 1 <= clusters <= len(members):
        raise ValueError(f"cannot make {clusters} cluster(s) from {len(members)} contributor(s) of {seed_id!r} in "
                         f"{root}; choose --clusters between 1 and {len(members)}")
    sketches = contributor_sketches(members, inputs=sketch_inputs, seed=random_seed)
    groups = cluster_contributors(sketches, clusters, seed=random_seed)
    refuse_small_clusters(groups, len(members), min_contributors, seed_id)
    jobs, contributors = [], {}
    for i, names in enumerate(groups):
        contributors[f"cluster{i + 1}"] = sorted(names)
        chosen = [members[c] for c in names]
        shown = ", ".join(names[:3]) + ("…" if len(names) > 3 else "")
        jobs.append(SeedJob(f"cluster{i + 1}", f"pool cluster {i + 1} of {len(groups)}: {len(names)} contributor(s) "
                            f"({shown})", _pieces_fingerprint(p for m in chosen for p in m),
                            lambda chosen=chosen: mean_delta(chosen)))
    settings = {"from": "pool", "pool": str(root.resolve()), "pool_pieces": _pieces_fingerprint(pieces),
                "clusters": clusters, "sketch_inputs": sketch_inputs, "random_seed": random_seed}
    catalog = build_catalog(Path(out), base, jobs, list(probes), explain, max_new_tokens, settings, embed, batch_size)
    for name, keys in contributors.items():
        write_json(Path(out) / SEEDS_DIR / name / CONTRIBUTORS_FILE, keys)
    return catalog


def refuse_small_clusters(groups: Sequence[Sequence[str]], contributors: int, min_contributors: int,
                          seed_id: str) -> None:
    """Raise, naming each cluster with fewer than `min_contributors` members and what to do instead."""
    small = [(i + 1, len(g)) for i, g in enumerate(groups) if len(g) < min_contributors]
    if not small:
        return
    named = ", ".join(f"cluster{i} has {n}" for i, n in small)
    most = contributors // min_contributors
    advice = (f"choose --clusters {most} or fewer" if most >= 1 else
              f"the pool holds only {contributors} contributor(s) of {seed_id!r}: wait for more")
    raise ValueError(f"refused: every seed from the pool must merge at least --min-contributors {min_contributors} "
                     f"contributors, so that no seed publishes one contributor's update, but {named}; {advice}")


def _pieces_fingerprint(pieces: Iterable[Piece]) -> str:
    return hashlib.sha256("\n".join(sorted(p.piece_id for p in pieces)).encode()).hexdigest()
