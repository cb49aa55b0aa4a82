"""The coordinator's run settings: one place for their names, defaults and checks.

The same keys live in pyproject's [tool.flwr.app.config] (for `flwr run`) and are set by
`bouquet simulate` from its command line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from protocols.seeds import DEFAULT_SEED


@dataclass
class RunSettings:
    seed: str = DEFAULT_SEED
    catalog: str = ""  # a seed catalog folder: every participant first picks its seed from it ("" = none)
    max_seed_distance: float = 0.0  # mix L1 (0..2) beyond which a participant keeps the base; 0 = nearest
    out_dir: str = "bouquet-run"
    num_sharers: int = 4
    num_newcomers: int = 2
    sharer_selection: str = "diverse"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_steps: int = 30
    lora_lr: float = 1e-3
    gate_steps: int = 30
    gate_lr: float = 5e-3
    batch_size: int = 4
    max_len: int = 96
    share_ratio: float = 1.0
    top_k: int = 3
    temperature: float = 1.0
    shortlist: int = 6
    max_new_tokens: int = 40
    generate: bool = True
    profile_noise: float = 0.02  # std per coordinate of the noise on a participant's mean embedding
    seed_number: int = 0
    timeout: float = 1800.0
    min_nodes: int = 0  # wait until this many nodes are connected (0: num_sharers + num_newcomers)

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.share_ratio <= 1.0:
            problems.append(f"share-ratio must be within [0, 1], got {self.share_ratio}")
        for name in ("num_sharers", "lora_rank", "lora_steps", "top_k", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.num_newcomers < 0 or self.gate_steps < 0:
            problems.append("num-newcomers and gate-steps cannot be negative")
        if self.temperature <= 0:
            problems.append(f"temperature must be positive, got {self.temperature}")
        if self.max_seed_distance < 0:
            problems.append(f"max-seed-distance cannot be negative, got {self.max_seed_distance}")
        if self.shortlist < self.top_k:
            problems.append(f"shortlist ({self.shortlist}) must be at least top-k ({self.top_k})")
        if problems:
            raise ValueError("bad run settings: " + "; ".join(problems))

    @classmethod
    def from_run_config(cls, run_config: dict) -> "RunSettings":
        """Build from Flower's flat run config (keys with '-'); unknown keys are an error."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ValueError(f"unknown run config keys {unknown}; known: {sorted(known)}")
        kwargs = {}
        for key, value in run_config.items():
            f = known[key]
            kwargs[f.name] = value if f.type in ("str",) else type(getattr(cls(), f.name))(value)
        return cls(**kwargs)

    def participant_config(self) -> dict:
        """The subset sent to participants in every message's config record."""
        keys = ("seed", "lora_rank", "lora_alpha", "lora_steps", "lora_lr", "gate_steps", "gate_lr", "batch_size",
                "max_len", "share_ratio", "top_k", "temperature", "shortlist", "max_new_tokens", "generate",
                "profile_noise", "seed_number", "max_seed_distance")
        return {k.replace("_", "-"): v for k, v in asdict(self).items() if k in keys}
