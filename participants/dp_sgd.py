"""DP-SGD for what a sharer trains and sends (its LoRA and its gates): per-record clipping and Gaussian noise.

A sharer that sets `piece-epsilon` in its policy trains both phases as DP-SGD (Abadi et al. 2016):

    each step   every history record joins the batch with probability q = dp-batch-size / n (Poisson sampling)
                g_i = the gradient of record i's answer loss, clipped to ||g_i|| <= C (over all trained tensors)
                g   = (Σ g_i + N(0, σ²C² I)) / (q n)            then the optimizer's step on g

σ (the noise multiplier) is the smallest that keeps all the steps of both phases (dp-lora-steps of the LoRA, then
gate-steps of its gates) within (ε, δ) under Opacus's RDP accountant: the LoRA and its gates are one release, and
`run_dp_steps` counts every step it takes against the plan and refuses one more. The privacy unit is one history
record (add or remove one), the accountant's. The pieces are post-processing of that release, so the ε in each
piece's metadata covers everything a sharer sends (A, B and gate). The noise and the sampling come from the OS's
randomness, unless the policy pins them for an experiment.

What keeps utility is records. The noise on a step's mean gradient is σC/(qn) on each of the LoRA's 0.92 M
parameters (rank 8 on q, k, v, o of SmolLM2-135M; 0.18 M on v alone, `dp-lora-targets`: at the start of
training the value projections hold about 68% of the LoRA-B gradient's energy in 12.5% of its dimensions, so the
noise's norm falls by 2.2x and the signal's by 1.2x); at a fixed ε, σ grows about as q·√T, so the noise a run
accumulates against its signal, σ/(qn√T), falls as 1/n and moves little with the steps T or the batch qn (at
ε = 8: 0.062 for n = 16 in 18 steps of 4; for n = 64, 0.0138 in 30 steps of 16, 0.0129 in 42, 0.0117 in 18 steps
of 32). A device should train on all the records it holds; past that, the optimizer needs its steps (below: 12
steps of 32 learned less than 24 of 16, and 36 of 16 more, at about the same noise). Per-record gradient norms
at the LoRA's start are 1.1-4.7 (medians 1.4-2.9 over three health-tweet accounts), above C = 1: every record
is clipped to the same weight, and AdamW, blind to the gradient's
scale, makes C's value matter little. Where the noise dominates, AdamW's step is SGD's at a fixed rate; momentum SGD
did no better. Measured at ε = 8 (δ 1e-5, C = 1, 6 gate steps counted), the sharer's own adapter on its 16
held-out records (perplexity; cnnhealth: seed 12.32, no DP 4.80 at lora-steps 12 of batch 4; bbchealth: 28.98 and
3.14):

    records  DP steps x expected batch   optimizer, lr       cnnhealth  bbchealth
    16       12 x 4                      AdamW 1e-2            11.03      16.46
    64       24 x 16                     AdamW 1e-2             6.82       5.92
    64       24 x 16                     AdamW 2e-2 / 5e-3   7.89 / 8.65
    64       24 x 16                     SGD 1.3e-2, m 0.9      8.69
    64       12 x 32                     AdamW 1e-2             7.27
    64       36 x 16                     AdamW 1e-2             5.97

The default is dp-lora-steps 24 of expected batch 16 at dp-lora-lr 1e-2 (each record drawn about 6 times at
n = 64), the setting the 4-user audit in the README ran at; 36 steps did better on cnnhealth and is the next
to audit over 16 users.

Centroid gates (participants.feature_gates) are not trained but released once: the sum over every record of its
answer features, each record's clipped to C, plus N(0, σ²C² I), at the same σ. The accountant composes that
full-batch release (q = 1) with the LoRA's steps, so the share's ε still covers everything it sends.

Per-record gradients of the LoRA come from one backward pass over a few records at a time
(participants.per_record_grads: exact for linear weights); the trained gates of participants.lora_hooks, which
are not linear weights, take a backward pass per record.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch

from participants.chat_data import Example, collate, next_token_loss, record_answer_losses
from participants.per_record_grads import PerRecordGradients, linear_owners
from participants.progress import progress

# RDP orders searched by the accountant: Opacus's defaults reach only 63, too few for small σ
ALPHAS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256)))


@dataclass(frozen=True)
class DpSgd:
    """What the device's policy asks of a share: (ε, δ) for the whole share, and the per-record clip C."""
    epsilon: float
    delta: float = 1e-5
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"DP-SGD epsilon must be a finite number > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"DP-SGD delta must be within (0, 1), got {self.delta}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"DP-SGD clip norm must be a finite number > 0, got {self.clip_norm}")

    def plan(self, records: int, batch_size: int, steps: int, generator: torch.Generator,
             full_releases: int = 0) -> "DpPlan":
        """The noise for `steps` steps of expected batch `batch_size` over `records` records, and `full_releases`
        releases of a clipped sum over every record (participants.feature_gates' private centroids), all at
        one noise multiplier and together within (ε, δ)."""
        if records < 1 or steps < 1:
            raise ValueError(f"DP-SGD needs at least one record and one step, got {records} and {steps}")
        q = min(1.0, batch_size / records)

        def history(sigma: float) -> list[tuple[float, float, int]]:
            return [(sigma, q, steps)] + ([(sigma, 1.0, full_releases)] if full_releases else [])

        if full_releases:
            sigma = composed_noise_multiplier(self.epsilon, self.delta, history)
        else:
            sigma = noise_multiplier(self.epsilon, self.delta, q, steps)
        return DpPlan(sigma, q, self.clip_norm, steps, self.delta, spent_epsilon_of(history(sigma), self.delta),
                      generator, full_releases)


