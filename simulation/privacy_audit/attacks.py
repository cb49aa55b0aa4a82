"""The audit's attacks: each gives every record a score, higher meaning "more likely a member".

A sharer's members are its history (what its adapter and gates were trained on), its non-members its held-out
records. The attacker holds what a sharer releases and the public seed, as the coordinator and every newcomer
do (README, "Threat model"):

    membership inference  loss_seed(r) - loss_pieces(r): how much the shared pieces, applied as a LoRA at their
                          positions, lower the mean loss of record r's answer tokens (the score the targets were
                          set on); and log(loss_seed(r) / loss_pieces(r)), the drop relative to how hard the seed
                          finds r: the reference-model ratio of Carlini et al. (2021), a stronger attack where
                          records differ in difficulty (a hard record's loss drops more in absolute terms, member or
                          not)
    extraction            the share of the word n-grams of a greedy generation under the pieces, prompted with r's
                          input, that occur in r's answer but not in its prompt (copying the prompt proves nothing)
    gate                  the shared gates on r's hidden states, on the bare seed: the mean over the shared
                          positions and over the tokens that predict r's answer of sigmoid(g·x), the activation the
                          gate was trained to give; and of the newcomer's score LN(x)·LN(g)/sqrt(d)
    profile               cosine of r's MiniLM embedding with the released profile

`auc` and `tpr_at_fpr` read an attack's success off the scores of members against non-members.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from participants.assembly import example_scores
from participants.chat_data import IGNORE, collate, encode_all, next_token_loss, predicts_answer_mask
from participants.lora_hooks import LoraBranch, attached, modules_at
from participants.seed_loading import LoadedSeed
from protocols.records import PersonalRecord


def auc(members: Sequence[float], non_members: Sequence[float]) -> float:
    """Area under the ROC curve of the scores, members positive: 0.5 is chance, 1 a perfect attack."""
    from sklearn.metrics import roc_auc_score

    y, s = _labeled(members, non_members)
    return float(roc_auc_score(y, s))


def tpr_at_fpr(members: Sequence[float], non_members: Sequence[float], fpr: float = 0.01) -> float:
    """The highest true-positive rate of any threshold whose false-positive rate is at most `fpr`. With n
    non-members the FPR moves in steps of 1/n: below n = 1/fpr it is the TPR at no false positive at all."""
    from sklearn.metrics import roc_curve

    y, s = _labeled(members, non_members)
    false_pos, true_pos, _ = roc_curve(y, s, drop_intermediate=False)
    return float(true_pos[false_pos <= fpr].max())


def chance_aucs(members: int, non_members: int, sharers: int, *, draws: int = 4000,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The mean and the max over `sharers` per-sharer AUCs when the attack learns nothing (scores independent of
    membership), `draws` times: what the figures of an attack that leaks nothing look like at these sizes."""
    rng = np.random.default_rng(seed)
    ranks = rng.random((draws, sharers, members + non_members)).argsort(axis=-1).argsort(axis=-1) + 1
    u = ranks[..., :members].sum(axis=-1) - members * (members + 1) / 2  # Mann-Whitney U of the members
    aucs = u / (members * non_members)
    return aucs.mean(axis=-1), aucs.max(axis=-1)


def _labeled(members: Sequence[float], non_members: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if not len(members) or not len(non_members):
        raise ValueError(f"an attack needs members and non-members, got {len(members)} and {len(non_members)}")
    scores = np.concatenate([np.asarray(members, float), np.asarray(non_members, float)])
    if not np.all(np.isfinite(scores)):
        raise ValueError("attack scores must be finite")
    return np.r_[np.ones(len(members)), np.zeros(len(non_members))], scores


def membership_scores(bare_losses: Sequence[float], tuned_losses: Sequence[float]) -> dict[str, np.ndarray]:
    """Each record's membership scores from its answer loss on the bare seed and under the shared pieces:
    "drop", the loss drop; "ratio", the log of the seed's loss over the pieces' (the drop calibrated by the
    record's difficulty). Higher: more likely a member."""
    bare, tuned = np.asarray(bare_losses, float), np.asarray(tuned_losses, float)
    if bare.shape != tuned.shape:
        raise ValueError(f"membership scores need a loss per record in both passes, got {bare.shape} and "
                         f"{tuned.shape}")
    floor = 1e-6  # a mean cross-entropy is > 0; this keeps the log finite where the pieces recite a record
    return {"drop": bare - tuned, "ratio": np.log(np.maximum(bare, floor)) - np.log(np.maximum(tuned, floor))}


# --- extraction ------------------------------------------------------------------------------------------------


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The n-grams of the text's lowercased words (letters and digits; punctuation and URLs' dots split words)."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def ngram_overlap(generation: str, reference: str, n: int) -> float:
    """The share of the generation's n-grams found in the reference (0 when it is shorter than n words)."""
    produced = word_ngrams(generation, n)
    return len(produced & word_ngrams(reference, n)) / len(produced) if produced else 0.0


