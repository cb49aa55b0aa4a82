"""The build both kinds of seeds go through: write each seed, answer the probes, explain, retrain misread seeds.

A build is resumable: each seed's folder and its probe answers are written as soon as they exist, and a rerun
with the same settings skips the seeds whose folders still hash to the answers stored beside them
(catalog_build.state). catalog.json is written once, at the end, when every seed can be explained together:
the vocabulary, the attribute basis and the noise scale are catalog-wide.
"""

from __future__ import annotations

import re
from pathlib import Path

from catalog_build.answers import answer_base, answer_seed
from catalog_build.explaining import explain_catalog
from catalog_build.layout import RETRAINING_DIR, write_seed
from catalog_build.retraining import retrain_misread, warn_misread
from catalog_build.settings import ExplainSettings, SeedJob
from catalog_build.state import check_settings, known_hashes, seed_state
from participants.progress import log, progress
from protocols.catalog import SEEDS_DIR, Catalog
from protocols.explanations import Embed
from protocols.records import PersonalRecord
from protocols.seeds import SEED_FILE, SeedDescriptor, materialize, read_seed_file

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def plain_base(source: str) -> SeedDescriptor:
    """The base, materialized; a local folder is named by its absolute path so seed.json works from anywhere."""
    if Path(source).expanduser().is_dir() and not (Path(source).expanduser() / SEED_FILE).is_file():
        source = str(Path(source).expanduser().resolve())
    base = materialize(source)
    if base.delta is not None:
        raise ValueError(f"{source} is a catalog seed; a catalog's base must be a plain model (its own base, "
                         f"{read_seed_file(source)['base']!r})")
    return base


def build_catalog(out: Path, base: SeedDescriptor, jobs: list[SeedJob], probes: list[str], explain: ExplainSettings,
                  max_new_tokens: int, extra: dict, embed: Embed, batch_size: int,
                  corpus: dict[str, list[PersonalRecord]] | None = None) -> Catalog:
    """Every job's seed built (or found on disk), answered and explained; `extra` is what the seeds are made
    from, recorded in build.json; `corpus` the labeled groups' records by label, for corpus attributes."""
    explain.check(embed)
    if explain.corpus and not corpus:
        raise ValueError("corpus attributes are embedded from labeled groups; a catalog built from a pool has none "
                         "(leave out --corpus-words)")
    if not probes:
        raise ValueError("no probe prompts: an explanation compares a seed's answers with the base's on probes")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    bad = [j.name for j in jobs if not _NAME.fullmatch(j.name)]
    if bad:
        raise ValueError(f"seed names become folder names: use letters, digits, '.', '_' and '-' only, not "
                         f"{', '.join(map(repr, bad))}")
    settings = {"format": 1, "base": base.seed_id, "base_hash": base.content_hash, "probes": probes,
                "max_new_tokens": max_new_tokens,
                "embed": f"{embed.__module__}.{getattr(embed, '__qualname__', repr(embed))}"} | extra
    check_settings(out, settings, explain.to_dict())
    known = known_hashes(out)
    for waiting in sorted((out / RETRAINING_DIR).glob("*")):  # a build stopped while a seed was trained again
        if not (out / SEEDS_DIR / waiting.name).exists():
            waiting.rename(out / SEEDS_DIR / waiting.name)  # its first version stands until the retraining is redone
    base_answers: dict[str, str] | None = None
    with progress(len(jobs), "seed catalog") as bar:
        for job in jobs:
            folder = out / SEEDS_DIR / job.name
            state = seed_state(folder, job, probes, max_new_tokens, known)
            if state == "done":
                log.info("seed %s: already built and answered, skipped", job.name)
                bar.update(seed=job.name)
                continue
            if state == "build":
                write_seed(folder, job.name, base, *job.make_weights(), job.built_from, job.fingerprint)
            if base_answers is None:
                base_answers = answer_base(out, base, jobs, probes, max_new_tokens, batch_size)
            answer_seed(folder, job.name, probes, base_answers, max_new_tokens, batch_size, known.get(job.name))
            bar.update(seed=job.name)
    catalog = explain_catalog(out, base, jobs, probes, max_new_tokens, explain, embed, batch_size, corpus)
    if explain.corpus:
        catalog = retrain_misread(out, base, jobs, probes, max_new_tokens, explain, embed, batch_size, corpus,
                                  catalog)
        warn_misread(out, catalog, jobs)
    return catalog
