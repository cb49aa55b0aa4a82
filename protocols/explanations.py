"""Explained styles (XPerT): what both sides compute identically to turn a style difference into words.

A style difference is a direction in the sentence-embedding space: the mean embedding of the stylized answers
minus the mean embedding of the plain answers to the same inputs. An `AttributeBasis` holds one such direction
per named attribute ("expert", "concise", …). An `Explanation` writes a difference as non-negative amounts of
those attributes, so that a seed's explanation and a participant's own style are comparable numbers a person
can read, and the nearest seed is found by the L1 distance between their mixes (the coefficients as shares
of their sum, see `mix_distance`).

The coordinator explains its seeds and the device explains its own data with these same functions; only the
texts and the embedder are supplied by each side, so no model code lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls  # scipy comes with scikit-learn, already a dependency

STYLE_WORDS: tuple[str, ...] = (
    "expert", "elementary", "concise", "informative", "friendly", "formal", "neutral", "humorous",
    "sarcastic", "poetic", "enthusiastic", "technical", "casual", "persuasive", "empathetic", "academic",
)

Embed = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True, eq=False)
class AttributeBasis:
    """One difference direction per attribute word, rows of `vectors` in the order of `words`.

    `scale`, when given, is how much each embedding dimension varies from one answer pair to the next for one
    and the same style (`noise_scale`). Explanations are fitted in units of it, so that dimensions where the
    topic of a question moves the embedding a lot weigh less than those where only the style does.
    """

    words: tuple[str, ...]
    vectors: np.ndarray
    scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        vectors = np.asarray(self.vectors, dtype=np.float64)
        if self.scale is not None:
            scale = np.asarray(self.scale, dtype=np.float64)
            if scale.shape != (vectors.shape[-1],) or not np.isfinite(scale).all() or (scale <= 0).any():
                raise ValueError(f"the scale must be one positive number per dimension ({vectors.shape[-1]}), "
                                 f"got shape {scale.shape}")
            object.__setattr__(self, "scale", scale)
        if len(set(self.words)) != len(self.words):
            raise ValueError(f"the attribute words must be distinct, got {list(self.words)}")
        if vectors.ndim != 2 or vectors.shape[0] != len(self.words):
            raise ValueError(f"need one vector per word: {len(self.words)} words, vectors of shape {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("the attribute vectors must be finite")
        object.__setattr__(self, "words", tuple(self.words))
        object.__setattr__(self, "vectors", vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def scaled(self, direction: np.ndarray) -> np.ndarray:
        """A direction (or rows of them) in units of the noise scale."""
        return direction if self.scale is None else direction / self.scale

    def to_dict(self) -> dict:
        out = {"words": list(self.words), "vectors": self.vectors.tolist()}
        if self.scale is not None:
            out["scale"] = self.scale.tolist()
        return out

    @classmethod
    def from_dict(cls, obj: dict) -> AttributeBasis:
        scale = obj.get("scale")
        return cls(tuple(obj["words"]), np.asarray(obj["vectors"], dtype=np.float64),
                   None if scale is None else np.asarray(scale, dtype=np.float64))


@dataclass(frozen=True)
class Explanation:
    """Non-negative amount of each attribute (largest first; absent words are 0) and the relative residual
    ||d − Σ z·e|| / ||d|| that the attributes leave unexplained."""

    coefficients: dict[str, float]
    residual: float

    @property
    def strength(self) -> float:
        """Σ z: how far the style is from the base's, in attribute units."""
        return float(sum(self.coefficients.values()))

    def mix(self) -> Explanation:
        """The same explanation with its coefficients as shares of their sum (no attribute: no coefficient)."""
        total = self.strength
        return Explanation({w: z / total for w, z in self.coefficients.items()} if total > 0 else {}, self.residual)

    def to_dict(self) -> dict:
        return {"coefficients": dict(self.coefficients), "residual": self.residual}

    @classmethod
    def from_dict(cls, obj: dict) -> Explanation:
        return cls({str(w): float(z) for w, z in obj["coefficients"].items()}, float(obj["residual"]))


def paired_differences(own_texts: Sequence[str], reference_texts: Sequence[str], embed: Embed) -> np.ndarray:
    """One row per input: the embedding of the own answer minus that of the reference answer to it."""
    if not own_texts or len(own_texts) != len(reference_texts):
        raise ValueError(
            f"need paired, non-empty answers to the same inputs, got {len(own_texts)} and {len(reference_texts)}"
        )
    own = np.asarray(embed(list(own_texts)), dtype=np.float64)
    reference = np.asarray(embed(list(reference_texts)), dtype=np.float64)
    return own - reference


