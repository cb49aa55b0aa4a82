"""Gates as directions in the space of answer features, learned in forward passes only.

A newcomer scores a piece by score = f · LN(g) / sqrt(d), f being the mean over answer-predicting tokens of
LN(x), x the module's input (participants.assembly). The score is linear in f, so a gate is a direction in the
space of these answer features, and what makes it useful is that it points at this sharer's writing. Two ways to
find it from the sharer's own data alone, on the bare seed, without a backward pass through the model:

    centroid   g = the mean of the sharer's own answer features: the newcomer's score is then how close its
               answers sit to the sharer's, layer by layer
    contrast   the sharer's answers against the seed's answers to the same prompts (generic text): g starts at
               the difference of the two means and is refined by logistic regression

Under DP (participants.dp_sgd) a centroid is released as a noised sum: each record's features at every position,
concatenated, are clipped to C together, summed, and N(0, σ²C² I) is added. No division by the record count is
needed: the newcomer reads LN(g), which no positive scale changes. Positions fed the same input (a layer's q, k
and v projections) have the same features; they are released once, so the clip's budget is not split among
copies.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from participants.chat_data import batches, encode_all, predicts_answer_mask
from participants.evaluation import generate
from participants.lora_hooks import modules_at
from participants.lora_training import TrainReport
from participants.progress import progress
from participants.seed_loading import LoadedSeed
from protocols.records import PersonalRecord


@torch.no_grad()
def answer_features(seed: LoadedSeed, records: list[PersonalRecord], positions, max_len: int,
                    batch_size: int = 8) -> tuple[dict[str, torch.Tensor], int]:
    """Per position, one row per record: the mean of LN(x) over its answer-predicting tokens, on the bare seed.
    Records whose answer was cut away entirely are left out. Also returns the tokens the passes ran."""
    examples = [e for e in encode_all(seed.tokenizer, records, max_len) if e.n_target > 0]
    rows: dict[str, list[torch.Tensor]] = {pos: [] for pos in positions}
    state: dict[str, torch.Tensor] = {}

    def make_hook(pos: str):
        def hook(module, args, out):
            x = args[0].float()
            h = F.layer_norm(x, (x.shape[-1],))
            m = state["mask"].unsqueeze(-1).float()
            rows[pos].append((h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1))
        return hook

    handles = [m.register_forward_hook(make_hook(pos)) for pos, m in modules_at(seed.model, positions).items()]
    tokens = 0
    try:
        for batch in batches(examples, batch_size, seed.tokenizer.pad_token_id, seed.device):
            state["mask"] = predicts_answer_mask(batch["labels"])
            seed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            tokens += int(batch["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
    return {pos: torch.cat(r) for pos, r in rows.items()}, tokens


def fit_gate_directions(own: dict[str, torch.Tensor], generic: dict[str, torch.Tensor], steps: int, lr: float,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """Per position, g maximising the logistic likelihood of own (1) against generic (0) under
    logit = a * f·LN(g)/sqrt(d) + b, from g = mean(own) - mean(generic); steps = 0 keeps the difference of means."""
    torch.manual_seed(seed)
    out = {}
    for pos in own:
        pos_f, neg_f = own[pos], generic[pos]
        g = (pos_f.mean(0) - neg_f.mean(0)).clone().requires_grad_(True)
        if steps > 0:
            d = g.shape[0]
            f = torch.cat([pos_f, neg_f])
            y = torch.cat([torch.ones(len(pos_f)), torch.zeros(len(neg_f))]).to(f.device)
            log_a = torch.zeros((), device=f.device, requires_grad=True)
            b = torch.zeros((), device=f.device, requires_grad=True)
            opt = torch.optim.Adam([g, log_a, b], lr=lr)
            for _ in range(steps):
                logit = log_a.exp() * (f @ F.layer_norm(g, (d,))) / math.sqrt(d) + b
                loss = F.binary_cross_entropy_with_logits(logit, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        out[pos] = g.detach().float().cpu().numpy()
    return out


def train_centroid_gates(seed: LoadedSeed, records: list[PersonalRecord], positions, *, max_len: int,
                         desc: str = "centroid gates") -> tuple[dict[str, np.ndarray], TrainReport]:
    """One gate per position: the mean answer feature of the sharer's own records."""
    report = TrainReport()
    start = time.perf_counter()
    with progress(1, desc) as bar:
        own, report.tokens = answer_features(seed, records, positions, max_len)
        bar.update()
    report.seconds = time.perf_counter() - start
    return {pos: f.mean(0).float().cpu().numpy() for pos, f in own.items()}, report


