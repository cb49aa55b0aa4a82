"""Seed selection by trying seeds on the user's own records: the two baselines XPerT is measured against.

Exhaustive search scores every seed of the catalog by its mean answer-token loss on all the user's records.
Successive halving (HyperBand's inner loop) scores every seed on a few records, keeps the best 1/eta, and
gives the survivors eta times more records, until one seed is left or the records run out. Both must load
every seed they score, so their cost grows with the catalog, unlike XPerT's comparison of explanations
(style_direction.py); the result says what that cost was, so the comparison is an honest one.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from participants.chat_data import IGNORE, collate, encode_all, next_token_loss
from participants.progress import progress
from participants.seed_loading import LoadedSeed, forget_seed, is_loaded, load_seed
from protocols.records import PersonalRecord


@dataclass
class SearchResult:
    seed_id: str  # the chosen source
    losses: dict[str, float]  # source -> mean answer-token loss, at the last budget it was scored with
    seeds_loaded: int  # distinct seeds whose weights the search needed
    tokens_forward: int  # real (unpadded) tokens through forward passes, over all seeds
    seconds: float  # wall time, loading included
    bytes_loaded: int  # what a device downloads to score those seeds (the delta when a seed has one)
    rounds: list[dict] = field(default_factory=list)  # per round: seeds alive, items used, their losses


@dataclass(frozen=True)
class RecordLoss:
    """One record's summed answer-token loss and how many tokens it is over, so that records add up."""
    total: float
    tokens: int


def download_bytes(descriptor) -> int:
    """Bytes of the weight files a device needs for this seed: its delta folder if it has one, else its folder."""
    folder = getattr(descriptor, "delta", None) or descriptor.path
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


@torch.no_grad()
def record_losses(seed: LoadedSeed, records: Sequence[PersonalRecord], max_len: int = 128,
                  batch_size: int = 8) -> tuple[list[RecordLoss], int]:
    """Per-record answer loss under the seed, in the records' order, and the tokens it took to compute.

    Batches are length-sorted to waste less padding; the tokens counted are the unpadded ones.
    """
    examples = encode_all(seed.tokenizer, records, max_len)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out: list[RecordLoss | None] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([examples[i] for i in chunk], seed.tokenizer.pad_token_id, seed.device)
        logits = seed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums = next_token_loss(logits, batch["labels"], reduction="none").sum(dim=1)
        counts = (batch["labels"][:, 1:] != IGNORE).sum(dim=1)
        for i, s, n in zip(chunk, sums.tolist(), counts.tolist()):
            out[i] = RecordLoss(s, n)
    return out, sum(len(e.input_ids) for e in examples)


def mean_loss(per_record: Sequence[RecordLoss]) -> float:
    """Token-weighted mean, as in evaluation.perplexity (whose log it is)."""
    return sum(r.total for r in per_record) / max(sum(r.tokens for r in per_record), 1)


