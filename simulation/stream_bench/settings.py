"""What one `bouquet stream-bench` run is: the device's training and evaluation settings (protocols.settings), the
buffer's and the synthesis' (participants.stream_settings), and who is benched at which buffer sizes."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from participants.stream_settings import RULES, BufferSettings, SynthesisSettings
from protocols.settings import ParticipantSettings, check, same_as, setting

SYNTHESIS_MODES = ("both", "on", "off")
BUFFER_TRAINING = ("reference-steps", "lora-steps")
# Sized for 2 shared CPU cores, one thread, SmolLM2-135M (a LoRA step at 2 x 64 tokens 1.3-1.8 s with other jobs
# running, a forward pass of one prompt about 0.15 s, sampling about 10 tokens/s per sequence).
# "small" is a smoke test of the whole pipeline (about 20 minutes for 16 users): its buffers' adapters train 3 steps
# (lora-steps) against the reference's 20, so its gain recovered is not a measurement.
# "medium" is the first measurement (35 minutes for 16 users, beside two other jobs): B = 10% of a 40-item stream,
# every adapter trains the reference's 20 steps (one pass over the stream), 8 held-out items per user; without
# synthesis, which would double the adapters to train.
# "full" holds the sizes (hours; for a GPU).
PRESETS: dict[str, dict] = {
    "small": {"users": 16, "stream": 40, "test": 3, "buffer_sizes": (4,), "rules": ("sdss", "fifo", "random"),
              "rounds": 2, "lora_steps": 3, "buffer_training": "lora-steps", "batch_size": 2, "max_len": 64,
              "max_new_tokens": 10, "pairs": 2, "synthesis_tokens": 28, "score_len": 96, "timing_items": 4},
    "medium": {"users": 16, "stream": 40, "test": 8, "buffer_sizes": (4,), "rules": ("sdss", "fifo", "random"),
               "synthesis": "off", "rounds": 2, "lora_steps": 20, "batch_size": 2, "max_len": 64,
               "max_new_tokens": 16, "score_len": 96, "timing_items": 4},
    "full": {"users": 16, "stream": 320, "test": 16, "buffer_sizes": (16, 32, 64), "rounds": 4, "lora_steps": 40,
             "max_len": 128, "max_new_tokens": 32, "pairs": 3},
}


@dataclass(frozen=True)
class StreamBenchSettings(ParticipantSettings, SynthesisSettings):
    data: str = setting("healthtweets", "'healthtweets' (each account's tweets in time order) or 'styleqa' (a "
                                        "style's rows in file order; the data has no time)")
    users: int = setting(16, "users benched (each with its own stream and held-out items)", low=1)
    stream: int = setting(160, "items in each user's stream", low=2)
    test: int = setting(8, "held-out items per user: the ones right after its stream in time", low=1)
    buffer_sizes: tuple[int, ...] = setting((16,), "comma-separated buffer sizes B to bench")
    rules: tuple[str, ...] = setting(RULES, f"comma-separated selection rules among {','.join(RULES)}")
    synthesis: str = setting("both", "bench each rule with synthesis (on), without (off), or both",
                             choices=SYNTHESIS_MODES)
    rounds: int = setting(4, "annotation rounds over a stream, evenly spaced (the last at its end); each "
                             "annotates up to B / rounds items", low=1)
    domains: int = same_as(BufferSettings, "domains")
    combine: str = same_as(BufferSettings, "combine")
    score_len: int = same_as(BufferSettings, "score_len")
    full_epochs: float = setting(1.0, "the whole-stream reference adapter trains for this many passes over the "
                                      "stream (at least lora-steps steps): trained for only lora-steps, it would "
                                      "see fewer items than a buffer holds", low=0, low_open=True)
    buffer_training: str = setting("reference-steps", "how many steps a buffer's adapter trains: reference-steps, "
                                                      "as many as the whole-stream reference (the same compute, so a "
                                                      "rule and the reference differ in their data only: a device "
                                                      "is short of labels, not of training time); lora-steps, "
                                                      "lora-steps steps (a device with a smaller training budget)",
                                   choices=BUFFER_TRAINING)
    timing_items: int = setting(16, "items per user whose scoring is timed against one forward pass", low=1)

    def __post_init__(self) -> None:
        for name in ("buffer_sizes", "rules"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        bad_rules = sorted(set(self.rules) - set(RULES))
        check(self, bad_rules and f"unknown rules {', '.join(bad_rules)}: choose among {', '.join(RULES)}",
              not self.buffer_sizes and "give at least one buffer size",
              any(int(b) < 1 or int(b) > self.stream for b in self.buffer_sizes)
              and f"buffer sizes must lie within [1, stream = {self.stream}], got {self.buffer_sizes}",
              self.rouge_low > self.rouge_high and "rouge-low must not exceed rouge-high")
        object.__setattr__(self, "buffer_sizes", tuple(int(b) for b in self.buffer_sizes))

    def reference_steps(self) -> int:
        """The whole-stream adapter's steps: full-epochs passes over the stream, at least lora-steps."""
        return max(self.lora_steps, math.ceil(self.full_epochs * self.stream / self.batch_size))

    def buffer_steps(self) -> int:
        return self.reference_steps() if self.buffer_training == "reference-steps" else self.lora_steps

    def buffer(self, capacity: int, rule: str) -> BufferSettings:
        return BufferSettings(capacity=capacity, rule=rule, combine=self.combine, domains=self.domains,
                              score_len=self.score_len, budget=max(1, -(-capacity // self.rounds)))

    def synthesis_settings(self) -> SynthesisSettings:
        return SynthesisSettings(**{f.name: getattr(self, f.name) for f in fields(SynthesisSettings)})

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def resolve_settings(preset: str | None = None, **flags) -> StreamBenchSettings:
    """The defaults, then the preset's values, then every flag given (not None)."""
    known = {f.name for f in fields(StreamBenchSettings)}
    unknown = sorted(set(flags) - known)
    if unknown:
        raise ValueError(f"unknown stream-bench settings {unknown}")
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: choose among {', '.join(PRESETS)}")
        values |= PRESETS[preset]
    values |= {k: v for k, v in flags.items() if v is not None}
    return StreamBenchSettings(**values)
