"""What one `bouquet bench` run is: its settings, their checks, and the presets that fill them.

The participants' settings are the run's schema (protocols.settings); the bench adds who is benched. Kept free
of heavy imports so that the command line can show defaults and refuse bad flags at once. A run directory
stores these settings; a rerun must match them to resume (sweeps may be added).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

from coordinator.settings import RunSettings
from participants.privacy_policy import PrivacyPolicy
from protocols.settings import ParticipantSettings, check, same_as, setting
from simulation.settings import UserSettings, is_styleqa

METHODS = ("seed", "oppu", "oppu-tuned", "retrieval", "rag", "random", "lorahub", "perpcs", "perpcs+rag", "perpcs+ft",
           "perpcs+zo")
FOLD_METHODS = ("seed", "oppu", "retrieval", "random", "perpcs")  # the medium preset leaves out perpcs+ft
SWEEPS = ("share-ratio", "top-k", "sharers", "history", "mix-scale")  # named by the setting each changes
# Sized to finish in under 30 minutes on 2 CPU cores with SmolLM2-135M: a LoRA step at 4 x 96 tokens
# takes about 1.5 s there, a forward pass about 0.5 s, greedy generation about 15 tokens/s batched 8.
PRESETS: dict[str, dict[str, dict]] = {
    "small": {
        "styleqa": {"sharers": 9, "targets": 4, "history": 16, "test": 6, "lora_steps": 20, "gate_steps": 10,
                    "max_len": 128, "max_new_tokens": 40},
        "other": {"sharers": 6, "targets": 4, "history": 16, "test": 12, "lora_steps": 30, "gate_steps": 20,
                  "max_len": 96, "max_new_tokens": 32},
    },
    # Every user a target once (rotating folds), the others its sharers: 16 targets on health tweets (all its
    # accounts), 18 on styleqa (two per style). Each user trains and shares once; its adapter is also its OPPU.
    # Sized for at most 2 hours on 2 CPU cores.
    "medium": {
        "styleqa": {"rotate": True, "sharers": 17, "targets": 18, "history": 16, "test": 6, "lora_steps": 20,
                    "gate_steps": 10, "max_len": 128, "max_new_tokens": 40, "gate_records": 6,
                    "methods": FOLD_METHODS},
        "other": {"rotate": True, "sharers": 15, "targets": 16, "history": 16, "test": 12, "lora_steps": 30,
                  "gate_steps": 20, "max_len": 96, "max_new_tokens": 32, "gate_records": 6,
                  "methods": FOLD_METHODS},
    },
}


@dataclass(frozen=True)
class BenchSettings(ParticipantSettings, UserSettings):
    sharers: int = same_as(RunSettings, "sharers")
    targets: int = setting(2, "users who get every method and are evaluated (disjoint from the sharers)", low=1)
    max_share_ratio: float = setting(PrivacyPolicy.max_share_ratio, "every sharer's policy.json max-share-ratio: it "
                                     "sends min(share-ratio, this) of its pieces, as a device does", low=0, high=1,
                                     low_open=True)
    ft_steps: int | None = setting(None, "fine-tune steps of perpcs+ft (default: lora-steps // 4); perpcs+zo takes "
                                         "zo-step-factor times as many zeroth-order steps", low=1)
    lorahub_steps: int = setting(40, "lorahub's candidate weightings after its uniform start (nevergrad NGOpt), each "
                                     "a forward pass over the history (LoraHub's default: 40)", low=1)
    rag_k: int = setting(4, "history items rag and perpcs+rag write into the prompt before each test input: the "
                            "nearest to it by MiniLM embedding (LaMP's retrieval-augmented baselines)", low=1)
    sweep: tuple[str, ...] = setting((), f"comma-separated subset of {','.join(SWEEPS)}: perpcs perplexity as "
                                         f"each changes")
    rotate: bool = setting(False, "rotating folds: each of the --targets users is a target once, its pool made by "
                                  "--sharers of the others (the next ones in a fixed order); every user trains "
                                  "and shares once, and its own adapter is its OPPU")
    methods: tuple[str, ...] = setting(METHODS, f"comma-separated subset of {','.join(METHODS)}")
    catalog: str = same_as(RunSettings, "catalog", help="a seed catalog folder (`bouquet seeds build`, built on "
                           "--seed-model): every sharer and target first picks its seed on its own history, and "
                           "each target's methods run on its seed (\"\": all on --seed-model)")

    # what a run directory written before a setting existed ran with, where that is not today's default
    RAN_BEFORE: ClassVar[dict] = {"max_share_ratio": 1.0, "mix_norm": "mean"}
    # settings that only these methods read (the zeroth-order ones also whenever the run's trainer is not AdamW)
    USED_ONLY_BY: ClassVar[dict] = {"ft_steps": ("perpcs+ft", "perpcs+zo"), "lorahub_steps": ("lorahub",),
                                    "rag_k": ("rag", "perpcs+rag")} | {
        k: ("perpcs+zo",) for k in ("zo_eps", "zo_lr", "zo_gate_lr", "zo_perturbations", "zo_schedule", "zo_factors",
                                    "zo_step_factor")}

    @classmethod
    def unused_by(cls, run: dict) -> set[str]:
        """The settings no result of a run with these settings (a settings.json) depends on: a rerun may change
        them, e.g. add perpcs+zo with other zero-order settings to a run that had no zeroth-order method."""
        methods = set(run.get("methods", ()))
        unused = {k for k, users in cls.USED_ONLY_BY.items() if not methods & set(users)}
        return unused if run.get("trainer", "adamw") == "adamw" else {k for k in unused if not k.startswith("zo_")}

    def __post_init__(self) -> None:
        if self.ft_steps is None:
            object.__setattr__(self, "ft_steps", max(1, self.lora_steps // 4))
        object.__setattr__(self, "sweep", tuple(self.sweep))
        object.__setattr__(self, "methods", tuple(m for m in METHODS if m in self.methods))
        unknown = sorted(set(self.sweep) - set(SWEEPS))
        check(self, self.shortlist < self.top_k and f"shortlist ({self.shortlist}) must be at least top-k "
                                                    f"({self.top_k})",
              unknown and f"unknown sweep {', '.join(unknown)}: choose among {', '.join(SWEEPS)}",
              self.rotate and self.sharers >= self.targets and f"with --rotate the sharers of a fold are "
              f"other targets: --sharers ({self.sharers}) must be below --targets ({self.targets})",
              self.rotate and (self.catalog or self.sweep) and "--rotate runs on one seed without sweeps: leave out "
                                                               "--catalog and --sweep",
              not self.methods and f"no known method in --methods: choose among {', '.join(METHODS)}",
              self.catalog and self.sweep and "sweep runs on one seed and its pool; with a catalog the targets "
                                              "are spread over several seeds: run the sweeps without --catalog")

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def sent_share_ratio(self, requested: float | None = None) -> float:
        """The share a sharer sends when `requested` (default: share-ratio) is asked: what its policy allows."""
        policy = PrivacyPolicy(max_share_ratio=self.max_share_ratio)
        return policy.share_ratio(self.share_ratio if requested is None else requested)


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


def check_run_dir(out: Path, settings, may_grow: tuple[str, ...] = ("sweep", "methods")) -> None:
    """Record the settings in out/settings.json, or refuse when the run there used other ones (those named in
    `may_grow`, lists of sweep points, may differ: a rerun adds points; so may those the settings class says no result
    there depends on, its `unused_by`). `settings`: a settings dataclass with
    to_json(), such as BenchSettings."""
    path = out / "settings.json"
    mine = settings.to_json()
    if path.exists():
        # settings added since: their defaults, or what runs from before them did
        theirs = type(settings)().to_json() | getattr(settings, "RAN_BEFORE", {}) | json.loads(path.read_text())
        free = set(may_grow) | (settings.unused_by(theirs) if hasattr(settings, "unused_by") else set())
        differ = sorted(k for k in mine.keys() | theirs.keys() if k not in free and mine.get(k) != theirs.get(k))
        if differ:
            changes = "; ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in differ)
            raise ValueError(f"{out} holds a bench run with other settings ({changes}); rerun with the same "
                             f"settings to resume it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=1))
