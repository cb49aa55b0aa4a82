"""Zeroth-order training (SPSA, as MeZO and PocketLLM run it): two forward passes per step, memory of inference.

For the trained tensors θ (a LoRA's B, or A and B with zo-factors AB; or the gates), one step on a batch, for
each of n directions:

    z ~ N(0, I) drawn from a per-step seed s (never stored: regenerated from s, tensor by tensor)
    θ += ε z;  ℓ+ = L(θ);   θ -= 2ε z;  ℓ- = L(θ)            (perturbed in place, forward passes only)
    g = (ℓ+ - ℓ-) / (2ε)                                     (a scalar: the slope along z)
    θ += ε z - (η_t / n) g z                                 (restore and update in one regeneration pass)

so no copy of θ, no gradient and no optimizer state exist; the step's whole state is (s, g) per direction. The
forward passes run under inference mode, dropout off. A step whose losses are not finite restores θ, undoes the
previous update by replaying its (s, g), stops, and says so in the report: the adapter returned is the last one
whose neighbourhood still gave finite losses. Same LoRA as PEFT's (y = Wx + α/r · B A x, A Kaiming-uniform, B = 0),
attached with forward hooks (participants.lora_hooks), so its weights cut into pieces like the backprop trainer's.
With factors B (the default), A keeps its Kaiming start, as in LoRA-FA: at B = 0 the loss's slope along A is
zero, so perturbing A only adds noise to every estimate (measured on a health-tweet user at lr 3e-3: with A and B
held-out perplexity rose again after 20 steps; with B alone it kept falling).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from participants.chat_data import answer_loss, encode_all, endless_batches
from participants.lora_hooks import LoraBranch, attached
from participants.lora_training import LoraSettings, LoraWeights, TrainReport
from participants.progress import log, progress
from participants.seed_loading import LoadedSeed
from protocols.records import PersonalRecord
from protocols.settings import ParticipantSettings


@dataclass(frozen=True)
class ZerothOrderSettings:
    """Defaults are the schema's (protocols.settings); participants.settings builds one from a run's settings."""
    eps: float = ParticipantSettings.zo_eps
    lr: float = ParticipantSettings.zo_lr
    gate_lr: float = ParticipantSettings.zo_gate_lr
    perturbations: int = ParticipantSettings.zo_perturbations
    schedule: str = ParticipantSettings.zo_schedule
    factors: str = ParticipantSettings.zo_factors
    step_factor: int = ParticipantSettings.zo_step_factor


@dataclass
class ZerothOrderReport(TrainReport):
    """`tokens` and `step_tokens` count tokens through forward passes (there is no backward)."""
    forward_passes: int = 0
    stopped: str = ""  # why training stopped before its last step, or ""

    @property
    def forward_passes_per_second(self) -> float:
        return self.forward_passes / self.seconds if self.seconds else 0.0


def schedule_factor(schedule: str, step: int, steps: int) -> float:
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - step / steps
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / steps))
    raise ValueError(f"unknown zeroth-order schedule {schedule!r}: constant, linear or cosine")


class Directions:
    """z for each trained tensor, regenerated from a direction's seed: one generator, reseeded per tensor, so a
    tensor's z depends on (seed, its index) only."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.generators = {p.device: torch.Generator(p.device) for p in params}

    def add(self, terms: list[tuple[int, float]]) -> None:
        """θ += Σ c·z_s over the (seed s, coefficient c) terms, tensor by tensor: one z alive at a time."""
        with torch.no_grad():
            for i, p in enumerate(self.params):
                gen = self.generators[p.device]
                for s, c in terms:
                    gen.manual_seed((s * 1_000_003 + i) % 2**63)
                    p.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype), alpha=c)

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params)


def spsa_steps(model: torch.nn.Module, params: list[torch.Tensor], data, steps: int, lr: float,
               zo: ZerothOrderSettings, desc: str, rng_seed: int = 0, on_step=None) -> ZerothOrderReport:
    """Train `params` (tensors the model's forward reads, e.g. through hooks) for `steps` SPSA steps."""
    rng = np.random.default_rng(rng_seed)
    directions = Directions(params)
    report = ZerothOrderReport()
    last_update: list[tuple[int, float]] = []
    n, eps = zo.perturbations, zo.eps
    start = time.perf_counter()
    paused = 0.0

    def loss(batch) -> float:
        with torch.inference_mode():
            return float(answer_loss(model, batch))

    model.eval()  # dropout off: both passes of a direction must see the same function
    with progress(steps, desc) as bar:
        for step in range(steps):
            batch = next(data)
            seeds = [int(s) for s in rng.integers(0, 2**62, size=n)]
            slopes, losses = [], []
            for k, s in enumerate(seeds):
                directions.add([(s, eps)])
                plus = loss(batch)
                directions.add([(s, -2 * eps)])
                minus = loss(batch)
                if not (math.isfinite(plus) and math.isfinite(minus)):
                    directions.add([(s, eps)] + [(t, -c) for t, c in last_update])  # restore; undo the last update
                    report.stopped = (f"the loss turned {'NaN' if math.isnan(plus + minus) else 'infinite'} at step "
                                      f"{step + 1} of {steps}; kept the adapter of step {max(step - 1, 0)}")
                    break
                if k < n - 1:
                    directions.add([(s, eps)])  # back to θ before the next direction; the last one's is folded below
                slopes.append((plus - minus) / (2 * eps))
                losses.append((plus + minus) / 2)
            if report.stopped:
                break
            rate = lr * schedule_factor(zo.schedule, step, steps) / n
            update = [(s, -rate * g) for s, g in zip(seeds, slopes)]
            directions.add(update[:-1] + [(seeds[-1], eps + update[-1][1])])  # restore and update in one pass
            if not directions.finite():
                directions.add([(s, -c) for s, c in update])
                report.stopped = f"the update at step {step + 1} of {steps} overflowed; kept the adapter of step {step}"
                break
            last_update = update
            tokens = int(batch["attention_mask"].sum())
            report.losses.append(float(np.mean(losses)))
            report.forward_passes += 2 * n
            report.step_ends.append(time.perf_counter())
            report.step_tokens.append(2 * n * tokens)
            report.tokens += 2 * n * tokens
            bar.update(loss=report.losses[-1])
            if on_step is not None:
                pause = time.perf_counter()
                on_step(step + 1, report)
                paused += time.perf_counter() - pause
    report.seconds = time.perf_counter() - start - paused
    if report.stopped:
        log.warning("%s: %s", desc, report.stopped)
    return report


