"""The harness's own settings: which data becomes which virtual users. The rest is the run's schema."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from coordinator.settings import RunSettings
from protocols.settings import key, setting


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
    audit_wire: bool = setting(False, "record every message in both directions and search them, the coordinator's "
                                      "files and its log for each user's name, device path and every 20 characters "
                                      "of its records; the result in OUT-DIR/wire-audit.json")
    # every virtual device's privacy policy (participants.privacy_policy): the defaults, a file, then these flags
    policy: str = setting("", "a policy.json that every virtual device uses (default: the safe defaults); its "
                              "randomness is pinned from --rng-seed unless the file pins it")
    max_share_ratio: float | None = setting(None, "the devices' policy key max-share-ratio (default 0.5)", low=0,
                                            high=1, low_open=True)
    piece_epsilon: float | None = setting(None, "the devices' policy key piece-epsilon: train shared pieces and "
                                                "gates by DP-SGD at this ε per share (default: no DP-SGD)",
                                          low=0, low_open=True)
    min_share_records: int | None = setting(None, "the devices' policy key min-share-records (a real device's "
                                                  "default is 64; a simulation's virtual devices take --history "
                                                  "unless this flag or --policy says otherwise: its data is public "
                                                  "and its histories short for speed)", low=1)
    profile_epsilon: float | None = setting(None, "the devices' policy key profile-epsilon (default 1)", low=0,
                                            low_open=True)
    epsilon_budget: float | None = setting(None, "the devices' policy key epsilon-budget (default 10)", low=0,
                                           low_open=True)

    def device_policy(self):
        """The policy every virtual device starts from: the defaults, --policy's file, then the flags given; its
        min-share-records at most --history, unless the file or the flag sets it."""
        from participants.privacy_policy import PrivacyPolicy

        base = json.loads(PrivacyPolicy.load(self.policy).to_json()) if self.policy else {}  # a bad file stops here
        given = json.loads(Path(self.policy).read_text(encoding="utf-8")) if self.policy else {}
        if "min-share-records" not in given:
            base["min-share-records"] = min(self.history, PrivacyPolicy.min_share_records)
        flags = {key(name): getattr(self, name) for name in ("max_share_ratio", "min_share_records", "piece_epsilon",
                                                             "profile_epsilon", "epsilon_budget")
                 if getattr(self, name) is not None}
        return PrivacyPolicy.from_dict(base | flags, self.policy or "the --policy flags")
