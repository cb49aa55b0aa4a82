"""Explaining the seeds: once every seed has its probe answers, the vocabulary, the attribute basis, the noise
scale and every seed's explanation, written as catalog.json.

This is the only step that depends on the explanation settings, so changing them re-explains a catalog without
retraining or re-answering anything. The basis comes from hand-written exemplars (text), from the base
answering the probes in each word's style (model), plus one attribute per labeled group from the group's own
answers (corpus); what the base generates for them is cached in the build folder.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from catalog_build.layout import ANSWERS_FILE, BASIS_FILE, CORPUS_FILE, PROPOSALS_FILE
from catalog_build.settings import ExplainSettings, SeedJob
from participants.chat_data import clip_to_tokens
from participants.evaluation import generate
from participants.progress import log, progress
from participants.seed_loading import load_seed
from participants.style_direction import STYLE_INSTRUCTION
from participants.word_proposal import propose_words, proposed_vocabulary
from protocols.attribute_words import text_basis
from protocols.catalog import SEEDS_DIR, Catalog, CatalogEntry
from protocols.explanations import (
    AttributeBasis,
    Embed,
    decompose,
    difference_direction,
    noise_scale,
    paired_differences,
)
from protocols.files import write_json
from protocols.records import PersonalRecord
from protocols.seeds import DELTA_DIR, SeedDescriptor, read_seed_file

PROPOSAL_PAIRS = 4  # probe pairs per seed the base is asked to name the style of


def explain_catalog(out: Path, base: SeedDescriptor, jobs: Sequence[SeedJob], probes: list[str],
                    max_new_tokens: int, explain: ExplainSettings, embed: Embed, batch_size: int,
                    corpus: dict[str, list[PersonalRecord]] | None = None) -> Catalog:
    """Every seed explained from its stored probe answers, written as catalog.json (model-basis answers are
    cached in basis_answers.json, corpus answers in corpus_answers.json)."""
    answers = {job.name: json.loads((out / SEEDS_DIR / job.name / ANSWERS_FILE).read_text()) for job in jobs}
    kept = prose_probes(next(iter(answers.values()))["base"], explain.min_probe_words)
    differences = {name: paired_differences([a["seed"][i] for i in kept], [a["base"][i] for i in kept], embed)
                   for name, a in answers.items()}
    vocabulary = list(explain.words)
    if explain.propose_words:
        proposals = {}
        with progress(len(answers), "words proposed by the base") as bar:
            for name, a in answers.items():
                proposals[name] = _proposals(out / SEEDS_DIR / name, base, a)
                bar.update(seed=name)
        vocabulary += proposed_vocabulary(proposals, vocabulary, limit=explain.propose_words)
        log.info("words proposed by the base for the seeds: %s", ", ".join(vocabulary[len(explain.words):]))
    if explain.basis == "text":
        vectors = text_basis(tuple(vocabulary), embed).vectors
    else:
        # the base's plain answers to these probes are already stored beside every seed
        n = explain.basis_probes
        plain = next(iter(answers.values()))["base"][:n]
        vectors = _model_basis(out, base, probes[:n], plain, vocabulary, max_new_tokens, embed, batch_size)
    if explain.corpus:
        labels = [label for label in corpus if label not in vocabulary]
        if labels:
            vectors = np.vstack([vectors, _corpus_basis(out, base, {k: corpus[k] for k in labels}, max_new_tokens,
                                                        embed, batch_size)])
            vocabulary += labels
    groups = [d for d in differences.values() if len(d) > 1]
    basis = AttributeBasis(tuple(vocabulary), vectors, noise_scale(groups) if explain.scaled and groups else None)
    entries = []
    for job in jobs:
        folder = out / SEEDS_DIR / job.name
        delta_bytes = sum(f.stat().st_size for f in (folder / DELTA_DIR).glob("*.safetensors"))
        built_from = read_seed_file(folder).get("built_from", job.built_from)  # says so when it was retrained
        entries.append(CatalogEntry(job.name, answers[job.name]["content_hash"],
                                    decompose(differences[job.name].mean(axis=0), basis), built_from, delta_bytes))
    catalog = Catalog(out, base.seed_id, base.content_hash, basis, [probes[i] for i in kept], max_new_tokens,
                      sorted(entries, key=lambda e: e.name))
    catalog.save()
    return catalog


def prose_probes(base_answers: Sequence[str], min_words: int) -> list[int]:
    """Indices of the probes whose base answer has at least `min_words` words (all of them for 0)."""
    kept = [i for i, answer in enumerate(base_answers) if len(answer.split()) >= min_words]
    if not kept:
        raise ValueError(f"none of the {len(base_answers)} probes has a base answer of {min_words} words or more: "
                         f"lower --min-probe-words or add --probes")
    return kept


def _proposals(folder: Path, base: SeedDescriptor, answers: dict) -> Counter[str]:
    """The base's proposed style words for one seed (its first probe pairs), cached beside the seed."""
    pairs = list(zip(answers["base"], answers["seed"]))[:PROPOSAL_PAIRS]
    key = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()
    path = folder / PROPOSALS_FILE
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return Counter(cached["words"])
    words = propose_words(load_seed(base.seed_id), pairs)
    write_json(path, {"key": key, "words": dict(words.most_common())})
    return words


