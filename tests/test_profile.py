"""The profile a participant reveals: real MiniLM embeddings, a count and a noised unit vector."""

from __future__ import annotations

import numpy as np

from participants.profile import embed_texts, noised_profile
from protocols.records import PersonalRecord


def test_minilm_embeddings_and_noised_profile():
    texts = ["A cat is sleeping on the sofa.", "A kitten naps on the couch.", "Interest rates rose again today."]
    vectors = embed_texts(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3  # the model understands, not just hashes

    records = [PersonalRecord("u", "Tell me about cats.", text) for text in texts[:2]]
    mean = embed_texts([f"{r.input}\n{r.output}" for r in records]).mean(axis=0)
    mean /= np.linalg.norm(mean)

    count, exact = noised_profile(records, rng=np.random.default_rng(0), noise_std=0.0)
    assert count == 2
    np.testing.assert_allclose(exact, mean, atol=1e-5)

    count, noised = noised_profile(records, rng=np.random.default_rng(0), noise_std=0.01)
    assert count == 2 and noised.shape == (384,) and noised.dtype == np.float32
    assert abs(np.linalg.norm(noised) - 1.0) < 1e-5
    assert 0.9 < noised @ mean < 0.999  # close to the mean, but noised
    _, again = noised_profile(records, rng=np.random.default_rng(0), noise_std=0.01)
    np.testing.assert_array_equal(noised, again)