@dataclass
class DpPlan:
    """One share's DP-SGD: its noise multiplier σ, sampling rate q and clip C, for `steps` steps in all."""
    noise_multiplier: float
    sample_rate: float
    clip_norm: float
    steps: int
    delta: float
    epsilon: float  # what the accountant gives for all the steps: at most the policy's
    generator: torch.Generator  # the sampling and the noise: the OS's randomness unless pinned
    full_releases: int = 0  # noised sums over every record (q = 1), besides the steps
    taken: int = 0  # steps run under this plan so far: run_dp_steps refuses to run past `steps`


def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": the ALPHAS above reach far enough
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant="rdp", epsilon_tolerance=0.005,
                                          alphas=list(ALPHAS)))


def spent_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    return spent_epsilon_of([(sigma, sample_rate, steps)], delta)


def spent_epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε of a composition of subsampled Gaussian mechanisms, each (noise multiplier, sample rate, steps)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta, alphas=list(ALPHAS)))


def composed_noise_multiplier(epsilon: float, delta: float, history, tolerance: float = 0.005) -> float:
    """The smallest σ (to `tolerance` in ε) with spent_epsilon_of(history(σ)) <= ε, by bisection: ε falls as σ
    grows."""
    low, high = 0.0, 1.0
    while spent_epsilon_of(history(high), delta) > epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {epsilon}")
    while True:
        mid = (low + high) / 2
        spent = spent_epsilon_of(history(mid), delta)
        if spent > epsilon:
            low = mid
        else:
            high = mid
            if epsilon - spent < tolerance * epsilon:
                return high
        if high - low < 1e-6:
            return high


# records per forward and backward pass of a DP-SGD step: the AdamW trainer's batch, so that DP-SGD's activation
# memory stays the trainer's while each step needs a fraction of the passes of one record at a time
MICRO_BATCH = 4