def private_centroid_gates(seed: LoadedSeed, records: list[PersonalRecord], positions, plan, *, max_len: int,
                           desc: str = "private centroid gates") -> tuple[dict[str, np.ndarray], TrainReport]:
    """The centroid gates as one Gaussian-mechanism release of `plan` (participants.dp_sgd.DpPlan): each record's
    features clipped to plan.clip_norm over all positions together, summed, noised with std σC."""
    report = TrainReport()
    start = time.perf_counter()
    with progress(1, desc) as bar:
        own, report.tokens = answer_features(seed, records, positions, max_len)
        bar.update()
    groups: list[list[str]] = []  # positions with identical features: one release each
    for pos in own:
        same = next((g for g in groups if own[g[0]].shape == own[pos].shape and torch.equal(own[g[0]], own[pos])),
                    None)
        if same is None:
            groups.append([pos])
        else:
            same.append(pos)
    rows = torch.cat([own[g[0]].double() for g in groups], dim=1)  # (records, sum of the groups' widths)
    norms = rows.norm(dim=1, keepdim=True)
    clipped = rows * torch.clamp(plan.clip_norm / (norms + 1e-12), max=1.0)
    noise = torch.normal(0.0, plan.noise_multiplier * plan.clip_norm, size=(rows.shape[1],),
                         generator=plan.generator, dtype=torch.float64)
    released = clipped.sum(0) + noise.to(clipped.device)
    gates, offset = {}, 0
    for group in groups:
        width = own[group[0]].shape[1]
        for pos in group:
            gates[pos] = released[offset:offset + width].float().cpu().numpy()
        offset += width
    report.seconds = time.perf_counter() - start
    return gates, report


def train_contrast_gates(seed: LoadedSeed, records: list[PersonalRecord], positions, *, steps: int, lr: float,
                         max_len: int, max_new_tokens: int, rng_seed: int = 0,
                         desc: str = "contrast gates") -> tuple[dict[str, np.ndarray], TrainReport]:
    """One gate per position from the sharer's own answers against the seed's answers to the same prompts."""
    report = TrainReport()
    start = time.perf_counter()
    with progress(3, desc) as bar:
        answers = generate(seed, records, None, max_new_tokens=max_new_tokens)
        generic = [PersonalRecord(r.user, r.input, a) for r, a in zip(records, answers) if a.strip()]
        bar.update(stage="seed answers")
        own_f, own_tokens = answer_features(seed, records, positions, max_len)
        gen_f, gen_tokens = answer_features(seed, generic, positions, max_len) if generic else (
            {pos: torch.zeros_like(v[:0]) for pos, v in own_f.items()}, 0)
        bar.update(stage="features")
        if not len(next(iter(gen_f.values()))):
            gen_f = {pos: torch.zeros_like(v[:1]) for pos, v in own_f.items()}  # nothing generic: own centroid
        gates = fit_gate_directions(own_f, gen_f, steps, lr, rng_seed)
        bar.update(stage="fit")
    report.seconds = time.perf_counter() - start
    # generation runs one forward step per new token over the growing sequence (KV-cached): count its new tokens
    prompt_tokens = sum(len(e.input_ids) - e.n_target for e in encode_all(seed.tokenizer, records, max_len))
    report.tokens = own_tokens + gen_tokens + prompt_tokens + len(records) * max_new_tokens
    return gates, report
