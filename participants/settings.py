"""The trainer's and the assembler's settings, read off the one schema (protocols.settings)."""

from __future__ import annotations

from dataclasses import replace

from participants.assembly import AssemblySettings
from participants.lora_training import LoraSettings
from participants.zeroth_order import ZerothOrderSettings
from protocols.settings import ParticipantSettings


def zeroth_order_settings(s: ParticipantSettings) -> ZerothOrderSettings:
    return ZerothOrderSettings(eps=s.zo_eps, lr=s.zo_lr, gate_lr=s.zo_gate_lr, perturbations=s.zo_perturbations,
                               schedule=s.zo_schedule, factors=s.zo_factors,
                               step_factor=s.zo_step_factor)


def lora_settings(s: ParticipantSettings, **changes) -> LoraSettings:
    """`trainer auto` reaching here was not resolved by a device's memory budget (participants.trainer_choice):
    with no budget nothing binds, so it trains with AdamW."""
    trainer = "adamw" if s.trainer == "auto" else s.trainer
    return replace(LoraSettings(rank=s.lora_rank, alpha=s.lora_alpha, steps=s.lora_steps, lr=s.lora_lr,
                                dropout=s.lora_dropout,
                                batch_size=s.batch_size, max_len=s.max_len, seed=s.rng_seed, trainer=trainer,
                                zeroth_order=zeroth_order_settings(s)), **changes)


def assembly_settings(s: ParticipantSettings, **changes) -> AssemblySettings:
    return replace(AssemblySettings(top_k=s.top_k, dp_top_k=s.dp_top_k, temperature=s.temperature,
                                    dp_temperature=s.dp_temperature,
                                    shortlist=s.shortlist,
                                    batch_size=s.assembly_batch_size, max_len=s.max_len, mix=s.mix,
                                    scale=s.mix_scale, norm=s.mix_norm), **changes)
