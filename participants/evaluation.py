"""Held-out evaluation on a participant's own records: answer perplexity and ROUGE of greedy
generations. Runs on the device; only the numbers leave it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from participants.chat_data import batches, encode_after, encode_all, next_token_loss, prompt_ids
from participants.lora_hooks import LoraBranch, attached
from participants.seed_loading import LoadedSeed
from protocols.records import PersonalRecord


def _with(seed: LoadedSeed, adapter: dict[str, LoraBranch] | None):
    return attached(seed.model, adapter) if adapter else nullcontext()


@torch.no_grad()
def perplexity(seed: LoadedSeed, records: list[PersonalRecord], adapter: dict[str, LoraBranch] | None = None,
               *, max_len: int, batch_size: int = 8, prompts: Sequence[str] | None = None) -> float:
    """exp of the mean next-token loss over all answer tokens of the records. `prompts`: each record's user
    message in place of its input (e.g. with examples before it); the same answer tokens are scored."""
    total, count = 0.0, 0
    examples = (encode_all(seed.tokenizer, records, max_len) if prompts is None else
                [encode_after(seed.tokenizer, r, p, max_len) for r, p in zip(records, prompts, strict=True)])
    with _with(seed, adapter):
        for batch in batches(examples, batch_size, seed.tokenizer.pad_token_id, seed.device):
            logits = seed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            losses = next_token_loss(logits, batch["labels"], reduction="none")
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(losses.sum())
            count += n
    return math.exp(total / max(count, 1))


@torch.no_grad()
def generate(seed: LoadedSeed, records: list[PersonalRecord], adapter: dict[str, LoraBranch] | None = None,
             *, max_new_tokens: int, batch_size: int = 8, max_prompt: int = 256,
             prompts: Sequence[str] | None = None) -> list[str]:
    """Greedy answers to the records' inputs, or to `prompts` in their place (left-padded batches)."""
    tok, outs = seed.tokenizer, []
    texts = [r.input for r in records] if prompts is None else list(prompts)
    encoded = [prompt_ids(tok, text)[-max_prompt:] for text in texts]
    with _with(seed, adapter):
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            gen = seed.model.generate(input_ids=ids.to(seed.device), attention_mask=mask.to(seed.device),
                                      max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            outs.extend(tok.decode(g[width:], skip_special_tokens=True).strip() for g in gen)
    return outs


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F1 (Google's rouge-score, with stemming, as LaMP reports them)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    n = max(len(scores), 1)
    return {"rouge1": sum(s["rouge1"].fmeasure for s in scores) / n,
            "rougeL": sum(s["rougeL"].fmeasure for s in scores) / n}


def evaluate(seed: LoadedSeed, records: list[PersonalRecord], adapter: dict[str, LoraBranch] | None = None,
             *, max_new_tokens: int, with_generation: bool, max_len: int) -> dict[str, float]:
    out = {"perplexity": perplexity(seed, records, adapter, max_len=max_len)}
    if with_generation:
        preds = generate(seed, records, adapter, max_new_tokens=max_new_tokens)
        out |= rouge(preds, [r.output for r in records])
    return out
