"""The coordinator's round settings: the participants' settings plus how a round is run.

The keys live in pyproject's [tool.flwr.app.config] (for `flwr run`) and come from the command line in
`bouquet simulate`; both derive from these fields (protocols.settings). The wire's bounds live here too, in one
place: what one reply may carry, what one contributor may hold, what one newcomer is served, and the piece bounds
(protocols.piece_bounds, declared once there and repeated here by `same_as`).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols.piece_bounds import PieceBounds
from protocols.settings import ParticipantSettings, from_config, same_as, setting, to_config

SHARER_SELECTIONS = ("random", "most-active", "diverse")
PHASES = ("all", "share", "assemble")


@dataclass(frozen=True)
class RunSettings(ParticipantSettings):
    catalog: str = setting("", "a seed catalog folder (`bouquet seeds build`): every participant first picks its "
                               "seed from the explanations, and pieces are pooled per seed (\"\": none)")
    out_dir: str = setting("bouquet-run", "the coordinator's folder: pool, metrics.json")
    sharers: int = setting(4, "participants who train, cut and share pieces", low=1)
    newcomers: int = setting(2, "participants who assemble from the pool and are evaluated", low=0)
    sharer_selection: str = setting("diverse", "how sharers are chosen from the noised profiles",
                                    choices=SHARER_SELECTIONS)
    timeout: float = setting(1800.0, "seconds to wait for the replies of one step", low=0, low_open=True)
    min_nodes: int = setting(0, "wait until this many nodes are connected (0: sharers + newcomers)", low=0)
    phases: str = setting("all", "what this run does: \"all\" (sharers share, then newcomers assemble), \"share\" "
                                 "(sharers only), \"assemble\" (newcomers only: nodes the pool holds no pieces of "
                                 "assemble from what the pool already holds)", choices=PHASES)
    max_reply_pieces: int = setting(4096, "pieces one sharer's reply may carry; a reply with more is refused whole",
                                    low=1)
    max_reply_bytes: int = setting(512 * 2**20, "bytes of arrays one reply may carry; a reply with more is refused "
                                                "whole, before anything in it is decoded", low=1)
    contributor_quota: int = setting(100_000, "pieces one contributor (signing key) may hold in the pool; pieces "
                                              "past it are refused", low=1)
    max_gates_served: int = setting(50_000, "gates one newcomer is served; past it, the same number per position",
                                    low=1)
    profile_dim: int = setting(384, "length of a profile embedding (all-MiniLM-L6-v2's); other lengths are refused",
                               low=1)
    max_a_norm: float = same_as(PieceBounds, "max_a_norm")
    max_b_norm: float = same_as(PieceBounds, "max_b_norm")
    max_scaling: float = same_as(PieceBounds, "max_scaling")
    max_delta_norm: float = same_as(PieceBounds, "max_delta_norm")
    max_gate_norm: float = same_as(PieceBounds, "max_gate_norm")
    max_rank: int = same_as(PieceBounds, "max_rank")

    @classmethod
    def from_run_config(cls, run_config) -> "RunSettings":
        """From Flower's flat run config (keys with '-'); unknown keys are an error."""
        return from_config(cls, run_config)

    def piece_bounds(self) -> PieceBounds:
        """The bounds the pool holds pieces to (a device applies its own: protocols.piece_bounds' defaults)."""
        return from_config(PieceBounds, to_config(self, PieceBounds))

    def participant_config(self) -> dict:
        """What every message's config record carries: the participants' settings only."""
        return to_config(self, ParticipantSettings)
