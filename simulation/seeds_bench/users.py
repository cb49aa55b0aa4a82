"""Who is benched: the catalog's styleqa seeds, and per style, users whose rows no seed was built from."""

from __future__ import annotations

from dataclasses import replace

from protocols.catalog import Catalog
from simulation.seeds_bench.settings import SeedBenchSettings
from simulation.styleqa import find_styleqa, style_number, styleqa_rows
from simulation.user_data import UserData


def style_seeds(catalog: Catalog) -> dict[int, str]:
    """Style number -> seed name, for the catalog's seeds named "style{s}"."""
    found = {style: e.name for e in catalog.entries if (style := style_number(e.name)) is not None}
    if len(found) < 2:
        raise ValueError(f"the catalog at {catalog.folder} has {len(found)} seeds named style<N>; the seed bench "
                         f"needs a styleqa catalog: `bouquet seeds build --data styleqa --out {catalog.folder}`")
    return dict(sorted(found.items()))


def bench_users(styles: list[int], s: SeedBenchSettings, per_style: int, skip: int = 0) -> list[UserData]:
    """Per style, users with disjoint slices from the end of its training rows (the seeds use the start)."""
    folder = find_styleqa()
    users = []
    span = s.history + s.test
    for style in styles:
        rows = styleqa_rows(folder, style, "train")
        for j in range(skip, skip + per_style):
            chunk = rows[len(rows) - (j + 1) * span: len(rows) - j * span]
            name = f"style{style}-u{j}"
            users.append(UserData(name, [replace(r, user=name) for r in chunk[: s.history]],
                                  [replace(r, user=name) for r in chunk[s.history:]]))
    return users
