"""Self-supervised quality scores of a stream item, from the device model's own hidden states (SDSS: Qin et al.,
DAC 2024, as their released code computes them, with its bugs fixed).

One forward pass of the item's prompt through the backbone (the LM head is not needed) gives H, the last-layer
hidden states (after the final norm) of the prompt's tokens. With C the rows of H at the item's own words (not the
chat template's fixed tokens), n = |C|, and e = H[-1]:

    E(T) = e, the state of the prompt's last token (the authors' embedding)
    EOE  = -Σ_k p_k log2 p_k / log2(n + 1),  p_k = share of E(T)'s values in bin k of a 100-bin histogram
    DSS  = r_{d*},  r_d = share of C's rows nearest (cosine) to domain centroid c_d,  d* = argmax_d r_d
    IDD  = 1 - mean_{T' in bucket d*} cos(E(T) - μ, E(T') - μ)   (1 when the bucket is empty)

Higher is better for all three. Choices the research note leaves open, stated here:
  - What is scored is the item's input, as the chat template shows it to the model: the authors score
    instruction + input + output, but an item has no output before its owner annotates it.
  - Domains: the authors' lexicon files are not published. Here a domain is a region of the model's token-state
    space, one of D centroids learned online (MacQueen's k-means over the unit-length token states of every item
    the device sees), so a "lexicon" is the set of token states nearest to a centroid. The centroids start at
    farthest-point picks among the first tokens seen.
  - DSS is the dominant domain's share r_{d*}, how concentrated the item is in one domain. The authors average
    r_d over domains; with hard assignment that mean is always 1/D, and with their lexicons it measured how many
    words are domain words at all, not how specific the text is.
  - IDD is a dissimilarity, 1 - mean cosine (the authors' code returns the mean cosine, the opposite of its
    name), and on centered embeddings: decoder hidden states share a large common direction, which makes raw
    cosines all nearly 1. μ is the running mean of E over the stream.
  - The domains and μ learn from an arriving item first, then it is scored against them; a stored item's scores are
    measured again whenever the buffer compares it (participants.buffer_rules): IDD, and DSS with its dominant
    domain (from its token states, kept with it). So every candidate of a comparison is measured against the same
    domains and μ, which include all of them: scores taken against the domains of another time are not comparable
    (the first item, scored before any domain existed, had r = 1 for ever), and an item outside μ looks more like
    the others than the items inside it.
  - The first item's DSS, against domains made of its own words alone, stays out of the running statistics the
    z-scores come from.
The authors' lexicon reader also kept only each file's last line; nothing here reads a lexicon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from participants.chat_data import prompt_ids
from participants.seed_loading import LoadedSeed

HISTOGRAM_BINS = 100


@dataclass
class ItemFeatures:
    """What one forward pass tells about an item: its embedding and its own words' token states."""
    embedding: np.ndarray  # (d,) float32, E(T)
    tokens: np.ndarray  # (n, d) float32, unit rows: the states of the item's own words
    n_tokens: int


def _content_span(ids: list[int], empty: list[int]) -> tuple[int, int]:
    """[start, end) of the item's own tokens: what differs from the template's prompt around no text."""
    start = 0
    while start < min(len(ids), len(empty)) and ids[start] == empty[start]:
        start += 1
    start = min(start, len(ids) - 1)
    suffix = 0
    while (suffix < len(ids) - start - 1 and suffix < len(empty) - start
           and ids[-1 - suffix] == empty[-1 - suffix]):
        suffix += 1
    return start, len(ids) - suffix


