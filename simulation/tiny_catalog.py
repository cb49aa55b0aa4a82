"""A catalog of many tiny-model seeds, to measure how selection cost grows with the catalog's size.

Each seed is the tiny random Llama plus a LoRA trained on its own made-up answer pattern, explained like any
seed (probe answers against the base's, over the text basis); what is measured is the cost of choosing among
them, which depends on how many there are, not on how good a tiny model is.
"""

from __future__ import annotations

from pathlib import Path

from participants.lora_training import LoraSettings
from protocols.catalog import Catalog
from protocols.explanations import STYLE_WORDS
from protocols.records import PersonalRecord
from protocols.seeds import TINY
from simulation.seed_building import ExplainSettings, build_catalog_from_labels

PROBES = ("what is a tree?", "how do boats float?", "why is the sky blue?", "name a fruit.")


def build_tiny_catalog(folder: str | Path, n: int, seed: int = 0) -> Catalog:
    """n tiny seeds ("tiny00", "tiny01", …), each trained to answer with its own two-word pattern."""
    words = [w for w in STYLE_WORDS]
    groups = {}
    for i in range(n):
        pattern = f"{words[i % len(words)]} {words[(3 * i + 1) % len(words)]}"
        groups[f"tiny{i:02d}"] = [PersonalRecord(f"tiny{i:02d}", f"tell me about thing {j}", f"{pattern} {j}. " * 3)
                                  for j in range(6)]
    lora = LoraSettings(rank=4, alpha=8.0, steps=12, lr=0.02, batch_size=2, max_len=32, seed=seed)
    return build_catalog_from_labels(folder, groups, TINY, lora, list(PROBES), ExplainSettings(STYLE_WORDS[:8]),
                                     max_new_tokens=8, built_from={name: f"pattern {name}" for name in groups})