def halving_schedule(n_seeds: int, n_records: int, min_items: int = 2, eta: int = 2) -> list[tuple[int, int]]:
    """(seeds alive, items each is scored on) per round; it depends only on the sizes, never on the losses."""
    rounds, alive, items = [], n_seeds, min(min_items, n_records)
    while True:
        rounds.append((alive, items))
        alive = max(1, alive // eta)
        if alive == 1 or items == n_records:  # one survivor, or no records left to add: this round decides
            return rounds
        items = min(items * eta, n_records)


class _Scorer:
    """Scores seeds on growing prefixes of the records, reusing what earlier rounds computed.

    Each seed is loaded for its turn and forgotten after it (unless the process held it before the
    search), so a catalog never sits in memory whole; later rounds load a survivor again.
    """

    def __init__(self, sources: Sequence[str], records: Sequence[PersonalRecord], max_len: int, batch_size: int):
        self.records, self.max_len, self.batch_size = records, max_len, batch_size
        self.held_before = {s for s in sources if is_loaded(s)}
        self.per_record: dict[str, list[RecordLoss]] = {s: [] for s in sources}
        self.download: dict[str, int] = {}
        self.tokens = 0

    def score(self, source: str, items: int) -> float:
        """Mean loss of the seed on records[:items]; only records it has not seen yet go forward."""
        done = self.per_record[source]
        if len(done) < items:
            seed = load_seed(source)
            self.download.setdefault(source, download_bytes(seed.descriptor))
            new, tokens = record_losses(seed, self.records[len(done):items], self.max_len, self.batch_size)
            done.extend(new)
            self.tokens += tokens
            del seed
            if source not in self.held_before:
                forget_seed(source)
        return mean_loss(done[:items])

    def result(self, chosen: str, losses: dict[str, float], started: float, rounds: list[dict]) -> SearchResult:
        return SearchResult(seed_id=chosen, losses=losses, seeds_loaded=len(self.download),
                            tokens_forward=self.tokens, seconds=time.perf_counter() - started,
                            bytes_loaded=sum(self.download.values()), rounds=rounds)


def _check(sources: Sequence[str], records: Sequence[PersonalRecord]) -> None:
    if not sources:
        raise ValueError("no seeds to search: pass the catalog's seed sources (at least one)")
    repeated = sorted(s for s, n in Counter(sources).items() if n > 1)
    if repeated:
        raise ValueError(f"seeds listed more than once: {repeated}; list each seed once")
    if not records:
        raise ValueError("no records to score the seeds on: the search needs at least one of the user's "
                         "records (input and answer)")


def _best(losses: dict[str, float]) -> str:
    """Lowest loss; on a tie the smaller source string, so the choice never depends on the order given."""
    return min(losses, key=lambda s: (losses[s], s))


def exhaustive_search(sources: Sequence[str], records: Sequence[PersonalRecord], max_len: int = 128,
                      batch_size: int = 8) -> SearchResult:
    """Every seed on all the records; the lowest mean answer loss wins."""
    _check(sources, records)
    started = time.perf_counter()
    scorer = _Scorer(sources, records, max_len, batch_size)
    losses = {}
    with progress(len(sources), "exhaustive seed search") as bar:
        for source in sources:
            losses[source] = scorer.score(source, len(records))
            bar.update(loss=losses[source])
    rounds = [{"seeds": list(sources), "items": len(records), "losses": dict(losses)}]
    return scorer.result(_best(losses), losses, started, rounds)


def successive_halving(sources: Sequence[str], records: Sequence[PersonalRecord], min_items: int = 2,
                       eta: int = 2, max_len: int = 128, batch_size: int = 8) -> SearchResult:
    """HyperBand's inner loop over seeds, on the records in the order given.

    All seeds alive in a round are scored on the same first `items` records, so their losses compare;
    a survivor only runs the records that are new to it.
    """
    _check(sources, records)
    if min_items < 1:
        raise ValueError(f"min_items={min_items}: the first round must score each seed on at least one record")
    if eta < 2:
        raise ValueError(f"eta={eta}: each round must keep at most half the seeds (eta >= 2), or it never ends")
    started = time.perf_counter()
    scorer = _Scorer(sources, records, max_len, batch_size)
    schedule = halving_schedule(len(sources), len(records), min_items, eta)
    alive, losses, rounds = list(sources), {}, []
    with progress(sum(n for n, _ in schedule), "successive halving over seeds") as bar:
        for n_alive, items in schedule:
            if rounds:  # the previous round's best n_alive go on
                previous = rounds[-1]["losses"]
                alive = sorted(previous, key=lambda s: (previous[s], s))[:n_alive]
            scored = {}
            for source in alive:
                scored[source] = scorer.score(source, items)
                bar.update(loss=scored[source])
            losses |= scored
            rounds.append({"seeds": list(alive), "items": items, "losses": scored})
    return scorer.result(_best(rounds[-1]["losses"]), losses, started, rounds)
