"""A bench with a seed catalog: every participant picks its seed first, and each seed is benched on its own.

The choice is the device's own (participants.style_direction, as the ClientApp's `style` query runs it); which
seed a target then runs on follows the coordinator's rule (coordinator.seed_fallback), as in a federated round.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.seed_fallback import usable_seed
from participants.progress import log, progress
from participants.seed_loading import LoadedSeed
from participants.style_direction import choose_from_catalog
from protocols.catalog import Catalog, load_catalog
from protocols.files import write_json
from protocols.seeds import materialize
from simulation.bench.methods import BASE
from simulation.bench.settings import BenchSettings
from simulation.user_data import UserData


def open_catalog(s: BenchSettings) -> Catalog | None:
    """The run's seed catalog, or None without one; refused when it explains seeds of another base."""
    if not s.catalog:
        return None
    catalog = load_catalog(s.catalog)
    mine = materialize(s.seed_model).content_hash
    if mine != catalog.base_hash:
        raise ValueError(f"the catalog at {s.catalog} is built on {catalog.base!r} (weights "
                         f"{catalog.base_hash[:12]}…), not on --seed-model {s.seed_model!r} ({mine[:12]}…): its "
                         f"seeds are deltas over that base; run with --seed-model {catalog.base}")
    return catalog


def choose_seeds(base: LoadedSeed, catalog: Catalog, users: list[tuple[str, UserData]], out: Path) -> dict[str, dict]:
    """Every participant's own choice, before anything else: XPerT on its history against the base, the nearest
    catalog seed. `users` are (role, user). Kept in out/selections.json, one user at a time, so a rerun
    chooses only for those not done; refused when the catalog's seeds changed since."""
    path = out / "selections.json"
    fingerprint = {"base_hash": catalog.base_hash, "seeds": {e.name: e.content_hash for e in catalog.entries}}
    saved = json.loads(path.read_text()) if path.exists() else {"catalog": fingerprint, "users": {}}
    if saved["catalog"] != fingerprint:
        raise ValueError(f"the catalog at {catalog.folder} has other seeds than when {path} was written; "
                         f"choose another --out")
    chosen = saved["users"]
    with progress(len(users), "seed choice") as bar:
        for role, u in users:
            if u.user not in chosen:
                start = time.perf_counter()
                selection, _ = choose_from_catalog(base, u.history, catalog)
                chosen[u.user] = {"role": role, "seed": selection.seed_id or BASE,
                                  "distance": selection.distance if math.isfinite(selection.distance) else None,
                                  "reason": selection.reason, "seconds": time.perf_counter() - start,
                                  "ranking": sorted(selection.distances, key=lambda k: (selection.distances[k], k))}
                write_json(path, saved)
            bar.update(user=u.user)
    return {u.user: chosen[u.user] for _, u in users}


@dataclass
class SeedGroup:
    """One seed in use and the participants on it, in the run's order."""
    label: str  # catalog seed name, or "base"
    source: str  # what load_seed takes
    sharers: list[UserData] = field(default_factory=list)
    targets: list[tuple[int, UserData]] = field(default_factory=list)  # (index among all targets, user)


def seed_groups(s: BenchSettings, catalog: Catalog | None, sharers: list[UserData], targets: list[UserData],
                selections: dict[str, dict]) -> list[SeedGroup]:
    """The seeds in use, catalog seeds by name first and the base last. A target whose seed no sharer chose
    runs where the coordinator's fallback rule puts it, among the seeds that have sharers."""
    base = SeedGroup(BASE, s.seed_model)
    groups: dict[str, SeedGroup] = {}

    def group(label: str) -> SeedGroup:
        if label == BASE:
            return base
        return groups.setdefault(label, SeedGroup(label, catalog.seed_source(label)))

    def chosen(user: str) -> str:
        return selections[user]["seed"] if catalog is not None else BASE

    for u in sharers:
        group(chosen(u.user)).sharers.append(u)
    shared_on = {g.label for g in [base, *groups.values()] if g.sharers}
    for index, t in enumerate(targets):
        wanted = chosen(t.user)
        label = usable_seed(wanted, selections.get(t.user, {}).get("ranking", []), BASE, shared_on) or BASE
        if label != wanted:
            log.info("%s: no sharer chose %s; it runs on the nearest seed with sharers, %s", t.user, wanted, label)
        group(label).targets.append((index, t))
    return [groups[k] for k in sorted(groups)] + [base]