def _backbone(model):
    """The model without its LM head: scoring needs hidden states, not the next-token distribution."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


@torch.no_grad()
def item_features(seed: LoadedSeed, inputs: list[str], max_len: int, batch_size: int = 8) -> list[ItemFeatures]:
    """ItemFeatures of each input, in batches of right-padded prompts (cut from the left to max_len tokens)."""
    tok = seed.tokenizer
    empty = prompt_ids(tok, "")
    prompts, spans = [], []
    for text in inputs:
        ids = prompt_ids(tok, text)
        start, end = _content_span(ids, empty)
        cut = max(0, len(ids) - max_len)
        prompts.append(ids[cut:])
        spans.append((max(start - cut, 0), max(end - cut, 1)))
    backbone, out = _backbone(seed.model), []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo:lo + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, :len(p)] = torch.tensor(p)
            mask[i, :len(p)] = 1
        hidden = backbone(input_ids=ids.to(seed.device), attention_mask=mask.to(seed.device)).last_hidden_state
        hidden = hidden.float().cpu().numpy()
        for i, p in enumerate(chunk):
            start, end = spans[lo + i]
            own = hidden[i, start:end]
            own = own / np.maximum(np.linalg.norm(own, axis=1, keepdims=True), 1e-12)
            out.append(ItemFeatures(hidden[i, len(p) - 1].copy(), own.astype(np.float32), int(end - start)))
    return out


def embedding_entropy(embedding: np.ndarray, n_tokens: int) -> float:
    """EOE: the 100-bin histogram entropy (bits) of the embedding's values, over log2(n + 1)."""
    density, edges = np.histogram(embedding, bins=HISTOGRAM_BINS, density=True)
    p = density * np.diff(edges)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() / math.log2(n_tokens + 1))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Welford:
    """Running mean and variance of a score over the stream."""
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def z(self, x: float) -> float:
        std = math.sqrt(self.m2 / self.n) if self.n > 1 else 0.0
        return (x - self.mean) / std if std > 1e-12 else 0.0


@dataclass
class StreamScorer:
    """What the scores depend on besides the item: the domains and the stream's running statistics."""
    n_domains: int
    centroids: np.ndarray | None = None  # (D, d), the running means of the token states assigned to each domain
    counts: np.ndarray | None = None  # (D,), token states each domain has learned from
    mean_embedding: np.ndarray | None = None  # μ
    seen: int = 0
    stats: dict[str, Welford] = field(default_factory=lambda: {k: Welford() for k in ("eoe", "dss", "idd")})

    def domain_shares(self, tokens: np.ndarray) -> np.ndarray:
        """r_d for every domain: the share of the item's token states nearest to each centroid."""
        if self.centroids is None or len(self.centroids) == 0:
            return np.ones(1)
        nearest = (tokens @ unit(self.centroids).T).argmax(axis=1)
        return np.bincount(nearest, minlength=len(self.centroids)) / len(tokens)

    def centered(self, embeddings: np.ndarray) -> np.ndarray:
        """Unit vectors of the embeddings minus the stream's mean embedding."""
        mu = self.mean_embedding if self.mean_embedding is not None else 0.0
        return unit(np.asarray(embeddings, dtype=np.float32) - mu)

    def learn(self, f: ItemFeatures) -> None:
        """Update the domains and μ with an item (after it has been scored)."""
        self.seen += 1
        e = f.embedding.astype(np.float64)
        self.mean_embedding = e if self.mean_embedding is None else self.mean_embedding + (e - self.mean_embedding) / self.seen
        tokens = f.tokens.astype(np.float64)
        if self.centroids is None:
            self.centroids, self.counts = np.zeros((0, tokens.shape[1])), np.zeros(0)
        while len(self.centroids) < self.n_domains:  # farthest-point picks until there are D domains
            pick, closeness = 0, None
            if len(self.centroids):
                closeness = (tokens @ unit(self.centroids).T).max(axis=1)
                pick = int(closeness.argmin())
            if closeness is not None and closeness[pick] > 0.999:
                break  # nothing in this item that the domains do not have yet (it still updates them below)
            self.centroids = np.vstack([self.centroids, tokens[pick]])
            self.counts = np.append(self.counts, 1.0)
        nearest = (tokens @ unit(self.centroids).T).argmax(axis=1)
        for d, row in zip(nearest, tokens):
            self.counts[d] += 1
            self.centroids[d] += (row - self.centroids[d]) / self.counts[d]


def in_domain_dissimilarity(centered: np.ndarray, others: np.ndarray) -> float:
    """IDD of one centered unit embedding against the centered unit embeddings of its bucket (1 when empty)."""
    if len(others) == 0:
        return 1.0
    return float(1.0 - (others @ centered).mean())


def combined(scores: dict[str, float], scorer: StreamScorer, combine: str) -> float:
    """The number sdss ranks by: the sum of the three scores' z-scores over the stream so far, or one score."""
    if combine == "zsum":
        return sum(scorer.stats[k].z(scores[k]) for k in ("eoe", "dss", "idd"))
    return scores[combine]
