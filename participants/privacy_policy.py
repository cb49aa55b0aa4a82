"""What this device lets leave it: the owner's privacy policy, `policy.json` in the device folder.

    {"share": true, "max-share-ratio": 0.5, "min-share-records": 64, "min-hours-between-shares": 0,
     "piece-epsilon": null, "piece-delta": 1e-05, "piece-clip-norm": 1.0, "profile-clip-norm": 1.0,
     "profile-epsilon": 1.0, "profile-delta": 1e-05, "epsilon-budget": 10.0, "report-metrics": ["*-seconds", ...],
     "pinned-seed": null}

    share              whether this device shares pieces at all; false: a share request is refused
    max-share-ratio    the largest fraction of its pieces it sends, in (0, 1]; it sends min(requested, this), so
                       by default a sharer never sends its whole adapter
    min-share-records  the fewest of its own records (the pairs its model wrote do not count) a device must hold to
                       share: trained for the same steps, a few records are seen many times and memorised, and
                       membership inference against the shared pieces reads them (the privacy audit: see README,
                       threat model); fewer, and a share request is refused
    min-hours-between-shares
                       how often it shares: a share request sooner than this after its last one is refused
    piece-epsilon      null: the LoRA and gates it shares are trained without formal privacy. A number ε: they are
                       trained by DP-SGD (participants.dp_sgd) to (ε, piece-delta) per share, per history record,
                       with each record's gradient clipped to piece-clip-norm; each share spends ε of the budget
    profile-clip-norm  C: each history record's embedding is clipped to L2 norm C before the profile's mean
    profile-epsilon    ε of one profile release (the Gaussian mechanism, participants.profile)
    profile-delta      δ of one profile release
    epsilon-budget     the total ε the device will spend (participants.privacy_ledger); a release past it is refused
    report-metrics     the metric names its replies may carry (shell-style patterns); every other metric is dropped
    pinned-seed        null: the profile noise, the share draw and the stream buffer's random seed come from
                       the OS's randomness, which the coordinator cannot know. A whole number pins them, for
                       reproducible experiments only (the simulation harness pins each virtual device from the
                       run's rng-seed)

The policy is the device's, never the coordinator's: no message can change it. Any key may be left out (it keeps
its default); an unknown key, a value of the wrong kind or range, or keys that contradict each other stop the
device with the file, the key and what to write instead. A request beyond the policy is refused with the key
that refused it (`PolicyRefused`); Flower answers the coordinator with an error reply naming it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import secrets
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from participants.error_replies import Refusal
from protocols.settings import key

POLICY_FILE = "policy.json"

# every metric bouquet's replies carry today; a metric added later leaves the device only once a policy lists it
DEFAULT_REPORTED = ("*-seconds", "*-tokens", "*-bytes", "num-examples", "history-size", "test-size", "pieces-*",
                    "gates-received", "catalog-seeds", "own-residual", "lora-steps", "lora-loss-*", "seed-*",
                    "assembled-*", "share-ratio", "profile-epsilon", "profile-delta", "epsilon-spent")
# "pieces-*" covers the share's DP-SGD figures too: pieces-epsilon, pieces-delta, pieces-noise-multiplier
# the smallest history the privacy audit measured within its membership target at the default policy
MIN_SHARE_RECORDS = 64
PURPOSES = {"profile": 1, "share": 2, "buffer": 3}  # what each pinned stream of randomness is for


class PolicyError(ValueError):
    """A policy.json that cannot be followed: the message names the file, the key and what to write instead."""


class PolicyRefused(Refusal):
    """A request beyond this device's policy; the message names the policy key that refused it (and numbers
    only: participants.error_replies sends it to the coordinator as it is)."""


@dataclass(frozen=True)
class PrivacyPolicy:
    share: bool = True
    max_share_ratio: float = 0.5
    min_share_records: int = MIN_SHARE_RECORDS
    min_hours_between_shares: float = 0.0
    piece_epsilon: float | None = None
    piece_delta: float = 1e-5
    piece_clip_norm: float = 1.0
    profile_clip_norm: float = 1.0
    profile_epsilon: float = 1.0
    profile_delta: float = 1e-5
    epsilon_budget: float = 10.0
    report_metrics: tuple[str, ...] = DEFAULT_REPORTED
    pinned_seed: int | None = None

    @classmethod
    def load(cls, path: str | Path) -> "PrivacyPolicy":
        """From a policy.json (missing file: the defaults); a bad file raises PolicyError naming the key."""
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            given = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise PolicyError(f"{path}: not JSON ({err}); write a JSON object such as {cls().to_json(indent=None)}")
        if not isinstance(given, dict):
            raise PolicyError(f"{path}: expected a JSON object of policy keys, such as {cls().to_json(indent=None)}")
        return cls.from_dict(given, str(path))

    @classmethod
    def from_dict(cls, given: dict, where: str = POLICY_FILE) -> "PrivacyPolicy":
        known = {key(f.name): f.name for f in fields(cls)}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise PolicyError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        for name, value in given.items():
            problem = _problem(name, value)
            if problem:
                default = getattr(cls(), known[name])
                example = json.dumps(list(default) if isinstance(default, tuple) else default)
                raise PolicyError(f"{where}: key {name!r}: {problem}, got {json.dumps(value)}; write e.g. "
                                  f"\"{name}\": {example}")
        values = {known[k]: (tuple(v) if k == "report-metrics" else v) for k, v in given.items()}
        policy = cls(**values)
        for what, epsilon in (("profile-epsilon", policy.profile_epsilon), ("piece-epsilon", policy.piece_epsilon)):
            if epsilon is not None and epsilon > policy.epsilon_budget:
                raise PolicyError(f"{where}: keys {what!r} and 'epsilon-budget' contradict each other: one release "
                                  f"(ε = {epsilon:g}) exceeds the whole budget ({policy.epsilon_budget:g}); write "
                                  f"\"epsilon-budget\" >= {epsilon:g} or a smaller \"{what}\"")
        return policy

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps({key(k): (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()},
                          indent=indent)

    # --- what a request may get ---------------------------------------------------------------------------

    def share_ratio(self, requested: float) -> float:
        """The share this device sends: min(requested, max-share-ratio); refused when it does not share."""
        if not self.share:
            raise PolicyRefused(f"refused by this device's {POLICY_FILE}: key 'share' is false (it does not share "
                                f"pieces)")
        return min(float(requested), self.max_share_ratio)

    def check_share_records(self, count: int) -> None:
        """Refuse a share from a device holding fewer than min-share-records of its own records (the refusal says
        the threshold, never the count: report-metrics decides whether the history's size leaves the device)."""
        if count < self.min_share_records:
            raise PolicyRefused(f"refused by this device's {POLICY_FILE}: key 'min-share-records' is "
                                f"{self.min_share_records} and this device holds fewer of its own records")

    def dp_sgd(self):
        """The DP-SGD a share is trained with (participants.dp_sgd.DpSgd), or None when piece-epsilon is null."""
        from participants.dp_sgd import DpSgd

        if self.piece_epsilon is None:
            return None
        return DpSgd(self.piece_epsilon, self.piece_delta, self.piece_clip_norm)

    def reported(self, metrics: dict) -> dict:
        """The metrics whose names report-metrics allows; the rest never leave the device."""
        return {name: value for name, value in metrics.items()
                if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.report_metrics)}

    # --- randomness the coordinator cannot know -----------------------------------------------------------

    def rng(self, purpose: str) -> np.random.Generator:
        """A generator for `purpose` (one of PURPOSES): from the OS's randomness, or from pinned-seed."""
        if self.pinned_seed is None:
            return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))
        return np.random.default_rng([self.pinned_seed, PURPOSES[purpose]])

    def random_seed(self, purpose: str) -> int:
        """A 128-bit seed for `purpose` (e.g. random.Random's, in participants.cutting.choose_share)."""
        if self.pinned_seed is None:
            return secrets.randbits(128)
        return int(self.rng(purpose).integers(0, 2**63))


