"""What a coordinator may ask of this device: the device's own bounds, in `limits.json` of its folder.

    {"lora-steps": 300, "gate-steps": 300, "max-len": 512, "max-new-tokens": 256, "batch-size": 16,
     "assembly-batch-size": 32, "gate-bytes": 67108864, "piece-bytes": 268435456, "memory-mib": 1536}

Any key may be left out (it keeps its default); an unknown key is an error, so a typo never silently lifts a
bound. A message asking for more than a limit is refused as a whole, before any work: the handler raises, and
Flower sends the coordinator an error reply that names the limit. Downloads (gates, pieces) are counted on the
message as received: the bound stops the work and tells the coordinator, it cannot undo the transfer.
`memory-mib` is the memory budget for training (tensors, the frozen base included; 0: none): it picks the trainer
when a run asks for `trainer auto`, and refuses a trainer that does not fit (participants.trainer_choice).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from participants.error_replies import Refusal
from protocols.settings import ParticipantSettings, key

LIMITS_FILE = "limits.json"
MIB = 1024 * 1024


class LimitExceeded(Refusal):
    """A request beyond what this device allows; the message names the limit and the file that sets it."""


@dataclass(frozen=True)
class DeviceLimits:
    lora_steps: int = 300  # private LoRA training steps per share request
    gate_steps: int = 300  # gate training steps per share request
    max_len: int = 512  # tokens per training, assembly or evaluation sequence
    max_new_tokens: int = 256  # generated tokens per evaluation answer
    batch_size: int = 16  # training batch
    assembly_batch_size: int = 32  # history items per assembly forward pass
    gate_bytes: int = 64 * MIB  # gates in one gates message
    piece_bytes: int = 256 * MIB  # pieces in one assemble message
    memory_mib: int = 0  # training's memory budget in MiB (0: none set; trainer auto then trains with AdamW)

    SETTINGS = ("lora_steps", "gate_steps", "max_len", "max_new_tokens", "batch_size", "assembly_batch_size")

    @classmethod
    def load(cls, path: str | Path) -> "DeviceLimits":
        """From a limits.json (missing file: the defaults); a bad file is an error naming the key."""
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            given = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not JSON: {err}") from None
        if not isinstance(given, dict):
            raise ValueError(f"{path}: expected a JSON object of limits")
        known = {key(f.name): f.name for f in fields(cls)}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"{path}: unknown limits {unknown}; known: {sorted(known)}")
        bad = [k for k, v in given.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if bad:
            raise ValueError(f"{path}: limits must be whole numbers >= 0: {bad}")
        return cls(**{known[k]: v for k, v in given.items()})

    def to_json(self) -> str:
        return json.dumps({key(k): v for k, v in asdict(self).items()}, indent=1)

    def check_settings(self, s: ParticipantSettings) -> None:
        """Refuse settings beyond the limits: every one that is, in one message."""
        over = [f"{key(name)} {getattr(s, name)} > {getattr(self, name)}" for name in self.SETTINGS
                if getattr(s, name) > getattr(self, name)]
        if over:
            raise LimitExceeded(f"refused by this device's {LIMITS_FILE}: {'; '.join(over)}")

    def check_download(self, what: str, nbytes: int) -> None:
        """`what` is "gate-bytes" or "piece-bytes"."""
        limit = getattr(self, what.replace("-", "_"))
        if nbytes > limit:
            raise LimitExceeded(f"refused by this device's {LIMITS_FILE}: {what} {nbytes} > {limit}")


UNBOUNDED = DeviceLimits(**{f.name: 2**62 for f in fields(DeviceLimits)} | {"memory_mib": 0})
