"""Comparison 2, cost against catalog size: XPerT's selection stays flat, the searches grow with the catalog.

Measured on catalogs of many tiny-model seeds: each is the tiny random Llama plus a LoRA trained on its own
made-up answer pattern, explained like any seed (probe answers against the base's, over the text basis). What
is measured is the cost of choosing among them, which depends on how many there are, not on how good a tiny
model is.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from catalog_build import ExplainSettings, build_catalog_from_labels
from participants.lora_training import LoraSettings
from participants.progress import progress
from participants.seed_loading import load_seed
from participants.seed_search import exhaustive_search, successive_halving
from participants.style_direction import choose_from_catalog
from protocols.catalog import Catalog
from protocols.explanations import STYLE_WORDS
from protocols.records import PersonalRecord
from protocols.seeds import TINY
from simulation.seeds_bench.settings import SeedBenchSettings
from simulation.seeds_bench.users import bench_users

TINY_PROBES = ("what is a tree?", "how do boats float?", "why is the sky blue?", "name a fruit.")


def scaling(s: SeedBenchSettings, out: Path) -> list[dict]:
    """Catalogs of 4..32 tiny seeds: the selection cost of each method, per catalog size."""
    largest = build_tiny_catalog(out / "tiny-catalog", max(s.scaling_sizes), seed=s.rng_seed)
    user = bench_users([1], replace(s, test=1), 1)[0]
    base = load_seed(largest.base)
    rows = []
    with progress(len(s.scaling_sizes), "cost vs catalog size") as bar:
        for n in s.scaling_sizes:
            sub = replace(largest, entries=largest.entries[:n])
            sources = [sub.seed_source(e.name) for e in sub.entries]
            xpert = []
            for _ in range(3):
                start = time.perf_counter()
                choose_from_catalog(base, user.history, sub)
                xpert.append(time.perf_counter() - start)
            full = exhaustive_search(sources, user.history, max_len=s.max_len)
            halving = successive_halving(sources, user.history, min_items=s.min_items, max_len=s.max_len)
            rows.append({"seeds": n, "xpert_seconds": statistics.median(xpert),
                         "xpert_bytes": len(json.dumps(sub.to_dict())),
                         "exhaustive_seconds": full.seconds, "exhaustive_tokens": full.tokens_forward,
                         "exhaustive_bytes": full.bytes_loaded, "halving_seconds": halving.seconds,
                         "halving_tokens": halving.tokens_forward, "halving_bytes": halving.bytes_loaded})
            bar.update(seeds=n)
    return rows


def build_tiny_catalog(folder: str | Path, n: int, seed: int = 0) -> Catalog:
    """n tiny seeds ("tiny00", "tiny01", …), each trained to answer with its own two-word pattern."""
    words = list(STYLE_WORDS)
    groups = {}
    for i in range(n):
        pattern = f"{words[i % len(words)]} {words[(3 * i + 1) % len(words)]}"
        groups[f"tiny{i:02d}"] = [PersonalRecord(f"tiny{i:02d}", f"tell me about thing {j}", f"{pattern} {j}. " * 3)
                                  for j in range(6)]
    lora = LoraSettings(rank=4, alpha=8.0, steps=12, lr=0.02, batch_size=2, max_len=32, seed=seed)
    return build_catalog_from_labels(folder, groups, TINY, lora, list(TINY_PROBES), ExplainSettings(STYLE_WORDS[:8]),
                                     max_new_tokens=8, built_from={name: f"pattern {name}" for name in groups})
