"""What a build is told: how to train its seeds (`SeedTraining`), how to explain them (`ExplainSettings`), and
each seed to build (`SeedJob`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

from coordinator.explain_seed import minilm_embed
from participants.lora_training import LoraSettings, LoraWeights
from protocols.attribute_words import check_exemplars
from protocols.explanations import STYLE_WORDS, Embed
from protocols.settings import ParticipantSettings, check, same_as

DEFAULT_WORDS = STYLE_WORDS[:8]


@dataclass(frozen=True)
class ExplainSettings:
    """How the seeds are explained: free to change between reruns, since they only re-explain.

    words          attribute words given by hand
    basis          "text" (hand-written exemplars of each word) or "model" (the base answering the probes in
                   each word's style; needed for proposed words, which have no exemplars)
    propose_words  how many more words the base proposes from the seeds' answers (0: none)
    corpus         one more attribute per labeled group (its label, e.g. "expert-concise-friendly"), embedded
                   from the group's real answers against the base's answers to the same inputs: the difference
                   a device computes on its own data, so both sit on the same side of the gap between written
                   and generated text
    basis_probes   probes the model basis answers in each style (the first N of the catalog's probes)
    min_probe_words  explain from the probes whose base answer has at least this many words only: on a
                   short-answer task ("compute the area…") every seed's answer differs from the base's mostly
                   by saying more, not by its style (0: every probe)
    scaled         fit explanations in units of the per-dimension noise (AttributeBasis.scale)
    """

    words: tuple[str, ...] = DEFAULT_WORDS
    basis: str = "text"
    propose_words: int = 0
    basis_probes: int = 16
    scaled: bool = True
    corpus: bool = False
    min_probe_words: int = 0

    def check(self, embed: Embed) -> None:
        if self.basis not in ("text", "model"):
            raise ValueError(f"basis must be 'text' (hand-written exemplars) or 'model' (the base's own styled "
                             f"answers), got {self.basis!r}")
        if self.basis == "model" and embed is not minilm_embed:
            raise ValueError("the model basis is embedded with MiniLM on the device side; explain with the default "
                             "MiniLM embedder too, or use the text basis")
        if self.basis == "text":
            check_exemplars(self.words)
        if self.propose_words and self.basis != "model":
            raise ValueError("proposed words have no hand-written exemplars; propose words with the model basis "
                             "(--basis model)")
        if self.min_probe_words < 0:
            raise ValueError(f"min_probe_words must be >= 0, got {self.min_probe_words}")
        if self.propose_words < 0 or self.basis_probes < 1:
            raise ValueError(f"propose_words must be >= 0 and basis_probes >= 1, got {self.propose_words} and "
                             f"{self.basis_probes}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class SeedJob:
    """One seed to build: `make_weights` is only called when the seed's delta is not on disk yet."""

    name: str
    built_from: str
    fingerprint: str  # what the seed is made of; a folder built from something else is never reused
    make_weights: Callable[[], tuple[LoraWeights, int, float]]  # (weights, rank, alpha)
    label: str = ""  # the style in words, for corpus attributes (labeled builds only)
    # trains the seed again with more capacity, for a seed that reads as another seed's label (labeled builds)
    make_stronger: Callable[[], tuple[LoraWeights, int, float]] | None = None
    stronger: str = ""  # that recipe in words, for built_from


@dataclass(frozen=True)
class SeedTraining:
    """How each labeled seed's LoRA is trained: the run schema's training settings, longer and wider by default
    (a seed must carry a whole group's style, not one user's)."""

    lora_rank: int = same_as(ParticipantSettings, "lora_rank")
    lora_alpha: float = same_as(ParticipantSettings, "lora_alpha")
    lora_steps: int = same_as(ParticipantSettings, "lora_steps", default=40, help="LoRA steps per seed")
    lora_lr: float = same_as(ParticipantSettings, "lora_lr")
    batch_size: int = same_as(ParticipantSettings, "batch_size")
    max_len: int = same_as(ParticipantSettings, "max_len", default=128)
    rng_seed: int = same_as(ParticipantSettings, "rng_seed", help="the random seed of LoRA training and of the "
                                                                  "clustering")

    def __post_init__(self) -> None:
        check(self)

    def lora(self) -> LoraSettings:
        return LoraSettings(rank=self.lora_rank, alpha=self.lora_alpha, steps=self.lora_steps, lr=self.lora_lr,
                            batch_size=self.batch_size, max_len=self.max_len, seed=self.rng_seed)
