"""The harness's own settings: which data becomes which virtual users. The rest is the run's schema."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coordinator.settings import RunSettings
from protocols.settings import setting


@dataclass(frozen=True)
class UserSettings:
    """Where virtual users come from and how much each holds."""

    data: str = setting("healthtweets", "'healthtweets', 'styleqa' (or a styleqa folder), or a personal-data "
                                        "JSONL file")
    history: int = setting(16, "history items per user (training and assembly)", low=1)
    test: int = setting(16, "held-out items per user (evaluation)", low=1)


def is_styleqa(data: str) -> bool:
    return data == "styleqa" or Path(data).is_dir()


@dataclass(frozen=True)
class SimulateSettings(RunSettings, UserSettings):
    """`bouquet simulate`: a federated round over virtual users, on the Simulation Engine."""

    users: int | None = setting(None, "virtual participants (default: every user of the data)", low=1)
    cpus_per_client: float = setting(1.0, "CPUs Ray reserves per virtual participant", low=0, low_open=True)
    gpus_per_client: float = setting(0.0, "GPUs Ray reserves per virtual participant", low=0)
    ray_address: str = setting("", "join a running Ray cluster instead of starting one (e.g. auto)")