def difference_direction(own_texts: Sequence[str], reference_texts: Sequence[str], embed: Embed) -> np.ndarray:
    """Mean embedding of `own_texts` minus mean embedding of `reference_texts` (answers to the same inputs).

    Pairing the texts by input cancels what the answers are about and leaves how they are written.
    """
    return paired_differences(own_texts, reference_texts, embed).mean(axis=0)


def noise_scale(groups: Sequence[np.ndarray], floor: float = 0.25) -> np.ndarray:
    """Per dimension, the spread of paired differences around their own group's mean, pooled over groups.

    Each group holds the per-input differences of one style (a seed's probe answers against the base's), so
    what varies within a group is the question, not the style: the noise a 16-item history averages over.
    Dimensions are floored at `floor` times the median spread, so a dimension that barely moved on the
    probes cannot dominate a fit.
    """
    centered = [np.asarray(g, dtype=np.float64) - np.asarray(g, dtype=np.float64).mean(axis=0) for g in groups
                if len(g) > 1]
    if not centered:
        raise ValueError("a noise scale needs at least one group of two or more paired differences")
    spread = np.vstack(centered).std(axis=0)
    return np.maximum(spread, floor * float(np.median(spread)) + 1e-12)


def decompose(direction: np.ndarray, basis: AttributeBasis, max_terms: int | None = None,
              tol: float = 0.05) -> Explanation:
    """Write `direction` as Σ z_w · e_w with z_w ≥ 0 over few attribute words.

    Forward selection with a non-negative least-squares refit (OMP-like): each step adds the word whose NNLS
    refit together with the words already chosen leaves the smallest residual, and drops words the refit sets
    to zero; it stops when the relative residual is below `tol`, `max_terms` words are in use, or no word
    lowers the residual. Why not the authors' scalar projections ⟨d, e⟩/||e||: attribute directions correlate
    (expert and technical, friendly and enthusiastic), and independent projections count their shared part
    once per word, so they are biased; a joint fit is not. Non-negativity makes a coefficient read as "how
    much of this attribute" (1 = as much as the basis shows for that word) and keeps explanations sparse.
    Ties go to the earlier word, so the result is deterministic. With a `basis.scale`, the fit and the
    residual are computed in units of the noise scale.
    """
    d = np.asarray(direction, dtype=np.float64)
    if d.shape != (basis.dim,):
        raise ValueError(f"direction of shape {d.shape} does not match the basis dimension {basis.dim}")
    d, vectors = basis.scaled(d), basis.scaled(basis.vectors)
    norm = float(np.linalg.norm(d))
    if norm == 0.0:
        return Explanation({}, 0.0)
    limit = len(basis.words) if max_terms is None else min(max_terms, len(basis.words))
    chosen: list[int] = []
    weights = np.zeros(0)
    residual = norm
    while len(chosen) < limit and residual / norm >= tol:
        best: tuple[list[int], np.ndarray, float] | None = None
        for j in range(len(basis.words)):
            if j in chosen:
                continue
            trial = chosen + [j]
            z, r = nnls(vectors[trial].T, d)
            if best is None or r < best[2]:
                best = (trial, z, r)
        if best is None or best[2] >= residual * (1.0 - 1e-12):
            break
        trial, z, residual = best
        chosen = [i for i, zi in zip(trial, z) if zi > 0.0]
        weights = z[z > 0.0]
    order = np.argsort(-weights, kind="stable")
    coefficients = {basis.words[chosen[i]]: float(weights[i]) for i in order}
    return Explanation(coefficients, residual / norm)


def l1_distance(a: Explanation, b: Explanation, words: Sequence[str]) -> float:
    """Σ_w |a_w − b_w| over the vocabulary, a word an explanation does not name counting as 0."""
    return float(sum(abs(a.coefficients.get(w, 0.0) - b.coefficients.get(w, 0.0)) for w in words))


def mix_distance(a: Explanation, b: Explanation, words: Sequence[str]) -> float:
    """L1 distance between the two mixes (0: the same attributes in the same shares; at most 2).

    Why the mix and not the raw coefficients: a seed's LoRA reproduces its style only in part, so its answers
    move less far from the base's than its users' own writing does (on styleqa the seeds' coefficients sum to
    0.3–0.8, the users' to 0.8–1.6). Raw L1 then charges every seed for that shortfall, most of all the
    strongest ones, and sends users to whichever seed is weakest; which attributes, in which shares, is what
    names a style.
    """
    return l1_distance(a.mix(), b.mix(), words)


def describe(expl: Explanation, top: int = 4) -> str:
    """The largest attributes in words, e.g. "expert 0.61, concise 0.32 (residual 0.21)"."""
    terms = sorted(expl.coefficients.items(), key=lambda item: -item[1])[:top]
    words = ", ".join(f"{w} {z:.2f}" for w, z in terms) or "no attribute"
    return f"{words} (residual {expl.residual:.2f})"
