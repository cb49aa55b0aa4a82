"""A device's own history as examples in the prompt: retrieval-augmented personalisation, as LaMP's baselines do it.

For each request, the k history items nearest to it (cosine of MiniLM embeddings: the request's text against each
item's "input\\noutput", the embedding a profile averages) are written before the request, most similar last, so
the model can follow how this user answered before. Nothing leaves the device; no weight changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from participants.chat_data import clip_to_tokens
from participants.profile import embed_texts, record_embeddings
from protocols.records import PersonalRecord

HEADER = "Here is how I answered similar requests before:"
FOOTER = "Answer this one the same way, in my style:"


def nearest_items(history: Sequence[PersonalRecord], requests: Sequence[str], k: int) -> list[list[int]]:
    """For each request, the indices of its k nearest history items, nearest first."""
    if not history:
        raise ValueError("retrieval in the prompt needs at least one history item")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    similarity = embed_texts(list(requests)) @ record_embeddings(history).T  # (requests, items), unit vectors
    order = np.argsort(-similarity, axis=1, kind="stable")
    return order[:, :k].tolist()


def with_examples(request: str, examples: Sequence[PersonalRecord], tokenizer=None, max_tokens: int = 0) -> str:
    """The user message: the examples (each cut to `max_tokens` tokens of the tokenizer when given), then the
    request. Examples come in the order given, and the last is read nearest the request."""
    blocks = []
    for r in examples:
        block = f"Request: {r.input}\nAnswer: {r.output}"
        if tokenizer is not None and max_tokens:
            block = clip_to_tokens(tokenizer, block, max_tokens)
        blocks.append(block)
    return "\n\n".join([HEADER, *blocks, FOOTER, request])


def history_prompts(history: Sequence[PersonalRecord], records: Sequence[PersonalRecord], k: int,
                    tokenizer=None, max_tokens: int = 0) -> list[str]:
    """Each record's user message with its k nearest history items before it (the nearest closest to it)."""
    nearest = nearest_items(history, [r.input for r in records], k)
    return [with_examples(r.input, [history[i] for i in reversed(idx)], tokenizer, max_tokens)
            for r, idx in zip(records, nearest)]
