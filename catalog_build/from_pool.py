"""Seeds from the pool: one per cluster of contributors, the exact mean of the members' LoRA updates
(coordinator.pool_merging), written as one LoRA and explained like any seed. Each seed records its contributors
(their key ids, in seeds/<name>/contributors.json), so the operator sees which seeds a withdrawal touches."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from catalog_build.build import build_catalog, plain_base
from catalog_build.layout import write_json
from catalog_build.settings import ExplainSettings, SeedJob
from coordinator.explain_seed import minilm_embed
from coordinator.pool import PiecePool
from coordinator.pool_merging import (cluster_contributors, contributor_sketches, group_by_contributor, mean_delta,
                                      pool_root, pool_seed)
from coordinator.service import CONTRIBUTORS_FILE
from protocols.catalog import SEEDS_DIR, Catalog
from protocols.explanations import Embed
from protocols.pieces import Piece


def build_catalog_from_pool(out: str | Path, pool_dir: str | Path, seed_source: str | None, clusters: int,
                            probes: Sequence[str] = (), explain: ExplainSettings = ExplainSettings(),
                            max_new_tokens: int = 256, sketch_inputs: int = 4, random_seed: int = 0,
                            embed: Embed = minilm_embed, batch_size: int = 8) -> Catalog:
    """One seed per cluster of the pool's contributors: the exact mean of its members' LoRA updates.

    `seed_source` is the seed the pieces were trained on (None: the pool's only seed); it becomes the
    catalog's base. Contributors are clustered by a sketch of their updates (`contributor_sketches`).
    """
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


def _pieces_fingerprint(pieces: Iterable[Piece]) -> str:
    return hashlib.sha256("\n".join(sorted(p.piece_id for p in pieces)).encode()).hexdigest()
