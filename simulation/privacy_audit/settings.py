"""What one `bouquet privacy-audit` run is: its settings and their checks.

Every user of the data set is both a sharer, whose release is attacked (members: its history, which it trained on;
non-members: its held-out records), and a target that assembles from the other users' pieces (the utility side).
Two axes: the sharers' `max-share-ratio` (their policy's cap on the share: each sends min(share-ratio, cap)) and
the ε of their DP-SGD training ("none": trained without DP). Kept free of heavy imports so that the command line
shows defaults and refuses bad flags at once.

The defaults are sized to take about 20 minutes on one CPU thread with SmolLM2-135M on health tweets' 16 users
(a LoRA step at 4 x 96 tokens takes about 1.8 s there, a forward pass of 8 records about 0.6 s): fewer LoRA
steps than the bench's small preset, so the adapters memorize less than a longer training would.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

from participants.privacy_policy import PrivacyPolicy
from protocols.settings import ParticipantSettings, check, same_as, setting
from simulation.settings import UserSettings

NO_DP = "none"
DEFAULT_POLICY = PrivacyPolicy()  # the audit's "default policy": its share cap, its profile's ε and δ


def epsilon_label(value) -> str:
    """'none', or the number as %g ("8", "0.5"); ValueError for anything else."""
    if isinstance(value, str) and value.strip().lower() in (NO_DP, "inf"):
        return NO_DP
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"epsilons: {value!r} is neither 'none' nor a number") from None
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"epsilons: {value!r} must be a finite number > 0 (or 'none': no DP)")
    return f"{number:g}"


def _is_number(text) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def epsilon_value(label: str) -> float | None:
    return None if label == NO_DP else float(label)


@dataclass(frozen=True)
class AuditSettings(ParticipantSettings, UserSettings):
    # what a run directory written before a setting existed ran with, where that is not today's default
    RAN_BEFORE: ClassVar[dict] = {"mix_norm": "mean"}
    users: int | None = setting(None, "users audited, each a sharer attacked and a target of the others' pieces "
                                      "(default: every user of the data with history + test records)", low=2)
    share_ratios: tuple[float, ...] = setting((1.0, 0.5, 0.25), "comma-separated max-share-ratio values of the "
                                              "sharers' policy, each in (0, 1]: a sharer sends min(share-ratio, "
                                              "this) of its pieces")
    epsilons: tuple[str, ...] = setting((NO_DP,), "comma-separated piece-epsilon values of the sharers' policy: the ε "
                                                  "of their DP-SGD training (LoRA and gates, one share), 'none' (no "
                                                  "DP) or numbers > 0, e.g. none,8,2")
    piece_delta: float = setting(PrivacyPolicy.piece_delta, "the sharers' policy key piece-delta: δ of their DP-SGD",
                                 low=0, high=1, low_open=True)
    piece_clip_norm: float = setting(PrivacyPolicy.piece_clip_norm, "the sharers' policy key piece-clip-norm: each "
                                                                     "record's gradient clip in DP-SGD", low=0,
                                     low_open=True)
    extraction: bool = setting(True, "the extraction attack: greedy generations under each sharer's pieces, the "
                                     "slowest attack")
    extraction_records: int = setting(4, "members, and as many non-members, per sharer that the extraction attack "
                                         "generates for", low=1)
    ngram: int = setting(8, "word n-gram length of the extraction attack", low=1)
    test: int = same_as(UserSettings, "test", default=16, help="held-out items per user: the non-members of its "
                                                             "attacks, and its Per-Pcs evaluation")
    lora_steps: int = same_as(ParticipantSettings, "lora_steps", default=12)
    gate_steps: int = same_as(ParticipantSettings, "gate_steps", default=6)
    max_new_tokens: int = same_as(ParticipantSettings, "max_new_tokens", default=32)

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            epsilons = tuple(epsilon_label(e) for e in self.epsilons)
        except ValueError as err:
            raise ValueError(f"bad settings: {err}") from None
        words = [r for r in self.share_ratios if not _is_number(r)]
        if words:
            raise ValueError(f"bad settings: share-ratios must be numbers within (0, 1], got {words[0]!r}")
        ratios = tuple(float(r) for r in self.share_ratios)
        object.__setattr__(self, "share_ratios", tuple(dict.fromkeys(ratios)))
        object.__setattr__(self, "epsilons", tuple(dict.fromkeys(epsilons)))
        bad = [r for r in self.share_ratios if not (math.isfinite(r) and 0 < r <= 1)]
        check(self, bad and f"share-ratios must each be within (0, 1], got {', '.join(map(str, bad))}",
              not self.share_ratios and "share-ratios: give at least one",
              not self.epsilons and "epsilons: give at least one ('none': no DP)")

    def sharer_policy(self, max_share_ratio: float = DEFAULT_POLICY.max_share_ratio,
                      epsilon: str = NO_DP) -> PrivacyPolicy:
        """The policy of a sharer at one setting of the audit: the defaults with its share cap and DP-SGD."""
        return replace(DEFAULT_POLICY, max_share_ratio=max_share_ratio, piece_epsilon=epsilon_value(epsilon),
                       piece_delta=self.piece_delta, piece_clip_norm=self.piece_clip_norm)

    def sent_share_ratio(self, max_share_ratio: float) -> float:
        """What a sharer whose policy caps its share at `max_share_ratio` sends when share-ratio is asked."""
        return self.sharer_policy(max_share_ratio).share_ratio(self.share_ratio)

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

