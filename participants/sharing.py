"""The sharer's pipeline, as one function: train a private LoRA, train its gates, cut it into signed pieces and
choose the share that leaves the device. The ClientApp's `share` and the benchmarks both call it."""

from __future__ import annotations

from dataclasses import dataclass

from participants.cutting import choose_share, cut_into_pieces
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

    def metrics(self) -> dict[str, float | int]:
        """What a sharer may report about its work: sizes, costs and losses, nothing of its data."""
        return {"pieces-cut": len(self.pieces), "pieces-shared": len(self.shared),
                "upload-bytes": sum(p.A.nbytes + p.B.nbytes + p.gate.nbytes for p in self.shared),
                "lora-seconds": self.lora.seconds, "lora-steps": len(self.lora.losses), "lora-tokens": self.lora.tokens,
                "lora-loss-first": self.lora.losses[0], "lora-loss-last": self.lora.losses[-1],
                "gate-seconds": self.gates.seconds, "gate-tokens": self.gates.tokens}


def train_and_share(seed: LoadedSeed, history: list[PersonalRecord], s: ParticipantSettings, signing_key,
                    share_seed: int, who: str = "sharer") -> Share:
    """The whole sharer pipeline on one device's history; `share_seed` draws which pieces are shared. `who` labels
    the progress lines: a device's ClientApp leaves it at "sharer" (its log names no user); a benchmark may name."""
    training = lora_settings(s)
    weights, lora = train_private_lora(seed, history, training, desc=f"{who}: private LoRA")
    gates, gate = train_gates(seed, history, weights, training, steps=s.gate_steps, lr=s.gate_lr,
                              desc=f"{who}: gates")
    pieces = cut_into_pieces(seed.descriptor, weights, gates, s.lora_rank, s.lora_alpha, signing_key)
    return Share(pieces, choose_share(pieces, s.share_ratio, rng_seed=share_seed), lora, gate)
