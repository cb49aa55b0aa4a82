"""Which item leaves a full buffer when a new one arrives, and which items the owner is asked to annotate first:
one entry per rule (participants.stream_settings.RULES), all at the same capacity B.

    sdss     the new item competes with the weakest unannotated item of its dominant domain's bucket (the
             authors' rule, with their comparison turned the right way: the new item enters only when it scores
             higher). Their code freezes the domains' shares once the buffer is full and drops an item whose
             bucket is empty; here such an item competes with the weakest of the largest bucket, so a domain
             that appears late can enter. IDD is measured when compared, against the bucket as it is then
             (leave-one-out for the stored items), since what is redundant changes as the buffer does; so are a
             stored item's DSS and dominant domain (hence its bucket), against the domains as they are then (see
             `current_domains`). Annotation: the highest combined score first.
    fifo     the oldest unannotated item leaves. Annotation: oldest first.
    random   reservoir sampling (Vitter's algorithm R): the n-th item enters with probability B / n, in place of
             a uniformly chosen unannotated item. Its randomness derives from (the buffer's random seed, n), so it
             needs no other state and a replay decides the same; the seed is the buffer's own (drawn from the OS
             when it is created, kept in its file), so two devices sample different positions of their streams.
             Annotation: a random order per round, from (random seed, round).
    kcenter  the online greedy k-center heuristic on centered unit embeddings: of the unannotated items and the
             new one, the one nearest to any other item (the most redundant) leaves. Annotation: farthest-first
             traversal from what is already annotated, the greedy k-center order.

Annotated items keep their slots: the owner's labels are the scarcest thing the device has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from participants.selection_scores import StreamScorer, combined, in_domain_dissimilarity, unit
from participants.stream_settings import BufferSettings
from protocols.records import PersonalRecord


@dataclass
class BufferItem:
    record: PersonalRecord  # output "" until annotated (or given with it)
    seq: int  # its place in the stream, from 1
    embedding: np.ndarray  # E(T), float32
    tokens: np.ndarray | None  # (n, d) float16 unit states of its own words, to measure its DSS again (None: an
    # item a format 1 buffer file brought, which keeps the domain and DSS it arrived with)
    domain: int  # its dominant domain d* when it arrived
    eoe: float
    dss: float  # at arrival
    idd: float  # at arrival
    annotation: dict | None = None  # who annotated it, in which round, when
    synthetic: list[dict] = field(default_factory=list)  # the kept written pairs
    written: int = 0  # pairs the model wrote for it, kept or not

    @property
    def annotated(self) -> bool:
        return self.annotation is not None


def current_domains(items: list[BufferItem], scorer: StreamScorer) -> tuple[np.ndarray, np.ndarray]:
    """Each item's dominant domain and DSS against the domains as they are now. The domains are learned online, so
    a DSS taken when an item arrived is not comparable with one taken later: the first item of a stream is scored
    before any domain exists (one domain holding all its words, DSS = 1, the highest there is) and the next few
    while one early domain holds most words; kept, those values made sdss keep and annotate the stream's first
    item almost always. Measured again here, every item is judged by the same domains."""
    domain = np.array([it.domain for it in items], dtype=int)
    dss = np.array([it.dss for it in items], dtype=float)
    if scorer.centroids is None or len(scorer.centroids) == 0:
        return domain, dss
    centroids = unit(scorer.centroids).astype(np.float32)
    for i, it in enumerate(items):
        if it.tokens is not None:
            shares = np.bincount((it.tokens.astype(np.float32) @ centroids.T).argmax(axis=1),
                                 minlength=len(centroids)) / len(it.tokens)
            domain[i], dss[i] = int(shares.argmax()), float(shares.max())
    return domain, dss


def current_idd(i: int, domain: np.ndarray, centered: np.ndarray) -> float:
    """Item i's dissimilarity to the other items of its bucket (items of its current domain), now."""
    others = [j for j in range(len(domain)) if j != i and domain[j] == domain[i]]
    return in_domain_dissimilarity(centered[i], centered[others])


