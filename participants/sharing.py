"""The sharer's pipeline, as one function: train a private LoRA, train its gates, cut it into signed pieces and
choose the share that leaves the device. The ClientApp's `share` and the benchmarks both call it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from participants.cutting import choose_share, cut_into_pieces
from participants.dp_sgd import DpPlan, DpSgd
from participants.feature_gates import private_centroid_gates, train_centroid_gates, train_contrast_gates
from participants.gate_training import train_gates
from participants.lora_training import TrainReport, train_private_lora
from participants.seed_loading import LoadedSeed
from participants.settings import lora_settings
from protocols.pieces import Piece
from protocols.records import PersonalRecord
from protocols.settings import ParticipantSettings


@dataclass
class Share:
    pieces: list[Piece]  # the whole adapter, cut and signed: it stays on the device
    shared: list[Piece]  # the share that leaves it
    lora: TrainReport
    gates: TrainReport
    dp: DpPlan | None = None  # how it was trained, when by DP-SGD

    @property
    def epsilon(self) -> float | None:
        return self.dp.epsilon if self.dp else None

    def metrics(self) -> dict[str, float | int]:
        """What a sharer may report about its work: sizes, costs and losses, nothing of its data."""
        metrics = {"pieces-cut": len(self.pieces), "pieces-shared": len(self.shared),
                   "upload-bytes": sum(p.A.nbytes + p.B.nbytes + p.gate.nbytes for p in self.shared),
                   "lora-seconds": self.lora.seconds, "lora-steps": len(self.lora.losses),
                   "lora-tokens": self.lora.tokens, "lora-loss-first": self.lora.losses[0],
                   "lora-loss-last": self.lora.losses[-1], "gate-seconds": self.gates.seconds,
                   "gate-tokens": self.gates.tokens}
        if self.dp is not None:
            metrics |= {"pieces-epsilon": self.dp.epsilon, "pieces-delta": self.dp.delta,
                        "pieces-noise-multiplier": self.dp.noise_multiplier}
        return metrics


def dp_plan(dp: DpSgd, history_size: int, s: ParticipantSettings, share_seed: int) -> DpPlan:
    """The DP-SGD plan of one share: every step of both phases (dp-lora-steps of the LoRA, gate-steps of its gates,
    each of expected batch dp-batch-size) under one (ε, δ), its randomness from the share's secret seed (the
    policy's: the OS's, unless pinned). Centroid gates are not trained but released once over every record;
    contrast gates have no private path and train as lm gates under DP."""
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(hashlib.sha256(f"dp-sgd:{share_seed}".encode()).digest()[:8], "little"))
    if s.gate_objective == "centroid":
        return dp.plan(history_size, s.dp_batch_size, s.dp_lora_steps, generator, full_releases=1)
    return dp.plan(history_size, s.dp_batch_size, s.dp_lora_steps + s.gate_steps, generator)


def train_and_share(seed: LoadedSeed, history: list[PersonalRecord], s: ParticipantSettings, signing_key,
                    share_seed: int, who: str = "sharer", dp: DpSgd | None = None) -> Share:
    """The whole sharer pipeline on one device's history; `share_seed` draws which pieces are shared (and DP-SGD's
    batches and noise). `dp` trains the LoRA and its gates by DP-SGD, its (ε, δ) in every piece. `who` labels the
    progress lines: a device's ClientApp leaves it at "sharer" (its log names no user); a benchmark may name."""
    training = (lora_settings(s, lr=s.dp_lora_lr, steps=s.dp_lora_steps, batch_size=s.dp_batch_size,
                              targets=s.dp_targets)
                if dp is not None else lora_settings(s))
    plan = dp_plan(dp, len(history), s, share_seed) if dp is not None else None
    weights, lora = train_private_lora(seed, history, training, desc=f"{who}: private LoRA", dp=plan)
    if s.gate_objective == "centroid" and plan is None:
        gates, gate = train_centroid_gates(seed, history, list(weights), max_len=s.max_len, desc=f"{who}: gates")
    elif s.gate_objective == "centroid":
        gates, gate = private_centroid_gates(seed, history, list(weights), plan, max_len=s.max_len,
                                             desc=f"{who}: private gates")
    elif s.gate_objective == "contrast" and plan is None:  # under DP-SGD contrast gates fall back to lm gates
        gates, gate = train_contrast_gates(seed, history, list(weights), steps=s.gate_steps, lr=s.gate_lr,
                                           max_len=s.max_len, max_new_tokens=s.max_new_tokens,
                                           rng_seed=s.rng_seed, desc=f"{who}: contrast gates")
    else:
        gates, gate = train_gates(seed, history, weights, training, steps=s.gate_steps, lr=s.gate_lr,
                                  desc=f"{who}: gates", dp=plan)
    pieces = cut_into_pieces(seed.descriptor, weights, gates, s.lora_rank, s.lora_alpha, signing_key,
                             dp=(plan.epsilon, plan.delta) if plan else None)
    return Share(pieces, choose_share(pieces, s.share_ratio, rng_seed=share_seed), lora, gate, plan)
