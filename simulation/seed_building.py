"""Building the seed catalog (XPerT): seeds made from labeled data or from the pool, each with its explanation.

    build_catalog_from_labels   one seed per group of records (a styleqa style, a user of a JSONL file):
                                a LoRA trained from the base on the group's records
    build_catalog_from_pool     one seed per cluster of pool contributors: the exact mean of the members'
                                LoRA updates, written as one LoRA

Either way a seed is stored as base + delta (protocols.seeds), and explained by how its answers to the
probe prompts differ from the base's, in attribute words (coordinator.explain_seed), so that a device can
pick the nearest seed from catalog.json alone. It lives here because it needs both a device's trainer and
the coordinator's explainer, which never import each other.

A build is resumable: each seed's folder and its probe answers are written as soon as they exist, and a rerun
with the same settings skips the seeds whose folders still hash to the answers stored beside them. catalog.json
is written once, at the end, when every seed can be explained together: the vocabulary, the attribute basis and
the noise scale are catalog-wide. The settings live in build.json; a rerun with other seed settings into the
same folder is refused rather than mixing seeds built two ways in one catalog, while other explanation
settings (words, basis, proposed words) just re-explain the seeds. With labels and corpus attributes, a seed
that reads most as another seed's label is trained once more with a wider LoRA (`_retrain_misread`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from coordinator.explain_seed import minilm_embed
from coordinator.pool import PiecePool
from participants import seed_loading
from participants.adapters import save_peft_adapter
from participants.chat_data import clip_to_tokens
from participants.evaluation import generate
from participants.lora_training import ALL_PROJECTIONS, LoraSettings, LoraWeights, train_private_lora
from participants.progress import log, progress
from participants.style_direction import STYLE_INSTRUCTION
from participants.word_proposal import propose_words, proposed_vocabulary
from protocols.attribute_words import check_exemplars, text_basis
from protocols.catalog import CATALOG_FILE, SEEDS_DIR, Catalog, CatalogEntry, load_catalog
from protocols.explanations import (STYLE_WORDS, AttributeBasis, Embed, Explanation, decompose,
                                    difference_direction, noise_scale, paired_differences)
from protocols.pieces import Piece
from protocols.records import PersonalRecord
from protocols.seeds import DEFAULT_SEED, DELTA_DIR, SEED_FILE, SeedDescriptor, materialize, read_seed_file
from protocols.seeds import write_seed_folder
from simulation.datasets import find_styleqa, styleqa_rows

BUILD_FILE = "build.json"
ANSWERS_FILE = "probe_answers.json"  # per seed: its and the base's answers to the probes
PROPOSALS_FILE = "proposed_words.json"  # per seed: the words the base proposed for it
BASIS_FILE = "basis_answers.json"  # the base's styled probe answers behind a model basis
RETRAINED_FILE = "retrained.json"  # beside a seed trained again because it read as another label: the outcome
RETRAINING_DIR = "retraining"  # a seed's first version waits here while its retrained one is explained
CORPUS_FILE = "corpus_answers.json"  # the base's answers to the labeled groups' inputs (corpus attributes)
PROPOSAL_PAIRS = 4  # probe pairs per seed the base is asked to name the style of
DEFAULT_WORDS = STYLE_WORDS[:8]
_EXPLAIN_KEYS = frozenset({"explain", "words", "basis"})  # "words"/"basis": build.json of earlier versions
_ANSWER_KEYS = frozenset({"probes", "max_new_tokens"})  # changing these re-answers the seeds, never retrains them
STYLEQA_SEED_STYLES = range(1, 9)  # style 0 is the unstylized reference, not a style to offer
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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


# --- from labeled groups -----------------------------------------------------------------------------


def build_catalog_from_labels(out: str | Path, groups: dict[str, list[PersonalRecord]],
                              base_source: str = DEFAULT_SEED, lora: LoraSettings | None = None,
                              probes: Sequence[str] = (), explain: ExplainSettings = ExplainSettings(),
                              max_new_tokens: int = 256, built_from: dict[str, str] | None = None,
                              embed: Embed = minilm_embed, batch_size: int = 8,
                              labels: dict[str, str] | None = None, retrain_misread: bool = True,
                              stronger: LoraSettings | None = None) -> Catalog:
    """One seed per group: a LoRA trained from the base on the group's records, then explained.

    `labels` names each group's style in words for the corpus attributes (`ExplainSettings.corpus`; default:
    the group's name). With corpus attributes, a seed that reads most as another group's label is trained
    again (unless `retrain_misread` is off) with `stronger` (default: the same LoRA on every projection of the
    block, not only attention, for twice the steps), and the version that reads more as its own label is kept
    (`_retrain_misread`).

    Probe prompts must not be inputs a seed trains on: a seed would answer them from memory, and its
    explanation would describe its training answers rather than how it answers in general.
    """
    lora = lora or LoraSettings()
    # on styleqa the misread seed needed both: all projections at the same steps read as its label by a hair
    # (own label 0.17 against 0.16), at twice the steps clearly (0.43); more steps on attention alone did not
    stronger = stronger or replace(lora, targets=ALL_PROJECTIONS, steps=2 * lora.steps)
    if not groups:
        raise ValueError("no groups to build seeds from; give at least one group of records")
    empty = [name for name, records in groups.items() if not records]
    if empty:
        raise ValueError(f"groups {', '.join(empty)} have no records; a seed needs something to learn from")
    trained = {r.input for records in groups.values() for r in records}
    overlap = [p for p in probes if p in trained]
    if overlap:
        raise ValueError(f"{len(overlap)} probe prompt(s) are also training inputs of a seed, e.g. "
                         f"{overlap[0][:60]!r}; probes must be questions no seed trains on")
    base = _plain_base(base_source)
    built_from = built_from or {}
    wide = "all 7 projections" if tuple(stronger.targets) == ALL_PROJECTIONS else "/".join(stronger.targets)
    stronger_words = f"trained again: LoRA on {wide}, {stronger.steps} steps"
    jobs = []
    for name, records in groups.items():
        jobs.append(SeedJob(name, built_from.get(name, f"{len(records)} labeled records"),
                            _records_fingerprint(records), partial(_train_seed, base, name, records, lora,
                                                                   f"LoRA, {lora.steps} steps"),
                            make_stronger=partial(_train_seed, base, name, records, stronger, stronger_words)
                            if retrain_misread else None, stronger=stronger_words))
    settings = {"from": "labels", "lora": _jsonable(asdict(lora))}
    labels = labels or {}
    jobs = [replace(job, label=labels.get(job.name, job.name)) for job in jobs]
    corpus = {job.label: groups[job.name] for job in jobs}
    if len(corpus) != len(groups):
        raise ValueError("two groups share a label; corpus attributes need one label per group")
    return _build(Path(out), base, jobs, list(probes), explain, max_new_tokens, settings, embed, batch_size, corpus)


def _train_seed(base: SeedDescriptor, name: str, records: list[PersonalRecord], lora: LoraSettings,
                what: str) -> tuple[LoraWeights, int, float]:
    weights, report = train_private_lora(seed_loading.load_seed(base.seed_id), records, lora,
                                         desc=f"seed {name}: {what}")
    log.info("seed %s: %s, trained in %.0f s (loss %.3f -> %.3f)", name, what, report.seconds, report.losses[0],
             report.losses[-1])
    return weights, lora.rank, lora.alpha


def _records_fingerprint(records: Sequence[PersonalRecord]) -> str:
    data = json.dumps([[r.input, r.output] for r in records], ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()


# --- from the pool -----------------------------------------------------------------------------------


def build_catalog_from_pool(out: str | Path, pool_dir: str | Path, seed_source: str | None, clusters: int,
                            probes: Sequence[str] = (), explain: ExplainSettings = ExplainSettings(),
                            max_new_tokens: int = 256, sketch_inputs: int = 4, random_seed: int = 0,
                            embed: Embed = minilm_embed, batch_size: int = 8) -> Catalog:
    """One seed per cluster of the pool's contributors: the exact mean of its members' LoRA updates.

    `seed_source` is the seed the pieces were trained on (None: the pool's only seed); it becomes the
    catalog's base. Contributors are clustered by a sketch of their updates (`contributor_sketches`).
    """
    root = pool_root(pool_dir)
    with PiecePool(root) as pool:
        seed_id = _pool_seed(pool, seed_source)
        ids = [pid for pid, *_ in pool.gates(seed_id)]
        pieces = pool.get(ids)
    base = _plain_base(seed_id)
    registered_hash = {p.seed_hash for p in pieces}
    if registered_hash - {base.content_hash}:
        raise ValueError(f"the pool's pieces for {seed_id!r} were trained on weights {min(registered_hash)[:12]}…, "
                         f"but {seed_id!r} here has {base.content_hash[:12]}…; build with the seed they came from")
    members = group_by_contributor(pieces)
    if not 1 <= clusters <= len(members):
        raise ValueError(f"cannot make {clusters} cluster(s) from {len(members)} contributor(s) of {seed_id!r} in "
                         f"{root}; choose --clusters between 1 and {len(members)}")
    sketches = contributor_sketches(members, inputs=sketch_inputs, seed=random_seed)
    groups = cluster_contributors(sketches, clusters, seed=random_seed)
    jobs = []
    for i, names in enumerate(groups):
        chosen = [members[c] for c in names]
        shown = ", ".join(names[:3]) + ("…" if len(names) > 3 else "")
        jobs.append(SeedJob(f"cluster{i + 1}", f"pool cluster {i + 1} of {len(groups)}: {len(names)} contributor(s) "
                            f"({shown})", _pieces_fingerprint(p for m in chosen for p in m),
                            lambda chosen=chosen: mean_delta(chosen)))
    settings = {"from": "pool", "pool": str(root.resolve()), "pool_pieces": _pieces_fingerprint(pieces),
                "clusters": clusters, "sketch_inputs": sketch_inputs, "random_seed": random_seed}
    return _build(Path(out), base, jobs, list(probes), explain, max_new_tokens, settings, embed, batch_size)


def pool_root(folder: str | Path) -> Path:
    """A pool folder, or a run folder holding one in pool/ (checked before opening, which would create one)."""
    root = Path(folder).expanduser()
    if (root / "pool" / "index.sqlite").is_file():
        root = root / "pool"
    if not (root / "index.sqlite").is_file():
        raise FileNotFoundError(f"{folder} is neither a piece pool nor a run folder holding one (no index.sqlite)")
    return root


def _pool_seed(pool: PiecePool, seed_source: str | None) -> str:
    known = [s.seed_id for s in pool.seeds() if pool.count(s.seed_id)]
    if seed_source is None:
        if len(known) != 1:
            raise ValueError(f"the pool at {pool.root} holds pieces of {len(known)} seeds "
                             f"({', '.join(known) or 'none'}); name the one to build from")
        return known[0]
    if seed_source not in known:
        raise ValueError(f"the pool at {pool.root} holds no pieces of seed {seed_source!r}; it has: "
                         f"{', '.join(known) or 'none'}")
    return seed_source


def group_by_contributor(pieces: Iterable[Piece]) -> dict[str, list[Piece]]:
    members: dict[str, list[Piece]] = {}
    for p in pieces:
        members.setdefault(p.contributor, []).append(p)
    return dict(sorted(members.items()))


def _delta_at(pieces: Sequence[Piece]) -> dict[str, np.ndarray]:
    """Per position: the mean update (alpha/r)·B@A of one contributor's pieces there (usually one piece)."""
    by_position: dict[str, list[np.ndarray]] = {}
    for p in pieces:
        update = p.scaling * (p.B.astype(np.float64) @ p.A.astype(np.float64))
        by_position.setdefault(p.position, []).append(update)
    return {pos: np.mean(updates, axis=0) for pos, updates in by_position.items()}


def contributor_sketches(members: dict[str, list[Piece]], inputs: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """A unit vector per contributor: its update ΔW at every position applied to the same few random inputs.

    Why this vector: the seed written for a cluster is the mean ΔW of its members, so members should be close
    in ΔW. A and B themselves cannot be compared (B·M and M⁻¹·A give the same update), gates say where a
    piece fires rather than what it changes, and the full ΔW is large; ΔW·X for a shared Gaussian X keeps
    Frobenius inner products in expectation at (inputs · d_out) numbers per position. Each vector is scaled
    to unit length, because the size of an update follows steps, learning rate and data volume, not style.
    A position a contributor did not share counts as no update there.
    """
    deltas = {c: _delta_at(pieces) for c, pieces in members.items()}
    shapes: dict[str, tuple[int, int]] = {}
    for d in deltas.values():
        for pos, dw in d.items():
            shapes.setdefault(pos, dw.shape)
    rng = np.random.default_rng(seed)
    probes = {pos: rng.standard_normal((shapes[pos][1], inputs)) for pos in sorted(shapes)}
    sketches = {}
    for c, d in deltas.items():
        parts = [(d[pos] @ x if pos in d else np.zeros((shapes[pos][0], inputs))).ravel() for pos, x in probes.items()]
        v = np.concatenate(parts)
        norm = np.linalg.norm(v)
        sketches[c] = v / norm if norm > 0 else v
    return sketches


def cluster_contributors(sketches: dict[str, np.ndarray], k: int, seed: int = 0) -> list[list[str]]:
    """KMeans (seeded) over the sketches; clusters listed by their first member, members sorted."""
    from sklearn.cluster import KMeans

    names = sorted(sketches)
    if k == len(names):
        return [[n] for n in names]
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(np.stack([sketches[n] for n in names]))
    clusters: dict[int, list[str]] = {}
    for name, label in zip(names, labels, strict=True):
        clusters.setdefault(int(label), []).append(name)
    return sorted(clusters.values(), key=lambda members: members[0])


def mean_delta(members: Sequence[Sequence[Piece]]) -> tuple[LoraWeights, int, float]:
    """One LoRA whose update is exactly the mean of the members' updates at every position.

    Stack the members' A's (rank Σr) and their B's, each B scaled by its own (alpha/r) / n, and write it with
    alpha = rank so that PEFT's scaling is 1: then B_cat·A_cat = (1/n) Σ (alpha_m/r_m) B_m·A_m exactly.
    n counts the members that shared a piece at that position (one that did not is not a zero vote), and
    several pieces of one member at one position count as their mean. Positions with fewer members are
    padded with zero rows/columns up to the largest rank, since one adapter has one rank.
    """
    per_position: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    counts: dict[str, int] = {}  # members with a piece at the position
    for pieces in members:
        mine: dict[str, list[Piece]] = {}
        for p in pieces:
            mine.setdefault(p.position, []).append(p)
        for pos, at in mine.items():
            counts[pos] = counts.get(pos, 0) + 1
            for p in at:
                per_position.setdefault(pos, []).append((p.A.astype(np.float64),
                                                         p.B.astype(np.float64) * p.scaling / len(at)))
    if not per_position:
        raise ValueError("no pieces to merge: every cluster needs at least one contributor with pieces")
    rank = max(sum(A.shape[0] for A, _ in pairs) for pairs in per_position.values())
    weights: LoraWeights = {}
    for pos, pairs in sorted(per_position.items()):
        A = np.concatenate([a for a, _ in pairs], axis=0)
        B = np.concatenate([b for _, b in pairs], axis=1) / counts[pos]
        pad = rank - A.shape[0]
        A = np.pad(A, ((0, pad), (0, 0)))
        B = np.pad(B, ((0, 0), (0, pad)))
        weights[pos] = (A.astype(np.float32), B.astype(np.float32))
    return weights, rank, float(rank)


def _pieces_fingerprint(pieces: Iterable[Piece]) -> str:
    return hashlib.sha256("\n".join(sorted(p.piece_id for p in pieces)).encode()).hexdigest()


# --- styleqa -----------------------------------------------------------------------------------------


# The styles' attributes, as the data's README infers them (tone of 5 and 7 is also humorous).
STYLEQA_LABELS = {1: "elementary-concise-friendly", 2: "elementary-concise-neutral",
                  3: "elementary-informative-friendly", 4: "elementary-informative-neutral",
                  5: "expert-concise-friendly", 6: "expert-concise-neutral", 7: "expert-informative-friendly",
                  8: "expert-informative-neutral"}


def styleqa_groups(rows_per_style: int, styles: Iterable[int] = STYLEQA_SEED_STYLES,
                   folder: Path | None = None) -> dict[str, list[PersonalRecord]]:
    """{"style{s}": the first N training rows of style s}; all styles answer the same training questions."""
    folder = folder or find_styleqa()
    groups = {}
    for s in styles:
        rows = styleqa_rows(folder, s, "train")
        if not 1 <= rows_per_style <= len(rows):
            raise ValueError(f"--rows must be between 1 and {len(rows)} (style {s} has {len(rows)} training rows), "
                             f"got {rows_per_style}")
        groups[f"style{s}"] = [replace(r, user=f"style{s}") for r in rows[:rows_per_style]]
    return groups


def styleqa_probes(n: int, folder: Path | None = None, avoid: Iterable[str] = ()) -> list[str]:
    """The first n questions of style 1's test file that no style's training file holds (and not in `avoid`).

    Seeds and styleqa users of styles 1–8 draw from the training files, so these questions are never a
    seed's training input nor one of those users' history. (Style 0's training file holds these same
    questions: pass a style-0 user's history as `avoid` where that matters.)
    """
    folder = folder or find_styleqa()
    trained = {r.input for s in STYLEQA_SEED_STYLES for r in styleqa_rows(folder, s, "train")} | set(avoid)
    probes = [r.input for r in styleqa_rows(folder, 1, "test") if r.input not in trained]
    if not 1 <= n <= len(probes):
        raise ValueError(f"--probes must be between 1 and {len(probes)} (unused test questions), got {n}")
    return probes[:n]


# --- the build ---------------------------------------------------------------------------------------


def _plain_base(source: str) -> SeedDescriptor:
    """The base, materialized; a local folder is named by its absolute path so seed.json works from anywhere."""
    if Path(source).expanduser().is_dir() and not (Path(source).expanduser() / SEED_FILE).is_file():
        source = str(Path(source).expanduser().resolve())
    base = materialize(source)
    if base.delta is not None:
        raise ValueError(f"{source} is a catalog seed; a catalog's base must be a plain model (its own base, "
                         f"{read_seed_file(source)['base']!r})")
    return base


def _build(out: Path, base: SeedDescriptor, jobs: list[SeedJob], probes: list[str], explain: ExplainSettings,
           max_new_tokens: int, extra: dict, embed: Embed, batch_size: int,
           corpus: dict[str, list[PersonalRecord]] | None = None) -> Catalog:
    explain.check(embed)
    if explain.corpus and not corpus:
        raise ValueError("corpus attributes are embedded from labeled groups; a catalog built from a pool has none "
                         "(leave out --corpus-words)")
    if not probes:
        raise ValueError("no probe prompts: an explanation compares a seed's answers with the base's on probes")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    bad = [j.name for j in jobs if not _NAME.fullmatch(j.name)]
    if bad:
        raise ValueError(f"seed names become folder names: use letters, digits, '.', '_' and '-' only, not "
                         f"{', '.join(map(repr, bad))}")
    settings = {"format": 1, "base": base.seed_id, "base_hash": base.content_hash, "probes": probes,
                "max_new_tokens": max_new_tokens,
                "embed": f"{embed.__module__}.{getattr(embed, '__qualname__', repr(embed))}"} | extra
    _check_settings(out, settings, explain.to_dict())
    known = _known_hashes(out)
    for waiting in sorted((out / RETRAINING_DIR).glob("*")):  # a build stopped while a seed was trained again
        if not (out / SEEDS_DIR / waiting.name).exists():
            waiting.rename(out / SEEDS_DIR / waiting.name)  # its first version stands until the retraining is redone
    base_answers: dict[str, str] | None = None
    with progress(len(jobs), "seed catalog") as bar:
        for job in jobs:
            folder = out / SEEDS_DIR / job.name
            state = _state(folder, job, probes, max_new_tokens, known)
            if state == "done":
                log.info("seed %s: already built and answered, skipped", job.name)
                bar.update(seed=job.name)
                continue
            if state == "build":
                _write_seed(folder, job.name, base, *job.make_weights(), job.built_from, job.fingerprint)
            if base_answers is None:
                base_answers = _base_answers(out, base, jobs, probes, max_new_tokens, batch_size)
            _answer_seed(folder, job.name, probes, base_answers, max_new_tokens, batch_size, known.get(job.name))
            bar.update(seed=job.name)
    catalog = explain_catalog(out, base, jobs, probes, max_new_tokens, explain, embed, batch_size, corpus)
    if explain.corpus:
        catalog = _retrain_misread(out, base, jobs, probes, max_new_tokens, explain, embed, batch_size, corpus,
                                   catalog)
        _warn_misread(out, catalog, jobs)
    return catalog


def _write_seed(folder: Path, name: str, base: SeedDescriptor, weights: LoraWeights, rank: int, alpha: float,
                built_from: str, fingerprint: str) -> None:
    write_seed_folder(folder, name, base, lambda path: save_peft_adapter(path, weights, rank, alpha,
                                                                         base_model=base.seed_id),
                      info={"built_from": built_from, "fingerprint": fingerprint})


def _retrain_misread(out: Path, base: SeedDescriptor, jobs: list[SeedJob], probes: list[str], max_new_tokens: int,
                     explain: ExplainSettings, embed: Embed, batch_size: int,
                     corpus: dict[str, list[PersonalRecord]] | None, catalog: Catalog) -> Catalog:
    """Train once more, with the stronger recipe, each labeled seed whose explanation reads most as another
    seed's label, answer and explain it again, and keep whichever version gives its own label the larger share
    of its mix.

    Why: such a seed sends users of its style elsewhere and draws users of the other style. On styleqa it is the
    seed whose style the base imitates worst (expert-concise-friendly came out as elementary and friendly), and
    a LoRA on attention alone is the first thing to widen. The outcome is written beside the seed
    (RETRAINED_FILE), so that a rerun does not train it a third time.
    """
    labels = {job.name: job.label for job in jobs}
    misread = read_as_another_label(catalog.entries, labels)
    todo = [job for job in jobs if job.name in misread and job.make_stronger is not None
            and not (out / SEEDS_DIR / job.name / RETRAINED_FILE).is_file()]
    if not todo:
        return catalog
    first = {job.name: catalog.entry(job.name).explanation for job in todo}
    base_answers = _base_answers(out, base, jobs, probes, max_new_tokens, batch_size)
    aside = out / RETRAINING_DIR
    for job in todo:
        folder = out / SEEDS_DIR / job.name
        log.info("seed %s reads most as %r, not as its own %r: %s", job.name, misread[job.name][1], job.label,
                 job.stronger)
        shutil.rmtree(aside / job.name, ignore_errors=True)
        aside.mkdir(parents=True, exist_ok=True)
        folder.rename(aside / job.name)  # the first version, until the two are compared
        _write_seed(folder, job.name, base, *job.make_stronger(), f"{job.built_from}, {job.stronger}",
                    job.fingerprint)
        _answer_seed(folder, job.name, probes, base_answers, max_new_tokens, batch_size, None)
    catalog = explain_catalog(out, base, jobs, probes, max_new_tokens, explain, embed, batch_size, corpus)
    restored = False
    for job in todo:
        folder = out / SEEDS_DIR / job.name
        retrained = catalog.entry(job.name).explanation
        shares = {"first": own_label_share(first[job.name], job.label),
                  "retrained": own_label_share(retrained, job.label)}
        kept = "retrained" if reads_more_as_its_label(retrained, first[job.name], job.label) else "first"
        if kept == "first":
            shutil.rmtree(folder)
            (aside / job.name).rename(folder)
            restored = True
        else:
            shutil.rmtree(aside / job.name)
        _write_json(folder / RETRAINED_FILE, {"recipe": job.stronger, "kept": kept, "own_label_share": shares,
                                              "first": first[job.name].to_dict(), "retrained": retrained.to_dict()})
        log.info("seed %s: its own label's share of its mix was %.2f, retrained %.2f: the %s version is kept",
                 job.name, shares["first"], shares["retrained"], kept)
    shutil.rmtree(aside, ignore_errors=True)
    if restored:  # the catalog-wide noise scale is from every seed's answers, so explain the kept ones together
        catalog = explain_catalog(out, base, jobs, probes, max_new_tokens, explain, embed, batch_size, corpus)
    return catalog


def _base_answers(out: Path, base: SeedDescriptor, jobs: Sequence[SeedJob], probes: list[str], max_new_tokens: int,
                  batch_size: int) -> dict[str, str]:
    found = _stored_base_answers(out, jobs, max_new_tokens)
    missing = [p for p in probes if p not in found]
    return found | dict(zip(missing, _answer(base.seed_id, missing, max_new_tokens, batch_size,
                                             "base: probe answers")))


def _answer_seed(folder: Path, name: str, probes: list[str], base_answers: dict[str, str], max_new_tokens: int,
                 batch_size: int, known_hash: str | None) -> None:
    """The seed's answers to the probes (those it already gave with these weights at this length are kept),
    written beside it with the base's."""
    source = str(folder.resolve())
    content_hash = materialize(source).content_hash
    kept = _kept_answers(_stored_answers(folder / ANSWERS_FILE), content_hash, max_new_tokens, known_hash)
    missing = [p for p in probes if p not in kept]
    if kept:
        log.info("seed %s: %d probe answers kept from an earlier build, %d to generate", name,
                 len(probes) - len(missing), len(missing))
    forget = getattr(seed_loading, "forget_seed", None)
    try:
        kept |= dict(zip(missing, _answer(source, missing, max_new_tokens, batch_size, f"seed {name}: probe answers")))
    finally:
        if forget is not None:
            forget(source)
    # kept beside the seed (not in catalog.json, which devices download) to re-explain it without generating
    _write_json(folder / ANSWERS_FILE, {"probes": probes, "max_new_tokens": max_new_tokens,
                                        "content_hash": content_hash, "seed": [kept[p] for p in probes],
                                        "base": [base_answers[p] for p in probes]})


def explain_catalog(out: Path, base: SeedDescriptor, jobs: Sequence[SeedJob], probes: list[str],
                    max_new_tokens: int, explain: ExplainSettings, embed: Embed, batch_size: int,
                    corpus: dict[str, list[PersonalRecord]] | None = None) -> Catalog:
    """Once every seed has its probe answers: the vocabulary (given words, plus the ones the base proposes for
    the seeds), the attribute basis, the noise scale, and every seed's explanation, written as catalog.json.

    This is the only step that depends on the explanation settings, so changing them re-explains a catalog
    without retraining or re-answering anything (model-basis answers are cached in basis_answers.json).
    """
    answers = {job.name: json.loads((out / SEEDS_DIR / job.name / ANSWERS_FILE).read_text()) for job in jobs}
    kept = prose_probes(next(iter(answers.values()))["base"], explain.min_probe_words)
    differences = {name: paired_differences([a["seed"][i] for i in kept], [a["base"][i] for i in kept], embed)
                   for name, a in answers.items()}
    vocabulary = list(explain.words)
    if explain.propose_words:
        proposals = {}
        with progress(len(answers), "words proposed by the base") as bar:
            for name, a in answers.items():
                proposals[name] = _proposals(out / SEEDS_DIR / name, base, a)
                bar.update(seed=name)
        vocabulary += proposed_vocabulary(proposals, vocabulary, limit=explain.propose_words)
        log.info("words proposed by the base for the seeds: %s", ", ".join(vocabulary[len(explain.words):]))
    if explain.basis == "text":
        vectors = text_basis(tuple(vocabulary), embed).vectors
    else:
        # the base's plain answers to these probes are already stored beside every seed
        n = explain.basis_probes
        plain = next(iter(answers.values()))["base"][:n]
        vectors = _model_basis(out, base, probes[:n], plain, vocabulary, max_new_tokens, embed, batch_size)
    if explain.corpus:
        labels = [label for label in corpus if label not in vocabulary]
        if labels:
            vectors = np.vstack([vectors, _corpus_basis(out, base, {k: corpus[k] for k in labels}, max_new_tokens,
                                                        embed, batch_size)])
            vocabulary += labels
    groups = [d for d in differences.values() if len(d) > 1]
    basis = AttributeBasis(tuple(vocabulary), vectors, noise_scale(groups) if explain.scaled and groups else None)
    entries = []
    for job in jobs:
        folder = out / SEEDS_DIR / job.name
        delta_bytes = sum(f.stat().st_size for f in (folder / DELTA_DIR).glob("*.safetensors"))
        built_from = read_seed_file(folder).get("built_from", job.built_from)  # says so when it was retrained
        entries.append(CatalogEntry(job.name, answers[job.name]["content_hash"],
                                    decompose(differences[job.name].mean(axis=0), basis), built_from, delta_bytes))
    catalog = Catalog(out, base.seed_id, base.content_hash, basis, [probes[i] for i in kept], max_new_tokens,
                      sorted(entries, key=lambda e: e.name))
    catalog.save()
    return catalog


def prose_probes(base_answers: Sequence[str], min_words: int) -> list[int]:
    """Indices of the probes whose base answer has at least `min_words` words (all of them for 0)."""
    kept = [i for i, answer in enumerate(base_answers) if len(answer.split()) >= min_words]
    if not kept:
        raise ValueError(f"none of the {len(base_answers)} probes has a base answer of {min_words} words or more: "
                         f"lower --min-probe-words or add --probes")
    return kept


def own_label_share(explanation: Explanation, label: str) -> float:
    """How much of a seed's mix of attributes is its own label (0..1)."""
    return explanation.mix().coefficients.get(label, 0.0)


def reads_more_as_its_label(candidate: Explanation, incumbent: Explanation, label: str) -> bool:
    return own_label_share(candidate, label) > own_label_share(incumbent, label)


def _warn_misread(out: Path, catalog: Catalog, jobs: Sequence[SeedJob]) -> None:
    for name, (own, other) in read_as_another_label(catalog.entries, {j.name: j.label for j in jobs}).items():
        tried = (out / SEEDS_DIR / name / RETRAINED_FILE).is_file()
        log.warning("seed %s reads most as %r, another seed's label, not as its own %r: its answers do not show its "
                    "style, so devices of that style may miss it and devices of the other style may pick it%s", name,
                    other, own, " (trained again with more capacity too: see its retrained.json)" if tried else "")


def read_as_another_label(entries: Sequence[CatalogEntry], labels: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Seeds whose largest label attribute is another seed's label: name -> (own label, the label it reads as)."""
    known = set(labels.values())
    found = {}
    for entry in entries:
        own = labels.get(entry.name)
        named = {w: z for w, z in entry.explanation.coefficients.items() if w in known}
        top = max(named, key=named.get) if named else None
        if own is not None and top is not None and top != own:
            found[entry.name] = (own, top)
    return found


def _proposals(folder: Path, base: SeedDescriptor, answers: dict) -> Counter[str]:
    """The base's proposed style words for one seed (its first probe pairs), cached beside the seed."""
    pairs = list(zip(answers["base"], answers["seed"]))[:PROPOSAL_PAIRS]
    key = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()
    path = folder / PROPOSALS_FILE
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return Counter(cached["words"])
    words = propose_words(seed_loading.load_seed(base.seed_id), pairs)
    _write_json(path, {"key": key, "words": dict(words.most_common())})
    return words


def _model_basis(out: Path, base: SeedDescriptor, probes: list[str], plain: list[str], words: list[str],
                 max_new_tokens: int, embed: Embed, batch_size: int) -> np.ndarray:
    """Per word, the base's answers to "Answer in a <word> style." + probe against its `plain` answers (as the
    devices embed them); the styled answers are cached per word, so adding a word generates only that word's."""
    path = out / BASIS_FILE
    key = {"base_hash": base.content_hash, "probes": probes, "max_new_tokens": max_new_tokens}
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if cache.get("key") != key:
        cache = {"key": key, "styled": {}}
    todo = [w for w in words if w not in cache["styled"]]
    if todo:
        model = seed_loading.load_seed(base.seed_id)
        with progress(len(todo), "attribute basis") as bar:
            for word in todo:
                prompts = [f"{STYLE_INSTRUCTION.format(word=word)}\n\n{p}" for p in probes]
                cache["styled"][word] = generate(model, [PersonalRecord("probe", q, "") for q in prompts],
                                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
                _write_json(path, cache)
                bar.update(word=word)
    return np.stack([difference_direction(cache["styled"][w], plain, embed) for w in words])


def _corpus_basis(out: Path, base: SeedDescriptor, corpus: dict[str, list[PersonalRecord]], max_new_tokens: int,
                  embed: Embed, batch_size: int) -> np.ndarray:
    """Per label, its records' real answers (cut to `max_new_tokens` tokens, as a device cuts its own) against
    the base's answers to the same inputs. The base answers each distinct input once (labeled groups often
    share their questions), cached in corpus_answers.json."""
    path = out / CORPUS_FILE
    key = {"base_hash": base.content_hash, "max_new_tokens": max_new_tokens}
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if cache.get("key") != key:
        cache = {"key": key, "answers": {}}
    model = seed_loading.load_seed(base.seed_id)
    inputs = (r.input for records in corpus.values() for r in records)
    todo = list(dict.fromkeys(q for q in inputs if q not in cache["answers"]))
    with progress(len(todo), "corpus attributes: base answers") as bar:
        for start in range(0, len(todo), batch_size * 4):
            chunk = todo[start:start + batch_size * 4]
            answers = generate(model, [PersonalRecord("corpus", q, "") for q in chunk], max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
            cache["answers"].update(zip(chunk, answers))
            _write_json(path, cache)
            bar.update(len(chunk))
    vectors = []
    for records in corpus.values():
        own = [clip_to_tokens(model.tokenizer, r.output, max_new_tokens) for r in records]
        vectors.append(difference_direction(own, [cache["answers"][r.input] for r in records], embed))
    return np.stack(vectors)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _known_hashes(out: Path) -> dict[str, str]:
    """Seed name -> content hash from an earlier catalog.json, whose probe answers can be trusted for it."""
    try:
        return {e.name: e.content_hash for e in load_catalog(out).entries}
    except (FileNotFoundError, ValueError):
        return {}


def _answer(source: str, probes: list[str], max_new_tokens: int, batch_size: int, desc: str) -> list[str]:
    """The model's greedy answers to the probes, a batch at a time behind a progress display."""
    if not probes:
        return []
    seed = seed_loading.load_seed(source)
    records = [PersonalRecord(user="probe", input=p, output="") for p in probes]
    answers: list[str] = []
    with progress(len(records), desc) as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            answers += generate(seed, chunk, max_new_tokens=max_new_tokens, batch_size=batch_size)
            bar.update(len(chunk))
    return answers


def _stored_answers(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:  # a damaged file is answered again
        return {}


def _stored_base_answers(out: Path, jobs: Sequence[SeedJob], max_new_tokens: int) -> dict[str, str]:
    """Probe -> the base's answer, from every seed's stored answers of this length (the base's answers do not
    depend on the seed, so probes added on a rerun are the only ones the base answers again)."""
    found: dict[str, str] = {}
    for job in jobs:
        stored = _stored_answers(out / SEEDS_DIR / job.name / ANSWERS_FILE)
        if stored.get("max_new_tokens", max_new_tokens) == max_new_tokens and "base" in stored:
            found |= dict(zip(stored["probes"], stored["base"]))
    return found


def _kept_answers(stored: dict, content_hash: str, max_new_tokens: int, known_hash: str | None) -> dict[str, str]:
    """Probe -> the seed's answer in its stored answers, when they were generated by these very weights at this
    length."""
    answered_for = stored.get("content_hash") or known_hash  # answers written before hashes were stored
    if not stored or answered_for != content_hash or stored.get("max_new_tokens", max_new_tokens) != max_new_tokens:
        return {}
    return dict(zip(stored["probes"], stored["seed"]))


def _check_settings(out: Path, settings: dict, explain: dict) -> None:
    """Refuse to add seeds built otherwise to a build folder; record the settings of a new one. The
    explanation settings are recorded too, but may change: they only re-explain the seeds."""
    path = out / BUILD_FILE
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they read back
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is damaged ({err}); build into another --out folder") from None
        if any(before.get(k) != settings.get(k) for k in _ANSWER_KEYS):
            log.info("probes or answer length changed: the seeds are answered again (answers to probes they already "
                     "answered at this length are kept), not retrained")
        before = {k: v for k, v in before.items() if k not in _EXPLAIN_KEYS | _ANSWER_KEYS}
        changed = sorted(k for k in settings.keys() | before.keys()
                         if k not in _ANSWER_KEYS and settings.get(k) != before.get(k))
        if changed:
            raise ValueError(f"the catalog at {out} was built with other settings ({', '.join(changed)} differ: "
                             f"{_difference(before, settings, changed[0])}); rerun with the same settings to "
                             f"resume it, or build into another --out folder")
    elif (out / CATALOG_FILE).is_file() or (out / SEEDS_DIR).is_dir():
        raise ValueError(f"{out} holds seeds or a catalog.json without the {BUILD_FILE} that `bouquet seeds build` "
                         f"writes; build into another --out folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, settings | {"explain": explain})


def _difference(before: dict, now: dict, key: str) -> str:
    def short(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "…"

    return f"{key} was {short(before.get(key))}, now {short(now.get(key))}"


def _state(folder: Path, job: SeedJob, probes: list[str], max_new_tokens: int, known: dict[str, str]) -> str:
    """"done" (folder intact and its probe answers stored), "answer" (delta on disk, answers missing or stale)
    or "build"."""
    if not (folder / SEED_FILE).is_file():
        return "build"
    meta = read_seed_file(folder)
    if meta.get("fingerprint") != job.fingerprint:
        raise ValueError(f"seed {job.name!r} in {folder.parent.parent} was built from other data "
                         f"({meta.get('built_from')}; now: {job.built_from}); build into another --out folder")
    try:
        content_hash = materialize(str(folder.resolve())).content_hash
    except ValueError as err:
        log.warning("seed %s: rebuilding a damaged folder (%s)", job.name, err)
        return "build"
    stored = _stored_answers(folder / ANSWERS_FILE)
    if stored.get("probes") == probes and _kept_answers(stored, content_hash, max_new_tokens, known.get(job.name)):
        if "content_hash" not in stored or "max_new_tokens" not in stored:  # an earlier version's file: complete it
            _write_json(folder / ANSWERS_FILE, stored | {"content_hash": content_hash, "max_new_tokens": max_new_tokens})
        return "done"
    return "answer"


def _jsonable(obj):
    return json.loads(json.dumps(obj))