def sdss_value(items: list[BufferItem], i: int, centered: np.ndarray, domain: np.ndarray, dss: np.ndarray,
               scorer: StreamScorer, combine: str) -> float:
    return combined({"eoe": items[i].eoe, "dss": dss[i], "idd": current_idd(i, domain, centered)}, scorer, combine)


def evict(items: list[BufferItem], new: BufferItem, scorer: StreamScorer, s: BufferSettings,
          random_seed: int) -> int | None:
    """The index of the item the new one replaces in a full buffer, or None: the new one is not kept."""
    free = [i for i, it in enumerate(items) if not it.annotated]
    if not free:
        return None
    if s.rule == "fifo":
        return min(free, key=lambda i: items[i].seq)
    if s.rule == "random":
        rng = np.random.default_rng([random_seed, new.seq])
        return free[int(rng.integers(len(free)))] if rng.random() < s.capacity / new.seq else None
    centered = scorer.centered(np.stack([it.embedding for it in items] + [new.embedding]))
    if s.rule == "kcenter":
        cos = centered @ centered.T
        np.fill_diagonal(cos, -np.inf)
        nearest = cos.max(axis=1)  # the most similar other item, per item
        candidates = free + [len(items)]
        loser = max(candidates, key=lambda i: (nearest[i], i))  # ties: the newest leaves
        return None if loser == len(items) else loser
    domain, dss = current_domains(items, scorer)
    bucket = [i for i in free if domain[i] == new.domain]
    if not bucket:  # a domain the buffer's free slots lack: compete with the largest bucket
        sizes = np.bincount(domain[free])
        bucket = [i for i in free if domain[i] == int(sizes.argmax())]
    values = {i: sdss_value(items, i, centered[:-1], domain, dss, scorer, s.combine) for i in bucket}
    weakest = min(bucket, key=lambda i: (values[i], -items[i].seq))
    # The two candidates' IDDs against the same items: the new one's against its bucket without the item it would
    # replace, as that one's leaves itself out. Against the whole bucket, a new item like the weakest counted as
    # redundant because of the very item it replaces, and the items that filled the buffer first stayed.
    others = [j for j in range(len(items)) if domain[j] == new.domain and j != weakest]
    new_idd = in_domain_dissimilarity(centered[-1], centered[others])
    new_value = combined({"eoe": new.eoe, "dss": new.dss, "idd": new_idd}, scorer, s.combine)
    return weakest if new_value > values[weakest] else None


def annotation_order(items: list[BufferItem], scorer: StreamScorer, s: BufferSettings, round_no: int,
                     random_seed: int) -> list[int]:
    """The unannotated items' indices, in the order the rule asks the owner to annotate them."""
    free = [i for i, it in enumerate(items) if not it.annotated]
    if not free:
        return []
    if s.rule == "fifo":
        return sorted(free, key=lambda i: items[i].seq)
    if s.rule == "random":
        rng = np.random.default_rng([random_seed, 1 << 40, round_no])
        return [free[k] for k in rng.permutation(len(free))]
    centered = scorer.centered(np.stack([it.embedding for it in items]))
    if s.rule == "sdss":
        domain, dss = current_domains(items, scorer)
        values = {i: sdss_value(items, i, centered, domain, dss, scorer, s.combine) for i in free}
        return sorted(free, key=lambda i: (-values[i], items[i].seq))
    chosen = [i for i, it in enumerate(items) if it.annotated]
    order, left = [], sorted(free, key=lambda i: items[i].seq)
    while left:
        if chosen:
            distance = [1 - (centered[chosen] @ centered[i]).max() for i in left]
            pick = left[int(np.argmax(distance))]
        else:
            pick = left[0]
        order.append(pick)
        chosen.append(pick)
        left.remove(pick)
    return order