def run_dp_steps(model, examples: list[Example], pad_id: int, device, steps: int, opt, params, plan: DpPlan,
                 desc: str, sched=None, micro_batch: int = MICRO_BATCH):
    """`steps` DP-SGD steps over `examples` (Poisson batches, per-record clipping, Gaussian noise).

    Per-record gradients come from one backward pass per `micro_batch` records where every parameter is a linear
    weight (participants.per_record_grads: the LoRA), else from a backward pass per record (the gates'
    hooks); either way each record's gradient is its own loss's, clipped alone. `micro_batch` 1 forces the
    second path."""
    from participants.lora_training import TrainReport

    if plan.taken + steps > plan.steps:
        raise ValueError(f"{desc}: {steps} more DP-SGD steps would pass the {plan.steps} its ε was accounted for "
                         f"({plan.taken} taken): plan every phase's steps before training")
    owners = linear_owners(model, params) if micro_batch > 1 else None
    clipped_sum = _batched_clipped_sum if owners is not None else _one_by_one_clipped_sum
    report = TrainReport()
    n = len(examples)
    expected = plan.sample_rate * n
    start = time.perf_counter()
    with progress(steps, desc) as bar:
        for _ in range(steps):
            chosen = torch.nonzero(torch.rand(n, generator=plan.generator) < plan.sample_rate).flatten().tolist()
            total = [torch.zeros_like(p) for p in params]
            losses = clipped_sum(model, [examples[i] for i in chosen], pad_id, device, params, owners, plan.clip_norm,
                                 total, micro_batch)
            tokens = sum(len(examples[i].input_ids) for i in chosen)
            std = plan.noise_multiplier * plan.clip_norm
            for acc, p in zip(total, params):
                noise = torch.normal(0.0, std, size=acc.shape, generator=plan.generator).to(acc.device, acc.dtype)
                p.grad = (acc + noise) / expected
            opt.step()
            plan.taken += 1
            if sched is not None:
                sched.step()
            opt.zero_grad(set_to_none=True)
            # an empty Poisson batch still takes its (pure-noise) step; its loss is the last one seen
            report.losses.append(sum(losses) / len(losses) if losses else (report.losses[-1] if report.losses
                                                                         else float("nan")))
            report.step_ends.append(time.perf_counter())
            report.step_tokens.append(tokens)
            report.tokens += tokens
            bar.update(loss=report.losses[-1])
    report.seconds = time.perf_counter() - start
    return report


def _one_by_one_clipped_sum(model, chosen: list[Example], pad_id: int, device, params, owners, clip_norm: float,
                            total: list[torch.Tensor], micro_batch: int) -> list[float]:
    """Σ_i clip(g_i) into `total`, a backward pass per record: exact for any parameter. Returns the losses."""
    losses = []
    for example in chosen:
        batch = collate([example], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = next_token_loss(logits, batch["labels"])
        loss.backward()
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params))
        scale = min(1.0, clip_norm / (float(norm) + 1e-12))
        for acc, p in zip(total, params):
            acc.add_(p.grad, alpha=scale)
            p.grad = None
        losses.append(loss.item())
    return losses


def _batched_clipped_sum(model, chosen: list[Example], pad_id: int, device, params, owners, clip_norm: float,
                         total: list[torch.Tensor], micro_batch: int) -> list[float]:
    """Σ_i clip(g_i) into `total`, a backward pass per `micro_batch` records (linear weights only)."""
    losses = []
    chosen = sorted(chosen, key=lambda e: len(e.input_ids))  # records of like length share a pass: less padding
    with PerRecordGradients(owners) as caught:
        for start in range(0, len(chosen), micro_batch):
            batch = collate(chosen[start:start + micro_batch], pad_id, device)
            per_record = record_answer_losses(model, batch)
            per_record.sum().backward()  # each record's gradient is its own loss's: the records do not mix
            grads = caught.take()
            norms = torch.sqrt(sum((g ** 2).flatten(1).sum(dim=1) for g in grads))
            scale = (clip_norm / (norms + 1e-12)).clamp(max=1.0)
            for acc, g in zip(total, grads):
                acc.add_(torch.einsum("b,b...->...", scale, g).to(acc.dtype))
            for p in params:
                p.grad = None
            losses.extend(per_record.tolist())
    return losses
