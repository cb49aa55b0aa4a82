"""A newcomer tries each contributor's pieces on a few of its own history items before mixing (forward passes only).

Gates score how alike the newcomer's inputs are to a sharer's, not whether the sharer's update helps a stranger.
Adapters trained longer learn their account's format, and some then raise the loss of nearly every other account;
an account that writes like them still scores their gates highly. The newcomer's own answer loss under a
contributor's received pieces says directly whether they help it: the probe attaches each contributor's pieces
alone, at full strength, scores `records` with them, and at each position keeps for the mix the pieces of the
`keep` contributors with the lowest loss among those that sent one there. It needs the pieces themselves, so it runs after the download, on the device; nothing
about it leaves the device.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from participants.adapters import branches
from participants.chat_data import encode_all
from participants.evaluation import perplexity
from participants.progress import progress
from participants.seed_loading import LoadedSeed
from protocols.pieces import Piece
from protocols.records import PersonalRecord


@dataclass
class Probe:
    losses: dict[str, float]  # contributor key id -> mean answer loss of the probed records under its pieces
    ranking: list[str]  # every contributor, lowest loss first
    keep: int  # contributors mixed at each position: the best-ranked that sent a piece there
    tokens: int  # tokens through the probe's forward passes


def by_contributor(pieces: list[Piece]) -> dict[str, list[Piece]]:
    grouped: dict[str, list[Piece]] = defaultdict(list)
    for p in pieces:
        grouped[p.contributor].append(p)
    return dict(grouped)


def probe_contributors(seed: LoadedSeed, records: list[PersonalRecord], pieces: list[Piece], keep: int, *,
                       max_len: int, batch_size: int) -> Probe:
    """Each contributor's pieces alone on `records`, ranked by the answer loss they give."""
    groups = by_contributor(pieces)
    tokens_each = sum(len(e.input_ids) for e in encode_all(seed.tokenizer, records, max_len))
    losses = {}
    with progress(len(groups), "trying contributors") as bar:
        for who, own in groups.items():
            adapter = branches({p.position: (p.A, p.B * p.scaling) for p in own}, 1.0, seed.device)
            losses[who] = math.log(perplexity(seed, records, adapter, max_len=max_len, batch_size=batch_size))
            bar.update()
    return Probe(losses, sorted(losses, key=losses.get), keep, tokens_each * len(groups))


def kept_pieces(pieces: list[Piece], probe: Probe) -> list[Piece]:
    """At each position, the pieces of the `probe.keep` best-ranked contributors that sent one there: where
    sharers send part of their adapter (the default policy), a position still gets `keep` candidates."""
    rank = {who: i for i, who in enumerate(probe.ranking)}
    by_position: dict[str, list[Piece]] = defaultdict(list)
    for p in pieces:
        by_position[p.position].append(p)
    return [p for ps in by_position.values() for p in sorted(ps, key=lambda p: rank[p.contributor])[:probe.keep]]
