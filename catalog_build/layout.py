"""The build folder: what lives where, and writing it so that a stopped build leaves nothing half-written.

    <out>/build.json              the build's settings (catalog_build.state)
    <out>/catalog.json            the catalog devices download, written last (protocols.catalog)
    <out>/seeds/<name>/           a seed: seed.json + delta/ (protocols.seeds), and beside it
        probe_answers.json        its and the base's answers to the probes
        proposed_words.json       the words the base proposed for it
        retrained.json            the outcome, when it was trained again because it read as another label
    <out>/retraining/<name>/      a seed's first version, while its retrained one is explained
    <out>/basis_answers.json      the base's styled probe answers behind a model basis
    <out>/corpus_answers.json     the base's answers to the labeled groups' inputs (corpus attributes)
"""

from __future__ import annotations

from pathlib import Path

from participants.adapters import save_peft_adapter
from participants.lora_training import LoraWeights
from protocols.seeds import SeedDescriptor, write_seed_folder

BUILD_FILE = "build.json"
ANSWERS_FILE = "probe_answers.json"
PROPOSALS_FILE = "proposed_words.json"
RETRAINED_FILE = "retrained.json"
RETRAINING_DIR = "retraining"
BASIS_FILE = "basis_answers.json"
CORPUS_FILE = "corpus_answers.json"


def write_seed(folder: Path, name: str, base: SeedDescriptor, weights: LoraWeights, rank: int, alpha: float,
               built_from: str, fingerprint: str) -> None:
    write_seed_folder(folder, name, base, lambda path: save_peft_adapter(path, weights, rank, alpha,
                                                                         base_model=base.seed_id),
                      info={"built_from": built_from, "fingerprint": fingerprint})
