"""The profile a participant reveals: real MiniLM embeddings, a count and a clipped, DP-noised unit vector."""

from __future__ import annotations

import math

import numpy as np
import pytest

from participants.gaussian_mechanism import gaussian_sigma
from participants.profile import clipped_mean, embed_texts, noised_profile, unit_profile
from protocols.records import PersonalRecord


def test_minilm_embeddings_and_the_dp_profile():
    texts = ["A cat is sleeping on the sofa.", "A kitten naps on the couch.", "Interest rates rose again today."]
    vectors = embed_texts(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3  # the model understands, not just hashes

    records = [PersonalRecord("u", "Tell me about cats.", text) for text in texts[:2]]
    mean = unit_profile(records)

    # a huge ε: almost no noise, the release is the mean's direction
    loose = noised_profile(records, rng=np.random.default_rng(0), clip_norm=1.0, epsilon=1e4, delta=1e-5)
    assert loose.count == 2 and loose.embedding.shape == (384,) and loose.embedding.dtype == np.float32
    assert abs(np.linalg.norm(loose.embedding) - 1.0) < 1e-5 and loose.embedding @ mean > 0.98
    # the noise is the analytic Gaussian mechanism's for Δ = 2C/n (replace-one neighbours), reported with (ε, δ)
    release = noised_profile(records, rng=np.random.default_rng(0), clip_norm=0.5, epsilon=2.0, delta=1e-6)
    assert (release.epsilon, release.delta) == (2.0, 1e-6)
    assert release.sigma == pytest.approx(gaussian_sigma(2.0, 1e-6, 2 * 0.5 / 2))
    again = noised_profile(records, rng=np.random.default_rng(0), clip_norm=0.5, epsilon=2.0, delta=1e-6)
    np.testing.assert_array_equal(release.embedding, again.embedding)  # the randomness is the rng's, nothing else


def test_each_record_is_clipped_before_the_mean():
    rows = np.array([[3.0, 4.0], [0.3, 0.4]])
    np.testing.assert_allclose(clipped_mean(rows, 1.0), [(0.6 + 0.3) / 2, (0.8 + 0.4) / 2])
    assert np.linalg.norm(clipped_mean(rows, 0.1)) <= 0.1 + 1e-12


def test_the_analytic_gaussian_mechanism():
    # the exact condition holds at the returned σ and fails just below it
    from scipy.stats import norm

    def gap(sigma, eps, sens):
        a, b = sens / (2 * sigma), eps * sigma / sens
        return norm.cdf(a - b) - math.exp(eps) * norm.cdf(-a - b)

    for eps, delta, sens in [(0.5, 1e-5, 1.0), (1.0, 1e-5, 0.25), (8.0, 1e-6, 2.0)]:
        sigma = gaussian_sigma(eps, delta, sens)
        assert gap(sigma, eps, sens) <= delta < gap(0.99 * sigma, eps, sens)
        if eps < 1:  # tighter than the classic mechanism where that one applies
            assert sigma < sens * math.sqrt(2 * math.log(1.25 / delta)) / eps
    assert gaussian_sigma(1.0, 1e-5, 1.0) == pytest.approx(3.7306, rel=1e-3)  # Balle & Wang's Fig. 1 region
    assert gaussian_sigma(1.0, 1e-5, 0.0) == 0.0
    for bad in [(0.0, 1e-5, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, 1.0), (float("inf"), 1e-5, 1.0)]:
        with pytest.raises(ValueError):
            gaussian_sigma(*bad)
