"""Private LoRA training with PEFT on the participant's own records (loss on its answers only)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from participants.chat_data import answer_loss, encode_all, endless_batches
from participants.dp_sgd import MICRO_BATCH, DpPlan, run_dp_steps
from participants.progress import progress
from participants.seed_loading import LoadedSeed
from protocols.records import PersonalRecord
from protocols.settings import ParticipantSettings

if TYPE_CHECKING:
    from participants.zeroth_order import ZerothOrderSettings

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_PROJECTIONS = DEFAULT_TARGETS + ("gate_proj", "up_proj", "down_proj")  # attention and MLP of a Llama block


@dataclass
class LoraSettings:
    rank: int = ParticipantSettings.lora_rank
    alpha: float = ParticipantSettings.lora_alpha
    steps: int = ParticipantSettings.lora_steps
    lr: float = ParticipantSettings.lora_lr
    batch_size: int = ParticipantSettings.batch_size
    max_len: int = ParticipantSettings.max_len
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = ParticipantSettings.lora_dropout
    seed: int = ParticipantSettings.rng_seed
    dp_micro_batch: int = MICRO_BATCH  # records per backward pass under DP-SGD (1: one at a time)
    trainer: str = "adamw"  # or "zeroth-order" (participants.zeroth_order); "auto" is resolved before, by the device
    zeroth_order: ZerothOrderSettings = field(default_factory=lambda: _zeroth_order_defaults())


def _zeroth_order_defaults() -> ZerothOrderSettings:
    from participants.zeroth_order import ZerothOrderSettings  # it builds on this module

    return ZerothOrderSettings()


@dataclass
class TrainReport:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0  # tokens through forward and backward
    step_ends: list[float] = field(default_factory=list)  # perf_counter() after each step (loss synced)
    step_tokens: list[int] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


LoraWeights = dict[str, tuple[np.ndarray, np.ndarray]]  # position -> (A, B), float32


def train_private_lora(seed: LoadedSeed, records: list[PersonalRecord], settings: LoraSettings,
                       init: LoraWeights | None = None, desc: str = "private LoRA",
                       on_step=None, dp: DpPlan | None = None) -> tuple[LoraWeights, TrainReport]:
    """Train a LoRA on the records; return its weights per position and what it cost.

    `init` starts from given weights (e.g. an assembled adapter) instead of PEFT's fresh init.
    `on_step(step, report)`, if given, runs after every step with the LoRA in place on `seed.model`
    (e.g. to measure a held-out loss along the way); its time is not counted in the report.
    `dp`, if given, trains by DP-SGD (participants.dp_sgd) instead: Poisson batches, per-record clipping, noise.
    The cached seed model is restored (LoRA layers unloaded) before returning.
    """
    if settings.trainer == "zeroth-order":
        if dp is not None:
            raise ValueError("DP-SGD trains with gradients: the zeroth-order trainer has no private path")
        from participants.zeroth_order import train_lora_zeroth_order

        return train_lora_zeroth_order(seed, records, settings, init, desc, on_step)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets) if init is None else sorted(init),
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(seed.model, config)
    try:
        layers = _lora_layers(model)
        if init is not None:
            _load_weights(layers, init, settings.rank, seed.device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / settings.steps)))
        examples = encode_all(seed.tokenizer, records, settings.max_len)
        model.train()
        if dp is not None:
            if on_step is not None:
                raise ValueError("on_step is not available with DP-SGD")
            report = run_dp_steps(model, examples, seed.tokenizer.pad_token_id, seed.device, settings.steps, opt,
                                  params, dp, desc, sched=sched, micro_batch=settings.dp_micro_batch)
        else:
            data = endless_batches(examples, settings.batch_size, seed.tokenizer.pad_token_id, seed.device,
                                   settings.seed)
            report = run_steps(model, data, settings.steps, opt, params, desc, sched=sched, clip=1.0,
                               on_step=on_step)
        weights = {pos: (layer.lora_A["default"].weight.detach().float().cpu().numpy().copy(),
                         layer.lora_B["default"].weight.detach().float().cpu().numpy().copy())
                   for pos, layer in layers.items()}
        return weights, report
    finally:
        model.eval()
        model.unload()  # back to the bare seed, shared by everything in this process
        seed.model.requires_grad_(False)


def run_steps(model, data, steps: int, opt, params, desc: str, sched=None, clip: float | None = None,
              on_step=None) -> TrainReport:
    """The step loop both trainers share: answer-token loss, backward, optimizer, progress."""
    report = TrainReport()
    start = time.perf_counter()
    paused = 0.0  # time spent in on_step, left out of the report
    with progress(steps, desc) as bar:
        for step in range(steps):
            batch = next(data)
            loss = answer_loss(model, batch)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad(set_to_none=True)
            report.losses.append(loss.item())
            report.step_ends.append(time.perf_counter())
            report.step_tokens.append(int(batch["attention_mask"].sum()))
            report.tokens += report.step_tokens[-1]
            bar.update(loss=report.losses[-1])
            if on_step is not None:
                pause = time.perf_counter()
                model.eval()
                on_step(step + 1, report)
                model.train()
                paused += time.perf_counter() - pause
    report.seconds = time.perf_counter() - start - paused
    return report


def _lora_layers(peft_model) -> dict:
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name[len(prefix):] if name.startswith(prefix) else name: m
            for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def _load_weights(layers: dict, init: LoraWeights, rank: int, device) -> None:
    with torch.no_grad():
        for pos, (A, B) in init.items():
            if A.shape[0] != rank:
                raise ValueError(f"{pos}: initial A has rank {A.shape[0]}, training uses rank {rank}")
            layer = layers[pos]
            layer.lora_A["default"].weight.copy_(torch.from_numpy(A).to(device))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(B).to(device))
