"""Settings a participant receives in a message's config record, with defaults for missing keys."""

from __future__ import annotations

from participants.assembly import AssemblySettings
from participants.lora_training import LoraSettings


def _get(cfg, key, default):
    return type(default)(cfg[key]) if key in cfg else default


def lora_settings(cfg) -> LoraSettings:
    d = LoraSettings()
    return LoraSettings(rank=_get(cfg, "lora-rank", d.rank), alpha=_get(cfg, "lora-alpha", d.alpha),
                        steps=_get(cfg, "lora-steps", d.steps), lr=_get(cfg, "lora-lr", d.lr),
                        batch_size=_get(cfg, "batch-size", d.batch_size), max_len=_get(cfg, "max-len", d.max_len),
                        seed=_get(cfg, "seed-number", d.seed))


def assembly_settings(cfg) -> AssemblySettings:
    d = AssemblySettings()
    return AssemblySettings(top_k=_get(cfg, "top-k", d.top_k), temperature=_get(cfg, "temperature", d.temperature),
                            shortlist=_get(cfg, "shortlist", d.shortlist),
                            batch_size=_get(cfg, "assembly-batch-size", d.batch_size),
                            max_len=_get(cfg, "max-len", d.max_len))