def lora_positions(model: torch.nn.Module, targets) -> list[str]:
    """The linear modules a LoRA on `targets` covers, named as PEFT names them (without its prefix)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]


def fresh_lora(model: torch.nn.Module, positions: list[str], rank: int, device) -> dict[str, tuple]:
    """PEFT's initialisation: A Kaiming-uniform (a = √5, as nn.Linear), B zero; fp32 whatever the base."""
    named = dict(model.named_modules())
    out = {}
    for pos in positions:
        m = named[pos]
        A = torch.empty(rank, m.in_features, device=device)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        out[pos] = (A, torch.zeros(m.out_features, rank, device=device))
    return out


def train_lora_zeroth_order(seed: LoadedSeed, records: list[PersonalRecord], settings: LoraSettings,
                            init: LoraWeights | None = None, desc: str = "private LoRA (zeroth-order)",
                            on_step=None) -> tuple[LoraWeights, ZerothOrderReport]:
    """train_private_lora's contract, by SPSA: `settings.steps × step_factor` steps of settings.zeroth_order."""
    zo = settings.zeroth_order
    torch.manual_seed(settings.seed)
    dev = seed.device
    if init is None:
        tensors = fresh_lora(seed.model, lora_positions(seed.model, settings.targets), settings.rank, dev)
    else:
        bad = [pos for pos, (A, _) in init.items() if A.shape[0] != settings.rank]
        if bad:
            raise ValueError(f"{bad[0]}: initial A has rank {init[bad[0]][0].shape[0]}, training uses rank "
                             f"{settings.rank}")
        tensors = {pos: (torch.tensor(A, dtype=torch.float32, device=dev), torch.tensor(B, dtype=torch.float32, device=dev))
                   for pos, (A, B) in sorted(init.items())}
    scaling = settings.alpha / settings.rank
    branches = {pos: LoraBranch(A, B, scaling) for pos, (A, B) in tensors.items()}
    params = [t for A, B in tensors.values() for t in ((A, B) if zo.factors == "AB" else (B,))]
    examples = encode_all(seed.tokenizer, records, settings.max_len)
    data = endless_batches(examples, settings.batch_size, seed.tokenizer.pad_token_id, dev, settings.seed)
    with attached(seed.model, branches):
        report = spsa_steps(seed.model, params, data, settings.steps * zo.step_factor, zo.lr, zo, desc,
                            rng_seed=settings.seed, on_step=on_step)
    weights = {pos: (A.cpu().numpy().copy(), B.cpu().numpy().copy()) for pos, (A, B) in tensors.items()}
    return weights, report


def train_gates_zeroth_order(seed: LoadedSeed, records: list[PersonalRecord], weights: LoraWeights,
                             settings: LoraSettings, steps: int, desc: str = "gates (zeroth-order)"
                             ) -> tuple[dict[str, np.ndarray], ZerothOrderReport]:
    """train_gates's contract, by SPSA on the gates alone (the pieces frozen), from zero."""
    zo = settings.zeroth_order
    dev, scaling = seed.device, settings.alpha / settings.rank
    gates = {pos: torch.zeros(A.shape[1], device=dev) for pos, (A, _) in weights.items()}
    branches = {pos: LoraBranch(torch.from_numpy(A).float().to(dev), torch.from_numpy(B).float().to(dev), scaling,
                                gates[pos]) for pos, (A, B) in weights.items()}
    examples = encode_all(seed.tokenizer, records, settings.max_len)
    data = endless_batches(examples, settings.batch_size, seed.tokenizer.pad_token_id, dev, settings.seed + 1)
    with attached(seed.model, branches):
        report = spsa_steps(seed.model, list(gates.values()), data, steps * zo.step_factor, zo.gate_lr, zo, desc,
                            rng_seed=settings.seed + 1)
    return {pos: g.cpu().numpy() for pos, g in gates.items()}, report
