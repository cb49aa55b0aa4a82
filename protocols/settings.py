"""The settings schema: every setting of a run written once, with its default, its range and its help.

A setting is a dataclass field made by `setting(...)`; its metadata carries the help text and the range. From
that one declaration come the command-line flag (`--lora-rank`), the Flower config key (`lora-rank`, in
`[tool.flwr.app.config]` and in the config record every message carries) and the attribute (`lora_rank`):
one name, spelled three ways. `ParticipantSettings` is what a device reads from a message; the coordinator's
round settings and the harness's extend it (coordinator/settings.py, simulation/settings.py). Unknown keys are
refused, never ignored, as nanoGPT's configurator refuses them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from protocols.seeds import DEFAULT_SEED


def setting(default: Any, help: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, choices: tuple[str, ...] | None = None) -> Any:
    """A field with its help and range: `low <= value <= high` (`low < value` when `low_open`)."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "low_open": low_open,
                                            "choices": choices})


def same_as(cls: type, name: str, **changes: Any) -> Any:
    """The field `name` of `cls` declared again in another settings class: same default, range and help."""
    f = cls.__dataclass_fields__[name]
    meta = dict(f.metadata) | {k: v for k, v in changes.items() if k != "default"}
    return field(default=changes.get("default", f.default), metadata=meta)


def key(name: str) -> str:
    """The config key and flag name of an attribute: `lora_rank` -> `lora-rank`."""
    return name.replace("_", "-")


