"""Seeds that read as another seed's label: named, and trained once more with a wider LoRA.

With corpus attributes every labeled seed has its own label among the attribute words. A seed whose largest
label attribute is another seed's label sends users of its style elsewhere and draws users of the other
style. On styleqa it is the seed whose style the base imitates worst (expert-concise-friendly came out as
elementary and friendly), and a LoRA on attention alone is the first thing to widen: such a seed is trained
again with the stronger recipe, answered and explained again, and whichever version gives its own label the
larger share of its mix is kept. The outcome is written beside the seed (retrained.json), so that a rerun
does not train it a third time.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from catalog_build.answers import answer_base, answer_seed
from catalog_build.explaining import explain_catalog
from catalog_build.layout import RETRAINED_FILE, RETRAINING_DIR, write_seed
from catalog_build.settings import ExplainSettings, SeedJob
from participants.progress import log
from protocols.catalog import SEEDS_DIR, Catalog, CatalogEntry
from protocols.explanations import Embed, Explanation
from protocols.files import write_json
from protocols.records import PersonalRecord
from protocols.seeds import SeedDescriptor


def read_as_another_label(entries: Sequence[CatalogEntry], labels: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Seeds whose largest label attribute is another seed's label: name -> (own label, the label it reads as)."""
    known = set(labels.values())
    found = {}
    for entry in entries:
        own = labels.get(entry.name)
        named = {w: z for w, z in entry.explanation.coefficients.items() if w in known}
        top = max(named, key=named.get) if named else None
        if own is not None and top is not None and top != own:
            found[entry.name] = (own, top)
    return found


def own_label_share(explanation: Explanation, label: str) -> float:
    """How much of a seed's mix of attributes is its own label (0..1)."""
    return explanation.mix().coefficients.get(label, 0.0)


def reads_more_as_its_label(candidate: Explanation, incumbent: Explanation, label: str) -> bool:
    return own_label_share(candidate, label) > own_label_share(incumbent, label)


def retrain_misread(out: Path, base: SeedDescriptor, jobs: list[SeedJob], probes: list[str], max_new_tokens: int,
                    explain: ExplainSettings, embed: Embed, batch_size: int,
                    corpus: dict[str, list[PersonalRecord]] | None, catalog: Catalog) -> Catalog:
    """Train each misread labeled seed once more with its stronger recipe, and keep the version that reads more
    as its own label; the catalog explained with the kept versions."""
    labels = {job.name: job.label for job in jobs}
    misread = read_as_another_label(catalog.entries, labels)
    todo = [job for job in jobs if job.name in misread and job.make_stronger is not None
            and not (out / SEEDS_DIR / job.name / RETRAINED_FILE).is_file()]
    if not todo:
        return catalog
    first = {job.name: catalog.entry(job.name).explanation for job in todo}
    base_answers = answer_base(out, base, jobs, probes, max_new_tokens, batch_size)
    aside = out / RETRAINING_DIR
    for job in todo:
        folder = out / SEEDS_DIR / job.name
        log.info("seed %s reads most as %r, not as its own %r: %s", job.name, misread[job.name][1], job.label,
                 job.stronger)
        shutil.rmtree(aside / job.name, ignore_errors=True)
        aside.mkdir(parents=True, exist_ok=True)
        folder.rename(aside / job.name)  # the first version, until the two are compared
        write_seed(folder, job.name, base, *job.make_stronger(), f"{job.built_from}, {job.stronger}",
                   job.fingerprint)
        answer_seed(folder, job.name, probes, base_answers, max_new_tokens, batch_size, None)
    catalog = explain_catalog(out, base, jobs, probes, max_new_tokens, explain, embed, batch_size, corpus)
    restored = False
    for job in todo:
        folder = out / SEEDS_DIR / job.name
        retrained = catalog.entry(job.name).explanation
        shares = {"first": own_label_share(first[job.name], job.label),
                  "retrained": own_label_share(retrained, job.label)}
        kept = "retrained" if reads_more_as_its_label(retrained, first[job.name], job.label) else "first"
        if kept == "first":
            shutil.rmtree(folder)
            (aside / job.name).rename(folder)
            restored = True
        else:
            shutil.rmtree(aside / job.name)
        write_json(folder / RETRAINED_FILE, {"recipe": job.stronger, "kept": kept, "own_label_share": shares,
                                             "first": first[job.name].to_dict(), "retrained": retrained.to_dict()})
        log.info("seed %s: its own label's share of its mix was %.2f, retrained %.2f: the %s version is kept",
                 job.name, shares["first"], shares["retrained"], kept)
    shutil.rmtree(aside, ignore_errors=True)
    if restored:  # the catalog-wide noise scale is from every seed's answers, so explain the kept ones together
        catalog = explain_catalog(out, base, jobs, probes, max_new_tokens, explain, embed, batch_size, corpus)
    return catalog


def warn_misread(out: Path, catalog: Catalog, jobs: Sequence[SeedJob]) -> None:
    for name, (own, other) in read_as_another_label(catalog.entries, {j.name: j.label for j in jobs}).items():
        tried = (out / SEEDS_DIR / name / RETRAINED_FILE).is_file()
        log.warning("seed %s reads most as %r, another seed's label, not as its own %r: its answers do not show its "
                    "style, so devices of that style may miss it and devices of the other style may pick it%s", name,
                    other, own, " (trained again with more capacity too: see its retrained.json)" if tried else "")
