"""On-device seed selection (XPerT): explain the participant's own style in attribute words, pick the nearest seed.

The device compares its own answers with what the base model says to the same inputs, writes the difference
in the catalog's attribute words, and takes the seed whose explanation has the nearest mix of attributes (L1
between the coefficients as shares, `explanations.mix_distance`). Only the explanations of the seeds are
needed, never their weights, so choosing among many seeds costs no more than among a few; and the user's
texts never leave `own_style`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from participants.chat_data import clip_to_tokens
from participants.evaluation import generate
from participants.profile import embed_texts
from participants.progress import progress
from participants.seed_loading import LoadedSeed
from protocols import explanations
from protocols.catalog import Catalog
from protocols.explanations import AttributeBasis, Explanation, decompose, describe, mix_distance
from protocols.records import PersonalRecord

STYLE_INSTRUCTION = "Answer in a {word} style."


@dataclass
class Selection:
    seed_id: str | None  # None: no seed is near enough, keep the base
    distance: float  # mix distance (L1 between shares, 0..2) to the nearest seed; inf for an empty catalog
    distances: dict[str, float]
    reason: str
    direction: np.ndarray | None = None  # the own style direction the explanation was decomposed from


def difference_direction(own_texts: list[str], reference_texts: list[str]) -> np.ndarray:
    """Mean MiniLM embedding of own texts minus that of the reference texts (paired by input)."""
    return explanations.difference_direction(own_texts, reference_texts, embed_texts)


def attribute_basis(seed: LoadedSeed, probes: list[str], words: Sequence[str] = explanations.STYLE_WORDS,
                    *, max_new_tokens: int, batch_size: int = 8) -> AttributeBasis:
    """Per word w: the difference between the model's answers to "Answer in a w style." + probe and its plain
    answers, the same difference that explains a seed, so that seeds and users are written in one basis."""
    prompts = [f"{STYLE_INSTRUCTION.format(word=w)}\n\n{p}" for w in words for p in probes] + list(probes)
    records = [PersonalRecord(user="probe", input=prompt, output="") for prompt in prompts]
    answers: list[str] = []
    with progress(len(records), "attribute basis: generating") as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            answers.extend(generate(seed, chunk, max_new_tokens=max_new_tokens, batch_size=batch_size))
            bar.update(len(chunk))
    plain = answers[len(words) * len(probes):]
    vectors = [difference_direction(answers[i * len(probes):(i + 1) * len(probes)], plain) for i in range(len(words))]
    return AttributeBasis(tuple(words), np.stack(vectors))


def own_style(seed: LoadedSeed, records: list[PersonalRecord], basis: AttributeBasis,
              *, max_new_tokens: int) -> Explanation:
    """The participant's style: its own answers against the base model's answers to the same inputs.

    Own answers are cut to the same `max_new_tokens` tokens that the base answers (and the seeds' probe
    answers) get, so that a difference in length cut-off does not pass for a difference in style.
    """
    return decompose(own_direction(seed, records, max_new_tokens=max_new_tokens), basis)


def own_direction(seed: LoadedSeed, records: list[PersonalRecord], *, max_new_tokens: int) -> np.ndarray:
    """The difference between the own answers (cut to `max_new_tokens`) and the base's, in MiniLM space."""
    base_answers = generate(seed, records, max_new_tokens=max_new_tokens)
    own = [clip_to_tokens(seed.tokenizer, r.output, max_new_tokens) for r in records]
    return difference_direction(own, base_answers)


def select_seed(own: Explanation, catalog: dict[str, Explanation], words: Sequence[str],
                max_distance: float = math.inf, distance=mix_distance) -> Selection:
    """The seed whose mix of attributes is nearest to `own`'s (L1 over `words`; ties: the smaller id), or none
    when even the nearest is farther than `max_distance`; the reason says both in words. `distance` is there
    for the seeds bench, which replays the choice with raw-coefficient L1 to compare."""
    distances = {seed_id: distance(own, expl, words) for seed_id, expl in catalog.items()}
    reads = f"your data reads as: {describe(own)}"
    if not distances:
        return Selection(None, math.inf, {}, f"{reads}; the catalog is empty, falling back to the base")
    nearest = min(distances, key=lambda s: (distances[s], s))
    gap = distances[nearest]
    if gap > max_distance:
        return Selection(None, gap, distances, f"{reads}; no seed is near (nearest: {nearest}, mix L1 {gap:.2f} > "
                                              f"{max_distance:.2f}); falling back to the base")
    return Selection(nearest, gap, distances, f"{reads}; nearest seed: {nearest}, which reads as: "
                                              f"{describe(catalog[nearest])}; mix L1 {gap:.2f}")


def choose_from_catalog(base: LoadedSeed, records: list[PersonalRecord], catalog: Catalog,
                        max_distance: float = math.inf) -> tuple[Selection, Explanation]:
    """XPerT on the device: the own style in the catalog's words (one generation pass of the base over the own
    inputs, whatever the catalog's size), then the nearest seed's name, or None to keep the base."""
    if base.descriptor.content_hash != catalog.base_hash:
        raise ValueError(f"the catalog explains seeds of base {catalog.base!r} ({catalog.base_hash[:12]}…), but this "
                         f"device runs {base.descriptor.seed_id!r} ({base.descriptor.content_hash[:12]}…)")
    direction = own_direction(base, records, max_new_tokens=catalog.max_new_tokens)
    own = decompose(direction, catalog.basis)
    selection = select_seed(own, catalog.explanations(), catalog.words, max_distance)
    selection.direction = direction
    return selection, own
