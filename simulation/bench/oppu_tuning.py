"""A fair OPPU: the private LoRA's learning rate and steps chosen on a validation split of the target's own history,
as one would tune a private adapter, then trained on the whole history with them.

The grid is the run's learning rate divided and multiplied by 3, each trained for twice the run's steps on the
first three quarters of the history, with the held-out quarter's perplexity read every third of the run's steps.
Checkpoints along one cosine schedule stand in for shorter schedules: the final run uses the chosen steps with its
own schedule, so it is close to, not exactly, the checkpoint that won.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from participants.evaluation import perplexity
from participants.lora_training import LoraSettings, LoraWeights, TrainReport, train_private_lora
from participants.seed_loading import LoadedSeed
from protocols.records import PersonalRecord


@dataclass
class Tuned:
    weights: LoraWeights
    report: TrainReport  # the final run on the whole history
    lr: float
    steps: int
    tuning_tokens: int  # forward + backward tokens of the grid runs (validation passes not counted)
    curves: dict[str, list[tuple[int, float]]]  # lr -> (step, validation perplexity)


def tune_private_lora(seed: LoadedSeed, history: list[PersonalRecord], base: LoraSettings, desc: str = "oppu",
                      ) -> Tuned:
    if len(history) < 4:
        raise ValueError(f"tuning needs at least 4 history items to hold a quarter out, got {len(history)}")
    held = max(1, len(history) // 4)
    train, val = history[:-held], history[-held:]
    every = max(1, base.steps // 3)
    curves: dict[str, list[tuple[int, float]]] = {}
    tokens = 0
    for lr in (base.lr / 3, base.lr, base.lr * 3):
        curve: list[tuple[int, float]] = []

        def on_step(step: int, report: TrainReport, curve=curve) -> None:
            if step % every == 0:
                curve.append((step, perplexity(seed, val, None, max_len=base.max_len)))

        _, report = train_private_lora(seed, train, replace(base, lr=lr, steps=2 * base.steps),
                                       desc=f"{desc}: tuning lr {lr:g}", on_step=on_step)
        tokens += 2 * report.tokens
        curves[f"{lr:g}"] = curve
    lr_text, (steps, _) = min(((k, point) for k, c in curves.items() for point in c), key=lambda kp: kp[1][1])
    weights, report = train_private_lora(seed, history, replace(base, lr=float(lr_text), steps=steps),
                                         desc=f"{desc}: tuned")
    return Tuned(weights, report, float(lr_text), steps, tokens, curves)