def extraction_overlap(generation: str, record: PersonalRecord, n: int) -> float:
    """The share of the generation's n-grams found in the record's answer and not in its prompt (0 when the
    generation is shorter than n words)."""
    produced = word_ngrams(generation, n)
    if not produced:
        return 0.0
    private = word_ngrams(record.output, n) - word_ngrams(record.input, n)
    return len(produced & private) / len(produced)


# --- what one forward pass tells about each record -------------------------------------------------------------


@dataclass
class RecordPass:
    """One forward pass over records, in the records' order."""
    losses: np.ndarray  # mean next-token loss over each record's answer tokens
    tokens: np.ndarray  # answer tokens counted per record
    gate_activation: dict[str, np.ndarray] = field(default_factory=dict)  # position -> mean sigmoid(g·x)
    gate_score: dict[str, np.ndarray] = field(default_factory=dict)  # position -> mean LN(x)·LN(g)/sqrt(d)


@torch.no_grad()
def record_pass(seed: LoadedSeed, records: Sequence[PersonalRecord], *, max_len: int,
                adapter: dict[str, LoraBranch] | None = None, gates: dict[str, np.ndarray] | None = None,
                batch_size: int = 8) -> RecordPass:
    """Each record's answer loss under `adapter` (None: the bare seed), and, per position of `gates`, what the
    gate says of the record's inputs to that module, averaged over the tokens that predict its answer."""
    examples = encode_all(seed.tokenizer, records, max_len)
    n = len(examples)
    out = RecordPass(np.zeros(n), np.zeros(n, dtype=int))
    gates = gates or {}
    vectors = {pos: torch.from_numpy(np.asarray(g, np.float32)).to(seed.device) for pos, g in gates.items()}
    normed = {pos: torch.nn.functional.layer_norm(v, v.shape)[None] for pos, v in vectors.items()}
    for pos in gates:
        out.gate_activation[pos], out.gate_score[pos] = np.zeros(n), np.zeros(n)
    state: dict = {}

    def hook(pos: str):
        def read(module, args, output):
            x, mask, rows = args[0], state["mask"], state["rows"]
            m = mask.float()
            active = torch.sigmoid(x.float() @ vectors[pos])  # (b, t)
            out.gate_activation[pos][rows] = ((active * m).sum(1) / m.sum(1).clamp(min=1)).cpu().numpy()
            out.gate_score[pos][rows] = example_scores(x, normed[pos], mask)[0][:, 0].cpu().numpy()
        return read

    handles = [module.register_forward_hook(hook(pos)) for pos, module in modules_at(seed.model, gates).items()]
    order = sorted(range(n), key=lambda i: len(examples[i].input_ids))  # similar lengths together: less padding
    try:
        with attached(seed.model, adapter) if adapter else nullcontext():
            for start in range(0, n, batch_size):
                rows = order[start:start + batch_size]
                batch = collate([examples[i] for i in rows], seed.tokenizer.pad_token_id, seed.device)
                state["mask"], state["rows"] = predicts_answer_mask(batch["labels"]), rows
                logits = seed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                per_token = next_token_loss(logits, batch["labels"], reduction="none")
                counted = (batch["labels"][:, 1:] != IGNORE).sum(dim=1)
                out.losses[rows] = (per_token.sum(dim=1) / counted.clamp(min=1)).cpu().numpy()
                out.tokens[rows] = counted.cpu().numpy()
    finally:
        for h in handles:
            h.remove()
    return out


def pooled_perplexity(losses: np.ndarray, tokens: np.ndarray) -> float:
    """exp of the mean loss over all answer tokens of the records: participants.evaluation.perplexity's figure."""
    return float(np.exp((losses * tokens).sum() / max(tokens.sum(), 1)))
