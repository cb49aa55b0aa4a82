"""Comparison 4, the pool: the adapter a newcomer assembles from its seed's pool (pieces that sharers trained
on that seed) against the one assembled from the base's pool (the same sharers, trained on the base).

Sharers and newcomers run the device's own pipelines (participants.sharing, participants.newcomer), so what
is compared is what a device does. Against a changed catalog the pools are filled again: sharers chose and
trained on the other catalog's seeds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.pool import PiecePool
from coordinator.validation import RegisteredSeed, seed_shapes
from participants.adapters import branches
from participants.evaluation import perplexity
from participants.newcomer import assemble_from_pool
from participants.progress import log, progress
from participants.seed_loading import load_seed
from participants.sharing import train_and_share
from participants.style_direction import choose_from_catalog
from protocols.catalog import Catalog
from protocols.files import write_json
from simulation.seeds_bench.settings import SeedBenchSettings
from simulation.seeds_bench.state import catalog_fingerprint
from simulation.seeds_bench.users import bench_users, style_seeds


def pools(catalog: Catalog, selection: dict, s: SeedBenchSettings, out: Path) -> list[dict]:
    """Sharers (other users of the same styles) train on the seed they select and, for the reference, on the base;
    each target assembles from its seed's pool and from the base's pool."""
    styles = list(style_seeds(catalog))[: s.styles_for_tuning]
    targets = bench_users(styles, s, 1)
    sharers = bench_users(styles, s, 1, skip=s.users_per_style)
    path = out / "pools.json"
    fingerprint = catalog_fingerprint(catalog)
    state = json.loads(path.read_text()) if path.exists() else {}
    if state.get("catalog") != fingerprint:
        if state:  # sharers chose and trained on another catalog's seeds: their pieces are not this catalog's pool
            log.info("the pools in %s were filled for another catalog: filling them again", out / "pool")
            shutil.rmtree(out / "pool", ignore_errors=True)
        state = {"catalog": fingerprint, "sharers": {}, "targets": {}}
    base_desc = load_seed(catalog.base).descriptor
    with PiecePool(out / "pool") as pool:
        pool.register_seed(RegisteredSeed(base_desc.seed_id, base_desc.content_hash, seed_shapes(base_desc.path)))
        with progress(len(sharers), "sharers (seed and base)") as bar:
            for u in sharers:
                if u.user not in state["sharers"]:
                    selected, _ = choose_from_catalog(load_seed(catalog.base), u.history, catalog)
                    sources = [catalog.base] + ([catalog.seed_source(selected.seed_id)] if selected.seed_id else [])
                    for source in sources:
                        seed = load_seed(source)
                        if seed.descriptor.delta:
                            pool.register_seed(RegisteredSeed(seed.descriptor.seed_id, seed.descriptor.content_hash,
                                                              seed_shapes(seed.descriptor.path)))
                        # a key per sharer derived from its name: the same sharer signs alike on every run
                        key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"seeds:{u.user}".encode()).digest())
                        share = train_and_share(seed, u.history, s.participant(source), key,
                                                share_seed=s.rng_seed, who=f"{u.user} on {Path(source).name}")
                        pool.add_many(share.shared)
                    state["sharers"][u.user] = selected.seed_id or "base"
                    write_json(path, state)
                bar.update(user=u.user)
        with progress(len(targets), "assembly from each pool") as bar:
            for u in targets:
                if u.user not in state["targets"]:
                    chosen = selection["per_user"][u.user]["xpert"]
                    row = {"seed": chosen or "base"}
                    for label, source in (("base_pool", catalog.base),
                                          ("seed_pool", catalog.seed_source(chosen) if chosen else catalog.base)):
                        seed = load_seed(source)
                        gates = pool.gates(seed.descriptor.seed_id)
                        if not gates:
                            row[label] = None
                            continue
                        newcomer = assemble_from_pool(seed, u.history, gates, pool.get, s.participant(source))
                        adapter = branches(newcomer.assembly.weights, 1.0, seed.device)  # scaling folded into B
                        row[label] = {"perplexity": perplexity(seed, u.test, adapter, max_len=s.max_len),
                                      "seed_alone": perplexity(seed, u.test, None, max_len=s.max_len),
                                      "candidates": len(gates), "seconds": newcomer.seconds}
                    state["targets"][u.user] = row
                    write_json(path, state)
                bar.update(user=u.user)
    return [{"user": u.user} | state["targets"][u.user] for u in targets]
