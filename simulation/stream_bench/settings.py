"""What one `bouquet stream-bench` run is: the device's training and evaluation settings (protocols.settings), the
buffer's and the synthesis' (participants.stream_settings), and who is benched at which buffer sizes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from participants.stream_settings import RULES, BufferSettings, SynthesisSettings
from protocols.settings import ParticipantSettings, check, same_as, setting

SYNTHESIS_MODES = ("both", "on", "off")
# "small" is sized for 2 shared CPU cores, one thread, SmolLM2-135M (a LoRA step at 2 x 64 tokens about 1 s, a
# forward pass of one prompt about 0.15 s, sampling about 10 tokens/s per sequence): about 20 minutes for 16
# users on an idle machine (its figures are a smoke test: 3 training steps, 3 held-out items per user); one buffer
# size (10% of the stream) and three rules; kcenter and more sizes are "full"'s.
PRESETS: dict[str, dict] = {
    "small": {"users": 16, "stream": 40, "test": 3, "buffer_sizes": (4,), "rules": ("sdss", "fifo", "random"),
              "rounds": 2, "lora_steps": 3, "batch_size": 2, "max_len": 64, "max_new_tokens": 10, "pairs": 2,
              "synthesis_tokens": 28, "score_len": 96, "timing_items": 4},
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

    def buffer(self, capacity: int, rule: str) -> BufferSettings:
        return BufferSettings(capacity=capacity, rule=rule, combine=self.combine, domains=self.domains,
                              score_len=self.score_len, budget=max(1, -(-capacity // self.rounds)),
                              rng_seed=self.rng_seed)

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
