"""Personal records as chat-formatted token sequences, with the loss on the answer only."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from protocols.records import PersonalRecord

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt; the answer tokens and the end-of-turn token count

    @property
    def n_target(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def _ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def prompt_ids(tokenizer, user_text: str) -> list[int]:
    return _ids(tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                              tokenize=True, add_generation_prompt=True))


def clip_to_tokens(tokenizer, text: str, limit: int) -> str:
    """The text cut to its first `limit` tokens, as a generation of `limit` new tokens would be cut."""
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:limit]).strip()


def encode(tokenizer, rec: PersonalRecord, max_len: int) -> Example:
    """Prompt via the chat template, then the answer and the end-of-turn token.

    When too long, the prompt is cut from the left (keeping the question's end and the
    assistant header) and the answer from the right, keeping at least half for the answer.
    """
    prompt = prompt_ids(tokenizer, rec.input)
    answer = tokenizer(rec.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt) + len(answer) > max_len:
        keep_prompt = max(max_len - len(answer), max_len // 2)
        prompt = prompt[-keep_prompt:] if len(prompt) > keep_prompt else prompt
        answer = answer[: max_len - len(prompt)]
    return Example(prompt + answer, [IGNORE] * len(prompt) + answer)


def encode_after(tokenizer, rec: PersonalRecord, user_text: str, max_len: int) -> Example:
    """The answer tokens encode() scores for `rec`, after another user message (`user_text`, e.g. the question
    with retrieved examples before it), uncut: the same tokens count, so perplexities compare with encode's."""
    answer = [t for t in encode(tokenizer, rec, max_len).labels if t != IGNORE]
    prompt = prompt_ids(tokenizer, user_text)
    return Example(prompt + answer, [IGNORE] * len(prompt) + answer)


def encode_all(tokenizer, records: Sequence[PersonalRecord], max_len: int) -> list[Example]:
    return [encode(tokenizer, r, max_len) for r in records]


def collate(examples: Sequence[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on pads)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def batches(examples: Sequence[Example], batch_size: int, pad_id: int, device,
            shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over the examples; length-sorted chunks when not shuffled, to waste less padding."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    else:
        order.sort(key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]], pad_id, device)


def endless_batches(examples: Sequence[Example], batch_size: int, pad_id: int, device,
                    seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled epochs, one after the other, for step-counted training."""
    epoch = 0
    while True:
        yield from batches(examples, batch_size, pad_id, device, shuffle=True, seed=seed + epoch)
        epoch += 1


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each position predicting the next token, on answer tokens only."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                             shift_labels.reshape(-1), ignore_index=IGNORE, reduction="none")
    loss = loss.view(shift_labels.shape)
    if reduction == "none":
        return loss
    n = (shift_labels != IGNORE).sum().clamp(min=1)
    return loss.sum() / n


def answer_loss(model, batch: dict) -> torch.Tensor:
    """The mean answer-token loss of `model` on `batch`, equal to next_token_loss of its logits, with the
    vocabulary projection run on the positions that predict an answer token only.

    The LM head's logits (49k columns on SmolLM2) for prompt and pad positions are computed, cast to fp32 and
    normalized only to be ignored; on a bf16 base (AMX CPU) that work was a seventh of a training step. Models
    whose head is not a plain projection of the decoder's last hidden state (a logit soft-cap), or that are not
    Hugging Face models, take the full path.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper or the model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None or getattr(base.config, "final_logit_softcapping", None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return next_token_loss(logits, batch["labels"])
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    keep = predicts_answer_mask(batch["labels"])
    logits = head(hidden[keep]).float()
    targets = batch["labels"][:, 1:][keep[:, :-1]]
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / max(targets.numel(), 1)


def record_answer_losses(model, batch: dict) -> torch.Tensor:
    """Each record's own mean answer-token loss, (batch,): the loss next_token_loss gives that record alone, with
    the vocabulary projection on answer-predicting positions only (as answer_loss). A record with no answer token
    left after cutting counts 0."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    labels = batch["labels"]
    if decoder is None or head is None or getattr(base.config, "final_logit_softcapping", None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_token = next_token_loss(logits, labels, reduction="none")
        counts = (labels[:, 1:] != IGNORE).sum(dim=1)
        return per_token.sum(dim=1) / counts.clamp(min=1)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    keep = predicts_answer_mask(labels)
    logits = head(hidden[keep]).float()
    targets = labels[:, 1:][keep[:, :-1]]
    per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
    return sums / keep.sum(dim=1).clamp(min=1)


def predicts_answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """True at positions t whose hidden state predicts an answer token (labels[t+1] counts)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask
