"""Candidate style words proposed by the model itself (XPerT's "next words and probabilities").

For a pair of answers to the same prompt, the base is asked which style the second answer has more of than the
first, and its next-word distribution is read instead of its one reply: every likely first token is completed
greedily to a whole word, and the word gets that token's probability. Summed over a seed's probe pairs, the
words a seed's answers suggest come out ranked, so the vocabulary grows with the styles in the catalog rather
than being fixed by hand. It is model code, so it lives with the other model code here; the catalog build
(catalog_build.explaining) runs it for the coordinator.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch

from participants.chat_data import clip_to_tokens, prompt_ids
from participants.seed_loading import LoadedSeed

QUESTION = ("Here are two answers to the same question.\n\nFirst answer:\n{plain}\n\nSecond answer:\n{styled}\n\n"
            "Which language style is more characteristic of the second answer than of the first? "
            "Reply with only one adjective.")

# The reply is started for the model, so that its next word is the adjective rather than a preamble.
REPLY_START = "Compared with the first answer, the second answer is more"

# Words the question itself invites that say nothing about a style.
_NOT_STYLES = frozenset({
    "answer", "answers", "first", "second", "style", "styles", "language", "more", "less", "than", "characteristic",
    "adjective", "reply", "only", "both", "same", "question", "which", "this", "that", "with", "none", "sure",
    "here", "there", "they", "their", "yes", "the", "and", "word",
})
_WORD = re.compile(r"[A-Za-z][a-z]+(?:-[a-z]+)?")


@torch.no_grad()
def propose_words(seed: LoadedSeed, pairs: Sequence[tuple[str, str]], first_tokens: int = 12,
                  answer_tokens: int = 160, word_tokens: int = 4) -> Counter[str]:
    """Style words for (plain, styled) answer pairs, each with its summed probability as the model's reply.

    `first_tokens` likely first tokens per pair are completed greedily (up to `word_tokens` tokens, in one
    batch per pair); answers are cut to `answer_tokens` tokens so the prompt stays short.
    """
    tok, model = seed.tokenizer, seed.model
    scores: Counter[str] = Counter()
    for plain, styled in pairs:
        question = QUESTION.format(plain=clip_to_tokens(tok, plain, answer_tokens), styled=clip_to_tokens(tok, styled, answer_tokens))
        ids = prompt_ids(tok, question) + tok(REPLY_START, add_special_tokens=False)["input_ids"]
        prompt = torch.tensor([ids], device=seed.device)
        probs = torch.softmax(model(input_ids=prompt).logits[0, -1].float(), dim=-1)
        top = torch.topk(probs, first_tokens)
        starts = torch.cat([prompt.expand(first_tokens, -1), top.indices[:, None]], dim=1)
        completed = model.generate(input_ids=starts, attention_mask=torch.ones_like(starts),
                                   max_new_tokens=word_tokens - 1, do_sample=False,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for row, p in zip(completed, top.values.tolist()):
            match = _WORD.search(tok.decode(row[prompt.shape[1]:], skip_special_tokens=True))
            word = match.group(0).lower() if match else ""
            if len(word) >= 4 and word not in _NOT_STYLES:
                scores[word] += p
    return scores


def proposed_vocabulary(per_seed: dict[str, Counter[str]], known: Sequence[str], per_seed_words: int = 3,
                        limit: int = 16) -> list[str]:
    """New words for the basis: each seed's `per_seed_words` best words not already `known`, taken round-robin
    over the seeds (so every seed is described by something), at most `limit` in all, most likely first."""
    ranked = {name: [w for w, _ in scores.most_common() if w not in known] for name, scores in per_seed.items()}
    chosen: list[str] = []
    for rank in range(per_seed_words):
        for name in sorted(ranked):
            words = [w for w in ranked[name] if w not in chosen]
            if rank < len(ranked[name]) and words and len(chosen) < limit:
                chosen.append(words[0])
    return chosen