def _problem(name: str, value) -> str:
    """What is wrong with one key's value, or ""."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if name == "share":
        return "" if isinstance(value, bool) else "must be true or false"
    if name == "max-share-ratio":
        if number(value) and value == 0:
            return "must be within (0, 1]; to share nothing write \"share\": false"
        return "" if number(value) and 0 < value <= 1 else "must be a number within (0, 1]"
    if name in ("profile-clip-norm", "profile-epsilon", "epsilon-budget", "piece-clip-norm"):
        return "" if number(value) and value > 0 else "must be a finite number > 0"
    if name == "piece-epsilon":
        ok = value is None or (number(value) and value > 0)
        return "" if ok else "must be null (no DP-SGD) or a finite number > 0, e.g. 8"
    if name == "min-share-records":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        return "" if ok else "must be a whole number >= 1 (1: any device with a record may share)"
    if name == "min-hours-between-shares":
        return "" if number(value) and value >= 0 else "must be a number of hours >= 0 (0: no limit)"
    if name in ("profile-delta", "piece-delta"):
        return "" if number(value) and 0 < value < 1 else "must be a number within (0, 1), e.g. 1e-5"
    if name == "report-metrics":
        ok = isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)
        return "" if ok else "must be a list of metric names or patterns (\"seed-*\"); [] reports none"
    if name == "pinned-seed":
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
        return "" if ok else "must be null (the OS's randomness) or a whole number >= 0"
    return ""
