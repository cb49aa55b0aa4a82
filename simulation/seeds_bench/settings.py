"""The seeds bench's settings, and the trainer's and the device's settings it derives from them."""

from __future__ import annotations

from dataclasses import dataclass

from participants.lora_training import LoraSettings
from protocols.settings import ParticipantSettings


@dataclass(frozen=True)
class SeedBenchSettings:
    users_per_style: int = 3
    search_users_per_style: int = 1  # the searches load every seed per user: run them on the first N users only
    history: int = 16
    test: int = 6
    ft_steps: int = 30  # fine-tuning steps from the base and from the selected seed
    eval_every: int = 3
    styles_for_tuning: int = 4  # styles (the first N of the catalog) in comparisons 3 and 4
    sharer_steps: int = 20
    gate_steps: int = 10
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    batch_size: int = 4
    max_len: int = 128
    min_items: int = 2  # successive halving's first budget
    scaling_sizes: tuple[int, ...] = (4, 8, 16, 32)
    random_seed: int = 0

    def lora(self, steps: int) -> LoraSettings:
        return LoraSettings(rank=self.rank, alpha=self.alpha, steps=steps, lr=self.lr, batch_size=self.batch_size,
                            max_len=self.max_len, seed=self.random_seed)

    def participant(self, seed_model: str) -> ParticipantSettings:
        """What a pool's sharers and newcomers run with: they share every piece, newcomers mix 3 of 6."""
        return ParticipantSettings(seed_model=seed_model, lora_rank=self.rank, lora_alpha=self.alpha,
                                   lora_steps=self.sharer_steps, lora_lr=self.lr, gate_steps=self.gate_steps,
                                   gate_lr=5e-3, batch_size=self.batch_size, max_len=self.max_len, share_ratio=1.0,
                                   top_k=3, shortlist=6, rng_seed=self.random_seed)