def describe_range(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(m["choices"])
    low, high = m.get("low"), m.get("high")
    if low is None and high is None:
        return ""
    left = ("(" if m.get("low_open") else "[") + (f"{low:g}" if low is not None else "-inf")
    return f"{left}, {high:g}]" if high is not None else f"{left}, inf)"


def problems_of(obj: Any) -> list[str]:
    """Each setting out of its range or of the wrong type, in words that name the key."""
    problems = []
    for f in fields(obj):
        value, m = getattr(obj, f.name), f.metadata
        if "help" not in m or value is None:
            continue
        if m.get("choices") and value not in m["choices"]:
            problems.append(f"{key(f.name)} must be one of {', '.join(m['choices'])}, got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{key(f.name)} must be a finite number, got {value}")
            continue
        low, high = m.get("low"), m.get("high")
        too_low = low is not None and (value <= low if m.get("low_open") else value < low)
        if too_low or (high is not None and value > high):
            problems.append(f"{key(f.name)} must be within {describe_range(f)}, got {value}")
    return problems


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """A config value (Flower's run config gives TOML types) as the field's type."""
    kind = type(f.default) if f.default is not None else str
    if kind is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false"):
                raise ValueError(f"{key(f.name)} must be true or false, got {value!r}")
            return value.lower() == "true"
        return bool(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{key(f.name)} must be a whole number, got {value}")
    return kind(value)


def from_config(cls: type, config: Any, *, allow_unknown: bool = False) -> Any:
    """Settings from a flat key -> value mapping (Flower's run config or a message's config record); missing
    keys keep their defaults, unknown keys are an error naming the known ones."""
    known = {key(f.name): f for f in fields(cls) if "help" in f.metadata}
    given = dict(config.items())
    unknown = sorted(set(given) - set(known))
    if unknown and not allow_unknown:
        raise ValueError(f"unknown settings {unknown}; known: {sorted(known)}")
    return cls(**{known[k].name: coerce(known[k], v) for k, v in given.items() if k in known})


def to_config(obj: Any, of: type | None = None) -> dict:
    """The settings (those of class `of` only, when given) as a flat config: key -> value."""
    names = {f.name for f in fields(of or obj)}
    return {key(f.name): getattr(obj, f.name) for f in fields(obj) if f.name in names and "help" in f.metadata}


def check(obj: Any, *extra: str) -> None:
    problems = problems_of(obj) + [p for p in extra if p]
    if problems:
        raise ValueError("bad settings: " + "; ".join(problems))


@dataclass(frozen=True)
class ParticipantSettings:
    """What a device reads from the config record of every message: how to train, share and assemble."""

    seed_model: str = setting(DEFAULT_SEED, "the base model: embedded:smollm2-135m-instruct, tiny-random, a local "
                                            "Hugging Face folder or a hub id")
    lora_rank: int = setting(8, "rank r of the private LoRA", low=1)
    lora_alpha: float = setting(16.0, "LoRA alpha (the update is scaled by alpha / r)", low=0, low_open=True)
    lora_steps: int = setting(30, "private LoRA training steps", low=1)
    lora_lr: float = setting(1e-3, "private LoRA learning rate", low=0, low_open=True)
    lora_dropout: float = setting(0.05, "dropout on the private LoRA's input while AdamW trains it (0: none; its "
                                        "random masks cost a bf16 step on an AMX CPU about 0.8 s of 1.9)",
                                  low=0, high=0.9)
    dp_lora_lr: float = setting(1e-2, "the private LoRA's learning rate on a device whose policy trains it by "
                                      "DP-SGD (piece-epsilon): the noise needs a larger step", low=0, low_open=True)
    dp_lora_steps: int = setting(24, "the private LoRA's steps on a device whose policy trains it by DP-SGD, in place "
                                     "of lora-steps: a noisy step teaches less, so DP needs more of them",
                                 low=1)
    dp_lora_targets: str = setting("q_proj,k_proj,v_proj,o_proj",
                                   "comma-separated projections the private LoRA covers on a device whose policy "
                                   "trains it by DP-SGD: the noise is spread over every trained number, so fewer "
                                   "positions (e.g. v_proj) keep more of the signal; only these positions are cut "
                                   "into pieces")
    dp_batch_size: int = setting(16, "the expected Poisson batch (records) of DP-SGD's steps, LoRA and gates: the "
                                     "noise on a step's mean gradient falls as the batch grows", low=1)
    gate_steps: int = setting(30, "gate training steps per sharer, for lm and contrast gates (0: lm gates stay at "
                                    "zero)", low=0)
    gate_lr: float = setting(5e-3, "gate learning rate", low=0, low_open=True)
    gate_objective: str = setting("centroid", "what a gate learns: centroid (the mean of the sharer's own answer "
                                              "features, in forward passes only; the default: on 16 health-tweet "
                                              "folds the own piece ranks first 87% of the time against lm's 17%), lm "
                                              "(the LoRA's own loss through a sigmoid input gate, as Per-Pcs) or "
                                              "contrast (its answers against the seed's answers to the same prompts, "
                                              "forward passes only); under DP-SGD a centroid is released as a noised "
                                              "sum, and contrast trains lm gates",
                                  choices=("lm", "centroid", "contrast"))
    batch_size: int = setting(4, "training batch size", low=1)
    max_len: int = setting(96, "tokens per training, assembly and evaluation sequence", low=8)
    share_ratio: float = setting(1.0, "the fraction of its pieces a sharer sends to the pool", low=0, high=1,
                                 low_open=True)
    top_k: int = setting(3, "pieces mixed per position", low=1)
    dp_top_k: int = setting(6, "pieces mixed per position where every candidate was trained by DP-SGD (its ε in "
                               "the piece), at most the shortlist: the sharers' noise is independent and averages "
                               "out over more pieces (16 health-tweet users at ε 8: 6 beat 3 for 13 of 16, while "
                               "without DP 3 beat 6 for 7 of 8)", low=1)
    temperature: float = setting(1.0, "softmax temperature of the mix", low=0, low_open=True)
    dp_temperature: float = setting(10.0, "softmax temperature of the mix at a position where every candidate was "
                                          "trained by DP-SGD: their gates are noised too, so a near-even mix "
                                          "averages more noise away (16 health-tweet users at ε 8: 3 beat 1 for 15 "
                                          "of 16, 10 beat 3 for 13 of 16)",
                                    low=0, low_open=True)
    mix: str = setting("dw", "how the chosen pieces of a position mix: dw (the updates B A averaged, kept exactly "
                             "at rank top-k x lora-rank; the default) or ab (A and B averaged separately, as "
                             "Per-Pcs; cross terms B_i A_j that no sharer trained)", choices=("dw", "ab"))
    mix_scale: float = setting(1.0, "factor on the assembled update (scale x the mix): a weighted mean of "
                                    "independently trained pieces is shorter than each, as their own directions "
                                    "partly cancel", low=0, low_open=True, high=4)
    mix_norm: str = setting("mean", "the length of a dw mix: mean (the weighted mean of the pieces' updates, shorter "
                                    "than each where their directions differ) or pieces (that mean rescaled to the "
                                    "weighted mean of the pieces' own lengths: never longer than the longest); at a "
                                    "position with any DP-trained candidate the mean is kept. pieces helps where the "
                                    "pool's adapters are short-trained (health tweets, 10 steps: better for 15 of "
                                    "16 targets) and hurts where they are trained longer (48 steps: +0.29 "
                                    "perplexity)", choices=("mean", "pieces"))
    shortlist: int = setting(6, "pieces per position a newcomer downloads after scoring the gates (>= top-k)",
                             low=1)
    gate_records: int = setting(0, "history items a newcomer scores the pool's gates on before choosing what to "
                                   "download (its last ones; 0: all)", low=0)
    probe_records: int = setting(0, "history items a newcomer tries each contributor's received pieces on, alone, "
                                    "after the download (its last ones): only the probe-keep contributors whose "
                                    "pieces give them the lowest loss are mixed. Gates score how alike the inputs "
                                    "are; this scores whether the pieces help. On 16 health-tweet targets with "
                                    "30-step adapters, 1 item (with assembly-records 4, the whole pool downloaded) "
                                    "took Per-Pcs from 76.3% to 82.9% of OPPU's gain, past the best single sharer, at "
                                    "8.0% of OPPU's compute; on styleqa, where the gates already find the same-style "
                                    "partner, it changed nothing and cost 16.4%. The probe needs each contributor's "
                                    "whole share, so the newcomer downloads every piece of the pool (no gate phase; "
                                    "on the gates' shortlist alone: 78.4%) (0: no probe)", low=0)
    probe_keep: int = setting(3, "contributors whose pieces go on to the mix after the probe, at each position the "
                                 "best-ranked of those that sent a piece there", low=1)
    assembly_records: int = setting(0, "history items the assembly scores the gates on as it mixes (its last ones; "
                                       "0: all): fewer cost less where the probe has already narrowed the pool",
                                    low=0)
    assembly_batch_size: int = setting(8, "history items per assembly forward pass", low=1)
    max_new_tokens: int = setting(40, "greedy generation length when evaluating", low=1)
    generate: bool = setting(True, "evaluate greedy generations (ROUGE) besides perplexity")
    max_seed_distance: float = setting(0.0, "with a catalog: keep the base when the nearest seed's mix of "
                                            "attributes is farther (L1 between shares, 0..2); 0 = always the "
                                            "nearest", low=0, high=2)
    rng_seed: int = setting(0, "the random seed of training, of the shares and of the choice of participants",
                            low=0)
    precision: str = setting("auto", "the frozen base's format: auto (bf16 where the hardware has a fast bf16 path: "
                                      "CUDA, a CPU with AMX; fp32 elsewhere), fp32, or bf16 (refused without bf16 "
                                      "hardware), or int8 (the blocks' linear weights, where memory binds; CPU); "
                                      "what is trained stays fp32", choices=("auto", "fp32", "bf16", "int8"))
    trainer: str = setting("adamw", "how a device trains its LoRA, gates and fine-tune: adamw (backprop), "
                                    "zeroth-order (two forward passes per step, memory of inference), or auto (the "
                                    "device's memory budget in its limits.json picks the one that fits)",
                           choices=("adamw", "zeroth-order", "auto"))
    zo_eps: float = setting(1e-2, "zeroth-order: the perturbation's scale", low=0, high=1, low_open=True)
    zo_lr: float = setting(4e-2, "zeroth-order: the LoRA learning rate, of a step's mean over its directions (on "
                                 "health tweets, factors B: one direction at 1e-2 learns fastest, 3e-2 diverges; "
                                 "four at 4e-2 learn faster per forward pass)", low=0, high=1, low_open=True)
    zo_gate_lr: float = setting(1e-3, "zeroth-order: the gate learning rate", low=0, high=1, low_open=True)
    zo_perturbations: int = setting(4, "zeroth-order: random directions averaged per step (2 forward passes each)",
                                    low=1, high=64)
    zo_schedule: str = setting("cosine", "zeroth-order: learning-rate schedule over the steps (at lr 4e-2 a "
                                         "constant rate diverged after about 50 steps on a health-tweet user; "
                                         "cosine's decay did not, over 80)", choices=("constant", "linear", "cosine"))
    zo_factors: str = setting("B", "zeroth-order: the LoRA factors perturbed and trained: AB (both), or B (the "
                                     "up-projection only; A keeps its initial value, as LoRA-FA does): B starts "
                                     "at zero, so A's slope is zero there and perturbing A adds only noise",
                              choices=("AB", "B"))
    zo_step_factor: int = setting(3, "zeroth-order: steps per step the adamw settings ask for (lora-steps, "
                                     "gate-steps and fine-tune steps are multiplied by it; 3 steps of 4 directions "
                                     "took about 8× an AdamW step's time on CPU)", low=1, high=1000)

    def __post_init__(self) -> None:
        check(self, self.shortlist < self.top_k and f"shortlist ({self.shortlist}) must be at least top-k "
                                                    f"({self.top_k})",
              _projection_list_problem("dp-lora-targets", self.dp_lora_targets),
              self.mix_norm != "mean" and self.mix != "dw" and f"mix-norm {self.mix_norm} rescales a dw mix: use "
                                                               f"mix dw, or mix-norm mean with mix {self.mix}")

    @property
    def dp_targets(self) -> tuple[str, ...]:
        """dp-lora-targets as the module names a LoRA covers."""
        return projection_names(self.dp_lora_targets)


def projection_names(text: str) -> tuple[str, ...]:
    """'q_proj, v_proj' -> ('q_proj', 'v_proj'): module names, in the order given, without repeats."""
    return tuple(dict.fromkeys(name.strip() for name in str(text).split(",") if name.strip()))


def _projection_list_problem(name: str, text: str) -> str | None:
    names = projection_names(text)
    if not names:
        return f"{name} must name at least one projection (e.g. v_proj or q_proj,k_proj,v_proj,o_proj), got {text!r}"
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        return f"{name}: {', '.join(map(repr, bad))} is not a module name (write e.g. v_proj or q_proj,v_proj)"
    return None
