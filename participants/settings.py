"""The trainer's and the assembler's settings, read off the one schema (protocols.settings)."""

from __future__ import annotations

from dataclasses import replace

from participants.assembly import AssemblySettings
from participants.lora_training import LoraSettings
from protocols.settings import ParticipantSettings


def lora_settings(s: ParticipantSettings, **changes) -> LoraSettings:
    return replace(LoraSettings(rank=s.lora_rank, alpha=s.lora_alpha, steps=s.lora_steps, lr=s.lora_lr,
                                batch_size=s.batch_size, max_len=s.max_len, seed=s.rng_seed), **changes)


def assembly_settings(s: ParticipantSettings, **changes) -> AssemblySettings:
    return replace(AssemblySettings(top_k=s.top_k, temperature=s.temperature, shortlist=s.shortlist,
                                    batch_size=s.assembly_batch_size, max_len=s.max_len, mix=s.mix), **changes)
