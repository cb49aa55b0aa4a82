"""Synthesis: the device's own model writes K (input, output) pairs like each annotated item, from one fixed
prompt, and keeps a pair when its ROUGE-1 against the original lies between two bounds (not a near copy, not a
drift away from the item). Everything happens on the device; the pairs never leave it.

The SDSS paper's prompt, K and thresholds are not published (research note, part C); these are this code's:
the prompt below, with the reply started for the model ("Request:", so that a small model keeps to the form), K =
`pairs`, ROUGE-1 F1 (stemmed, as the evaluation computes it) of the pair's text (input, newline, output) against
the original's, kept when within [rouge_low, rouge_high]. The answer is the reply's first paragraph after
"Answer:" (small models go on writing after it). A reply that does not follow the form is counted as written and
not kept.

Who writes (`synthesis-writer`): by default the seed with a LoRA trained on the annotated items so far
(`writer_adapter`). The bare seed writes answers in its own voice, and training on them pulled the adapter back
toward the seed: on 16 styleqa streams (B = 4 of 40) its pairs cost perplexity against the annotated items alone,
while the adapter's pairs do not. What trains (`training_mix`) repeats the annotated items until they are at least
as many as the pairs (`repeat-annotated`), so that K pairs an item do not outweigh the owner's own answers (its
own effect was too small to measure on 13 styleqa streams: it changes only those whose model kept more pairs than
it had items).
"""

from __future__ import annotations

import re
import zlib
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from participants.adapters import branches
from participants.chat_data import prompt_ids
from participants.lora_hooks import LoraBranch, attached
from participants.lora_training import LoraSettings, train_private_lora
from participants.seed_loading import LoadedSeed
from participants.stream_settings import SynthesisSettings
from protocols.records import PersonalRecord

SYNTHESIS_PROMPT = ("Here is a request and the answer its writer gave.\n\nRequest: {input}\nAnswer: {output}\n\n"
                    "Write one new request on a similar topic and the answer this writer would give, in the same "
                    "style and about as long. Reply in exactly this form:\nRequest: <the new request>\n"
                    "Answer: <its answer>")
_FORM = re.compile(r"request\s*:\s*(?P<input>.+?)\s*\n+\s*answer\s*:\s*(?P<output>.+?)(?:\n\s*\n|$)",
                   re.IGNORECASE | re.DOTALL)
STARTED = "Request:"  # the reply begins with this, written for the model
MAX_PROMPT_TOKENS = 512


@dataclass(frozen=True)
class WrittenPair:
    input: str
    output: str
    rouge1: float  # against the original item

    def to_json(self) -> dict:
        return {"input": self.input, "output": self.output, "rouge1": self.rouge1}


@dataclass(frozen=True)
class Synthesis:
    written: int  # replies the model wrote for the item
    kept: list[WrittenPair]


def parse_pair(text: str) -> tuple[str, str] | None:
    """(input, output) from a "Request: … Answer: …" reply, or None when it is not in that form."""
    match = _FORM.search(text)
    if match is None:
        return None
    new_input, new_output = match["input"].strip(), match["output"].strip()
    return (new_input, new_output) if new_input and new_output else None


def pair_text(input: str, output: str) -> str:
    return f"{input}\n{output}"


def _rouge1(scorer, reference: str, candidate: str) -> float:
    return float(scorer.score(reference, candidate)["rouge1"].fmeasure)


def keep_pairs(original: PersonalRecord, replies: list[str], s: SynthesisSettings) -> Synthesis:
    """The replies that parse and whose ROUGE-1 against the original lies within the bounds."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    reference, kept = pair_text(original.input, original.output), []
    for reply in replies:
        pair = parse_pair(reply)
        if pair is None:
            continue
        score = _rouge1(scorer, reference, pair_text(*pair))
        if s.rouge_low <= score <= s.rouge_high:
            kept.append(WrittenPair(pair[0], pair[1], score))
    return Synthesis(len(replies), kept)


@torch.no_grad()
def write_replies(seed: LoadedSeed, records: list[PersonalRecord], s: SynthesisSettings,
                  batch_items: int = 4) -> list[list[str]]:
    """K sampled replies to the synthesis prompt per record (left-padded batches of `batch_items` records). The
    sampling is seeded by synthesis_seed and the batch's first item, so the same items in the same order get the same
    replies; the process's own random state is left as it was."""
    tok, out = seed.tokenizer, []
    for lo in range(0, len(records), batch_items):
        chunk = records[lo:lo + batch_items]
        started = tok(STARTED, add_special_tokens=False)["input_ids"]
        prompts = [(prompt_ids(tok, SYNTHESIS_PROMPT.format(input=r.input, output=r.output)) + started)
                   [-MAX_PROMPT_TOKENS:] for r in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        key = f"{s.synthesis_seed}:{chunk[0].user}:{chunk[0].id}:{chunk[0].input}".encode()
        devices = [seed.device] if seed.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(zlib.crc32(key))
            gen = seed.model.generate(input_ids=ids.to(seed.device), attention_mask=mask.to(seed.device),
                                      max_new_tokens=s.synthesis_tokens, do_sample=True,
                                      temperature=s.synthesis_temperature, top_p=s.top_p,
                                      num_return_sequences=s.pairs, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id)
        texts = [STARTED + tok.decode(g[width:], skip_special_tokens=True) for g in gen]
        out.extend(texts[i * s.pairs:(i + 1) * s.pairs] for i in range(len(chunk)))
    return out


def synthesize(seed: LoadedSeed, records: list[PersonalRecord], s: SynthesisSettings, batch_items: int = 4,
               writer: dict[str, LoraBranch] | None = None) -> list[Synthesis]:
    """For each annotated record, the pairs the model wrote (the seed, with `writer`'s LoRA when given) and those
    it keeps."""
    if s.pairs == 0 or not records:
        return [Synthesis(0, []) for _ in records]
    with attached(seed.model, writer) if writer else nullcontext():
        replies = write_replies(seed, records, s, batch_items)
    return [keep_pairs(r, mine, s) for r, mine in zip(records, replies)]


def writer_adapter(seed: LoadedSeed, annotated: list[PersonalRecord], lora: LoraSettings) -> dict[str, LoraBranch]:
    """The writer of `synthesis-writer adapter`: a LoRA trained on the annotated items alone, as branches to attach
    while writing."""
    weights, _ = train_private_lora(seed, annotated, lora, desc="synthesis writer")
    return branches(weights, lora.alpha / lora.rank, seed.device)


def training_mix(annotated: list[PersonalRecord], written: list[PersonalRecord],
                 repeat_annotated: bool) -> list[PersonalRecord]:
    """What trains: the annotated items, repeated (`repeat_annotated`) until they are at least as many as the
    written pairs, then the pairs."""
    times = -(-len(written) // len(annotated)) if repeat_annotated and annotated and written else 1
    return annotated * times + written
