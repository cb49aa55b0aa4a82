"""The seeds bench's settings: who is benched and how, on top of the run schema's training settings."""

from __future__ import annotations

from dataclasses import dataclass, fields

from participants.lora_training import LoraSettings
from participants.settings import lora_settings
from protocols.settings import ParticipantSettings, same_as


@dataclass(frozen=True)
class SeedBenchSettings(ParticipantSettings):
    lora_steps: int = same_as(ParticipantSettings, "lora_steps", default=20, help="private LoRA steps of a pool's sharers")
    gate_steps: int = same_as(ParticipantSettings, "gate_steps", default=10)
    max_len: int = same_as(ParticipantSettings, "max_len", default=128)
    users_per_style: int = 3
    search_users_per_style: int = 1  # the searches load every seed per user: run them on the first N users only
    history: int = 16
    test: int = 6
    ft_steps: int = 30  # fine-tuning steps from the base and from the selected seed
    eval_every: int = 3
    styles_for_tuning: int = 4  # styles (the first N of the catalog) in comparisons 3 and 4
    min_items: int = 2  # successive halving's first budget
    scaling_sizes: tuple[int, ...] = (4, 8, 16, 32)

    def lora(self, steps: int) -> LoraSettings:
        return lora_settings(self, steps=steps)

    def participant(self, seed_model: str) -> ParticipantSettings:
        """What a pool's sharers and newcomers run with: the run schema's settings, on `seed_model`."""
        return ParticipantSettings(**{f.name: getattr(self, f.name) for f in fields(ParticipantSettings)}
                                   | {"seed_model": seed_model})
