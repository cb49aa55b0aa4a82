"""Seeds from labeled groups of records (a style's answers, a user of a JSONL file): one LoRA per group,
trained from the base on the group's records, then built, answered and explained like any seed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from catalog_build.build import build_catalog, plain_base
from catalog_build.settings import ExplainSettings, SeedJob
from coordinator.explain_seed import minilm_embed
from participants.lora_training import ALL_PROJECTIONS, LoraSettings, LoraWeights, train_private_lora
from participants.progress import log
from participants.seed_loading import load_seed
from protocols.catalog import Catalog
from protocols.explanations import Embed
from protocols.records import PersonalRecord
from protocols.seeds import DEFAULT_SEED, SeedDescriptor


def build_catalog_from_labels(out: str | Path, groups: dict[str, list[PersonalRecord]],
                              base_source: str = DEFAULT_SEED, lora: LoraSettings | None = None,
                              probes: Sequence[str] = (), explain: ExplainSettings = ExplainSettings(),
                              max_new_tokens: int = 256, built_from: dict[str, str] | None = None,
                              embed: Embed = minilm_embed, batch_size: int = 8,
                              labels: dict[str, str] | None = None, retrain_misread: bool = True,
                              stronger: LoraSettings | None = None) -> Catalog:
    """One seed per group: a LoRA trained from the base on the group's records, then explained.

    `labels` names each group's style in words for the corpus attributes (`ExplainSettings.corpus`; default:
    the group's name). With corpus attributes, a seed that reads most as another group's label is trained
    again (unless `retrain_misread` is off) with `stronger` (default: the same LoRA on every projection of the
    block, not only attention, for twice the steps), and the version that reads more as its own label is kept
    (catalog_build.retraining).

    Probe prompts must not be inputs a seed trains on: a seed would answer them from memory, and its
    explanation would describe its training answers rather than how it answers in general.
    """
    lora = lora or LoraSettings()
    # on styleqa the misread seed needed both: all projections at the same steps read as its label by a hair
    # (own label 0.17 against 0.16), at twice the steps clearly (0.43); more steps on attention alone did not
    stronger = stronger or replace(lora, targets=ALL_PROJECTIONS, steps=2 * lora.steps)
    if not groups:
        raise ValueError("no groups to build seeds from; give at least one group of records")
    empty = [name for name, records in groups.items() if not records]
    if empty:
        raise ValueError(f"groups {', '.join(empty)} have no records; a seed needs something to learn from")
    trained = {r.input for records in groups.values() for r in records}
    overlap = [p for p in probes if p in trained]
    if overlap:
        raise ValueError(f"{len(overlap)} probe prompt(s) are also training inputs of a seed, e.g. "
                         f"{overlap[0][:60]!r}; probes must be questions no seed trains on")
    base = plain_base(base_source)
    built_from = built_from or {}
    wide = "all 7 projections" if tuple(stronger.targets) == ALL_PROJECTIONS else "/".join(stronger.targets)
    stronger_words = f"trained again: LoRA on {wide}, {stronger.steps} steps"
    jobs = []
    for name, records in groups.items():
        jobs.append(SeedJob(name, built_from.get(name, f"{len(records)} labeled records"),
                            _records_fingerprint(records), partial(_train_seed, base, name, records, lora,
                                                                   f"LoRA, {lora.steps} steps"),
                            make_stronger=partial(_train_seed, base, name, records, stronger, stronger_words)
                            if retrain_misread else None, stronger=stronger_words))
    settings = {"from": "labels", "lora": json.loads(json.dumps(asdict(lora)))}
    labels = labels or {}
    jobs = [replace(job, label=labels.get(job.name, job.name)) for job in jobs]
    corpus = {job.label: groups[job.name] for job in jobs}
    if len(corpus) != len(groups):
        raise ValueError("two groups share a label; corpus attributes need one label per group")
    return build_catalog(Path(out), base, jobs, list(probes), explain, max_new_tokens, settings, embed, batch_size,
                         corpus)


def _train_seed(base: SeedDescriptor, name: str, records: list[PersonalRecord], lora: LoraSettings,
                what: str) -> tuple[LoraWeights, int, float]:
    weights, report = train_private_lora(load_seed(base.seed_id), records, lora, desc=f"seed {name}: {what}")
    log.info("seed %s: %s, trained in %.0f s (loss %.3f -> %.3f)", name, what, report.seconds, report.losses[0],
             report.losses[-1])
    return weights, lora.rank, lora.alpha


def _records_fingerprint(records: Sequence[PersonalRecord]) -> str:
    data = json.dumps([[r.input, r.output] for r in records], ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()
