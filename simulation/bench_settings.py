"""What one `bouquet bench` run is: its settings, their checks, and the presets that fill them.

Kept free of heavy imports so that the command line can show defaults and refuse bad flags at once.
A run directory stores these settings; a rerun must match them to resume (sweeps may be added).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from protocols.seeds import DEFAULT_SEED

METHODS = ("seed", "oppu", "retrieval", "random", "perpcs", "perpcs+ft")
SWEEPS = ("rho", "topk", "sharers", "history")
# Sized to finish in under 30 minutes on 2 CPU cores with SmolLM2-135M: a LoRA step at 4 x 96 tokens
# takes about 1.5 s there, a forward pass about 0.5 s, greedy generation about 15 tokens/s batched 8.
PRESETS: dict[str, dict[str, dict]] = {
    "small": {
        "styleqa": {"sharers": 9, "targets": 4, "history": 16, "test": 6, "steps": 20, "gate_steps": 10,
                    "max_len": 128, "max_new_tokens": 40},
        "other": {"sharers": 6, "targets": 4, "history": 16, "test": 12, "steps": 30, "gate_steps": 20,
                  "max_len": 96, "max_new_tokens": 32},
    },
}
_AT_LEAST_ONE = ("sharers", "targets", "history", "test", "steps", "gate_steps", "ft_steps", "rank", "batch_size",
                 "max_len", "top_k", "shortlist", "max_new_tokens")


@dataclass(frozen=True)
class BenchSettings:
    data: str = "healthtweets"
    seed_model: str = DEFAULT_SEED
    sharers: int = 4
    targets: int = 2
    history: int = 16
    test: int = 16
    steps: int = 30
    gate_steps: int = 30
    ft_steps: int | None = None  # None: steps // 4 (at least 1)
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    gate_lr: float = 5e-3
    batch_size: int = 4
    max_len: int = 96
    rho: float = 1.0
    top_k: int = 3
    temperature: float = 1.0
    shortlist: int = 6
    max_new_tokens: int = 40
    sweep: tuple[str, ...] = ()
    random_seed: int = 0
    catalog: str = ""  # a seed catalog folder: every participant picks its seed first; "" = all on seed_model

    def __post_init__(self) -> None:
        if self.ft_steps is None:
            object.__setattr__(self, "ft_steps", max(1, self.steps // 4))
        object.__setattr__(self, "sweep", tuple(self.sweep))
        for name in _AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"--rho must be within (0, 1], got {self.rho}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}")
        if self.shortlist < self.top_k:
            raise ValueError(f"--shortlist ({self.shortlist}) must be at least --top-k ({self.top_k})")
        unknown = sorted(set(self.sweep) - set(SWEEPS))
        if unknown:
            raise ValueError(f"unknown sweep {', '.join(unknown)}: choose among {', '.join(SWEEPS)}")
        if self.catalog and self.sweep:
            raise ValueError("--sweep runs on one seed and its pool; with --catalog the targets are spread over "
                             "several seeds: run the sweeps without --catalog")

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def is_styleqa(data: str) -> bool:
    return data == "styleqa" or Path(data).is_dir()


def resolve_settings(preset: str | None = None, **flags) -> BenchSettings:
    """The defaults, then the preset's values for this kind of data, then every flag given (not None)."""
    known = {f.name for f in fields(BenchSettings)}
    unknown = sorted(set(flags) - known)
    if unknown:
        raise ValueError(f"unknown bench settings {unknown}")
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: choose among {', '.join(PRESETS)}")
        data = flags.get("data") or BenchSettings.data
        values |= PRESETS[preset]["styleqa" if is_styleqa(data) else "other"]
    values |= {k: v for k, v in flags.items() if v is not None}
    return BenchSettings(**values)


def check_run_dir(out: Path, settings: BenchSettings) -> None:
    """Record the settings in out/settings.json, or refuse when the run there used other ones."""
    path = out / "settings.json"
    mine = settings.to_json()
    if path.exists():
        theirs = BenchSettings().to_json() | json.loads(path.read_text())  # settings added since: their defaults
        differ = sorted(k for k in mine.keys() | theirs.keys() if k != "sweep" and mine.get(k) != theirs.get(k))
        if differ:
            changes = "; ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in differ)
            raise ValueError(f"{out} holds a bench run with other settings ({changes}); rerun with the same "
                             f"settings to resume it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=1))
