"""The coordinator's round settings: the participants' settings plus how a round is run.

The keys live in pyproject's [tool.flwr.app.config] (for `flwr run`) and come from the command line in
`bouquet simulate`; both derive from these fields (protocols.settings).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols.settings import ParticipantSettings, from_config, setting, to_config

SHARER_SELECTIONS = ("random", "most-active", "diverse")


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

    @classmethod
    def from_run_config(cls, run_config) -> "RunSettings":
        """From Flower's flat run config (keys with '-'); unknown keys are an error."""
        return from_config(cls, run_config)

    def participant_config(self) -> dict:
        """What every message's config record carries: the participants' settings only."""
        return to_config(self, ParticipantSettings)
