"""Style words proposed by the base model: read off its next-word distribution, ranked per seed."""

from __future__ import annotations

from collections import Counter

import pytest

from participants.word_proposal import propose_words, proposed_vocabulary


def test_the_vocabulary_takes_each_seeds_best_new_words_in_turn():
    per_seed = {"b": Counter({"formal": 0.5, "typical": 0.4, "dry": 0.1}),
                "a": Counter({"typical": 0.6, "playful": 0.3, "concise": 0.2})}
    # "concise" is known already; a word two seeds share is taken once; seeds alternate (sorted by name)
    assert proposed_vocabulary(per_seed, known=("concise",), per_seed_words=2) == ["typical", "formal", "playful",
                                                                                   "dry"]
    assert proposed_vocabulary(per_seed, known=("concise",), per_seed_words=2, limit=2) == ["typical", "formal"]
    assert proposed_vocabulary({}, known=()) == []


@pytest.mark.integration  # the real embedded model
def test_the_embedded_model_proposes_lowercase_words_with_probabilities():
    from participants.seed_loading import load_seed
    from protocols.seeds import DEFAULT_SEED

    pairs = [("The sky is blue because air scatters blue light most.",
              "Wow!!! The sky is SO blue, because air LOVES scattering blue light!!! 🌈")]
    words = propose_words(load_seed(DEFAULT_SEED), pairs, first_tokens=6, answer_tokens=32, word_tokens=3)
    assert words, "a real model names some style"
    assert all(w == w.lower() and w.replace("-", "").isalpha() and len(w) >= 4 for w in words)
    assert all(0.0 < p <= len(pairs) for p in words.values())
    assert not {"answer", "second", "style"} & set(words), "words the question itself uses are not styles"
