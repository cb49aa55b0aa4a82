"""The settings of a device's stream buffer and of its synthesis, each declared once (protocols.settings).

They are the device's own: `bouquet device add` takes them as flags the first time and keeps them in the buffer
file, so that every later addition keeps items by the same rule; the stream benchmark reads the same fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from protocols.settings import check, setting

RULES = ("sdss", "fifo", "random", "kcenter")
COMBINES = ("zsum", "eoe", "dss", "idd")
WRITERS = ("adapter", "seed")


@dataclass(frozen=True)
class BufferSettings:
    capacity: int = setting(64, "items the device's buffer holds (B); annotated items keep their slots", low=1)
    rule: str = setting("sdss", "which items the buffer keeps: sdss (embedding entropy, domain-specific score and "
                                "in-domain dissimilarity), fifo (the latest), random (reservoir sampling), kcenter "
                                "(the most spread out)", choices=RULES)
    combine: str = setting("zsum", "how sdss weighs its three scores: zsum (sum of their z-scores over the stream "
                                   "so far), or one of them alone (eoe, dss, idd)", choices=COMBINES)
    domains: int = setting(4, "domains sdss learns on the device (online k-means over its token hidden states)",
                           low=1)
    score_len: int = setting(128, "tokens of an item's prompt the device reads to score it (cut from the left)",
                             low=8)
    budget: int = setting(4, "items the owner annotates per annotation round", low=1)

    def __post_init__(self) -> None:
        check(self)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SynthesisSettings:
    pairs: int = setting(3, "(input, output) pairs the device's model writes per annotated item (K; 0: none)",
                         low=0)
    rouge_low: float = setting(0.15, "a written pair is kept when its ROUGE-1 F1 against the original is at least "
                                     "this (lower: it drifted off the item)", low=0, high=1)
    rouge_high: float = setting(0.7, "… and at most this (higher: a near copy, which teaches nothing new)", low=0,
                                high=1)
    synthesis_tokens: int = setting(96, "new tokens the model writes per pair", low=8)
    synthesis_temperature: float = setting(0.9, "sampling temperature of the writing", low=0, low_open=True)
    top_p: float = setting(0.95, "nucleus sampling mass of the writing", low=0, high=1, low_open=True)
    synthesis_seed: int = setting(0, "the random seed of the writing (the same items in the same order get the "
                                     "same pairs)", low=0)
    synthesis_writer: str = setting("adapter", "who writes the pairs: adapter (the seed with a LoRA trained on the "
                                               "annotated items so far, so the pairs come in their style) or seed "
                                               "(the bare seed, which writes in its own)", choices=WRITERS)
    repeat_annotated: bool = setting(True, "repeat the annotated items in what trains until they are at least as "
                                           "many as the written pairs: the pairs add variety without outweighing "
                                           "the owner's own answers")

    def __post_init__(self) -> None:
        check(self, self.rouge_low > self.rouge_high
              and f"rouge-low ({self.rouge_low}) must not exceed rouge-high ({self.rouge_high})")

    def to_json(self) -> dict:
        return asdict(self)