def _model_basis(out: Path, base: SeedDescriptor, probes: list[str], plain: list[str], words: list[str],
                 max_new_tokens: int, embed: Embed, batch_size: int) -> np.ndarray:
    """Per word, the base's answers to "Answer in a <word> style." + probe against its `plain` answers (as the
    devices embed them); the styled answers are cached per word, so adding a word generates only that word's."""
    path = out / BASIS_FILE
    key = {"base_hash": base.content_hash, "probes": probes, "max_new_tokens": max_new_tokens}
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if cache.get("key") != key:
        cache = {"key": key, "styled": {}}
    todo = [w for w in words if w not in cache["styled"]]
    if todo:
        model = load_seed(base.seed_id)
        with progress(len(todo), "attribute basis") as bar:
            for word in todo:
                prompts = [f"{STYLE_INSTRUCTION.format(word=word)}\n\n{p}" for p in probes]
                cache["styled"][word] = generate(model, [PersonalRecord("probe", q, "") for q in prompts],
                                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
                write_json(path, cache)
                bar.update(word=word)
    return np.stack([difference_direction(cache["styled"][w], plain, embed) for w in words])


def _corpus_basis(out: Path, base: SeedDescriptor, corpus: dict[str, list[PersonalRecord]], max_new_tokens: int,
                  embed: Embed, batch_size: int) -> np.ndarray:
    """Per label, its records' real answers (cut to `max_new_tokens` tokens, as a device cuts its own) against
    the base's answers to the same inputs. The base answers each distinct input once (labeled groups often
    share their questions), cached in corpus_answers.json."""
    path = out / CORPUS_FILE
    key = {"base_hash": base.content_hash, "max_new_tokens": max_new_tokens}
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if cache.get("key") != key:
        cache = {"key": key, "answers": {}}
    model = load_seed(base.seed_id)
    inputs = (r.input for records in corpus.values() for r in records)
    todo = list(dict.fromkeys(q for q in inputs if q not in cache["answers"]))
    with progress(len(todo), "corpus attributes: base answers") as bar:
        for start in range(0, len(todo), batch_size * 4):
            chunk = todo[start:start + batch_size * 4]
            answers = generate(model, [PersonalRecord("corpus", q, "") for q in chunk], max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
            cache["answers"].update(zip(chunk, answers))
            write_json(path, cache)
            bar.update(len(chunk))
    vectors = []
    for records in corpus.values():
        own = [clip_to_tokens(model.tokenizer, r.output, max_new_tokens) for r in records]
        vectors.append(difference_direction(own, [cache["answers"][r.input] for r in records], embed))
    return np.stack(vectors)
