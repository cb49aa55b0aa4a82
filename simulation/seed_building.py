"""Building the seed catalog (XPerT): seeds made from labeled data or from the pool, each with its explanation.

    build_catalog_from_labels   one seed per group of records (a styleqa style, a user of a JSONL file):
                                a LoRA trained from the base on the group's records
    build_catalog_from_pool     one seed per cluster of pool contributors: the exact mean of the members'
                                LoRA updates, written as one LoRA

Either way a seed is stored as base + delta (protocols.seeds), and explained by how its answers to the
probe prompts differ from the base's, in attribute words (coordinator.explain_seed), so that a device can
pick the nearest seed from catalog.json alone. It lives here because it needs both a device's trainer and
the coordinator's explainer, which never import each other.

A build is resumable: catalog.json is saved after every seed, and a rerun with the same settings skips the
seeds that are already explained and whose folders still hash to their catalog entries. The settings live in
build.json next to catalog.json; a rerun with other settings into the same folder is refused rather than
mixing seeds built two ways in one catalog.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from coordinator.explain_seed import explain_seed, minilm_embed
from coordinator.pool import PiecePool
from participants import seed_loading
from participants.adapters import save_peft_adapter
from participants.evaluation import generate
from participants.lora_training import LoraSettings, LoraWeights, train_private_lora
from participants.progress import log, progress
from participants.style_direction import attribute_basis
from protocols.attribute_words import text_basis
from protocols.catalog import CATALOG_FILE, Catalog, CatalogEntry, load_catalog
from protocols.explanations import STYLE_WORDS, Embed
from protocols.pieces import Piece
from protocols.records import PersonalRecord
from protocols.seeds import DEFAULT_SEED, DELTA_DIR, SEED_FILE, SeedDescriptor, materialize, read_seed_file
from protocols.seeds import write_seed_folder
from simulation.datasets import find_styleqa, styleqa_rows

BUILD_FILE = "build.json"
DEFAULT_WORDS = STYLE_WORDS[:8]
STYLEQA_SEED_STYLES = range(1, 9)  # style 0 is the unstylized reference, not a style to offer
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class SeedJob:
    """One seed to build: `make_weights` is only called when the seed's delta is not on disk yet."""

    name: str
    built_from: str
    fingerprint: str  # what the seed is made of; a folder built from something else is never reused
    make_weights: Callable[[], tuple[LoraWeights, int, float]]  # (weights, rank, alpha)


# --- from labeled groups -----------------------------------------------------------------------------


def build_catalog_from_labels(out: str | Path, groups: dict[str, list[PersonalRecord]],
                              base_source: str = DEFAULT_SEED, lora: LoraSettings | None = None,
                              probes: Sequence[str] = (), words: Sequence[str] = DEFAULT_WORDS,
                              basis: str = "text", max_new_tokens: int = 48,
                              built_from: dict[str, str] | None = None, embed: Embed = minilm_embed,
                              batch_size: int = 8) -> Catalog:
    """One seed per group: a LoRA trained from the base on the group's records, then explained.

    Probe prompts must not be inputs a seed trains on: a seed would answer them from memory, and its
    explanation would describe its training answers rather than how it answers in general.
    """
    lora = lora or LoraSettings()
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
    jobs = []
    for name, records in groups.items():
        def make(records=records, name=name):
            weights, report = train_private_lora(seed_loading.load_seed(base.seed_id), records, lora,
                                                 desc=f"seed {name}: LoRA")
            log.info("seed %s: trained %d steps in %.0f s (loss %.3f -> %.3f)", name, len(report.losses),
                     report.seconds, report.losses[0], report.losses[-1])
            return weights, lora.rank, lora.alpha

        jobs.append(SeedJob(name, built_from.get(name, f"{len(records)} labeled records"),
                            _records_fingerprint(records), make))
    settings = {"from": "labels", "lora": _jsonable(asdict(lora))}
    return _build(Path(out), base, jobs, list(probes), tuple(words), basis, max_new_tokens, settings, embed,
                  batch_size)


def _records_fingerprint(records: Sequence[PersonalRecord]) -> str:
    data = json.dumps([[r.input, r.output] for r in records], ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()


# --- from the pool -----------------------------------------------------------------------------------


def build_catalog_from_pool(out: str | Path, pool_dir: str | Path, seed_source: str | None, clusters: int,
                            probes: Sequence[str] = (), words: Sequence[str] = DEFAULT_WORDS, basis: str = "text",
                            max_new_tokens: int = 48, sketch_inputs: int = 4, random_seed: int = 0,
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
    return _build(Path(out), base, jobs, list(probes), tuple(words), basis, max_new_tokens, settings, embed,
                  batch_size)


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


def _build(out: Path, base: SeedDescriptor, jobs: list[SeedJob], probes: list[str], words: tuple[str, ...],
           basis: str, max_new_tokens: int, extra: dict, embed: Embed, batch_size: int) -> Catalog:
    if basis not in ("text", "model"):
        raise ValueError(f"basis must be 'text' (hand-written exemplars) or 'model' (the base's own styled "
                         f"answers), got {basis!r}")
    if basis == "model" and embed is not minilm_embed:
        raise ValueError("the model basis is embedded with MiniLM on the device side; explain with the default "
                         "MiniLM embedder too, or use the text basis")
    if not probes:
        raise ValueError("no probe prompts: an explanation compares a seed's answers with the base's on probes")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    bad = [j.name for j in jobs if not _NAME.fullmatch(j.name)]
    if bad:
        raise ValueError(f"seed names become folder names: use letters, digits, '.', '_' and '-' only, not "
                         f"{', '.join(map(repr, bad))}")
    settings = {"format": 1, "base": base.seed_id, "base_hash": base.content_hash, "basis": basis,
                "words": list(words), "probes": probes, "max_new_tokens": max_new_tokens,
                "embed": f"{embed.__module__}.{getattr(embed, '__qualname__', repr(embed))}"} | extra
    _check_settings(out, settings)
    catalog = _open_catalog(out, base, probes, words, basis, max_new_tokens, embed, batch_size)
    records = [PersonalRecord(user="probe", input=p, output="") for p in probes]
    base_answers: list[str] | None = None
    forget = getattr(seed_loading, "forget_seed", None)
    with progress(len(jobs), "seed catalog") as bar:
        for job in jobs:
            folder = catalog.seed_folder(job.name)
            state = _state(catalog, folder, job)
            if state == "done":
                log.info("seed %s: already in the catalog, skipped", job.name)
                bar.update(seed=job.name)
                continue
            if state == "build":
                weights, rank, alpha = job.make_weights()
                write_seed_folder(folder, job.name, base,
                                  lambda path, w=weights, r=rank, a=alpha: save_peft_adapter(
                                      path, w, r, a, base_model=base.seed_id),
                                  info={"built_from": job.built_from, "fingerprint": job.fingerprint})
            if base_answers is None:
                base_answers = generate(seed_loading.load_seed(base.seed_id), records, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size)
            source = str(folder.resolve())
            seed = seed_loading.load_seed(source)
            try:
                answers = generate(seed, records, max_new_tokens=max_new_tokens, batch_size=batch_size)
            finally:
                del seed
                if forget is not None:
                    forget(source)
            # kept beside the seed (not in catalog.json, which devices download) to re-explain it without generating
            (folder / "probe_answers.json").write_text(json.dumps({"probes": probes, "seed": answers,
                                                                  "base": base_answers}, indent=1))
            explanation = explain_seed(answers, base_answers, catalog.basis, embed)
            delta_bytes = sum(f.stat().st_size for f in (folder / DELTA_DIR).glob("*.safetensors"))
            catalog.upsert(CatalogEntry(job.name, materialize(source).content_hash, explanation, job.built_from,
                                        delta_bytes))
            catalog.save()
            bar.update(seed=job.name)
    return catalog


def _check_settings(out: Path, settings: dict) -> None:
    """Refuse to add to a catalog built otherwise; record the settings of a new one (before catalog.json)."""
    path = out / BUILD_FILE
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they read back
    if path.is_file() and (out / CATALOG_FILE).is_file():  # without catalog.json, nothing was built yet
        try:
            before = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is damaged ({err}); build into another --out folder") from None
        changed = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
        if changed:
            raise ValueError(f"the catalog at {out} was built with other settings ({', '.join(changed)} differ: "
                             f"{_difference(before, settings, changed[0])}); rerun with the same settings to "
                             f"resume it, or build into another --out folder")
        return
    if (out / CATALOG_FILE).is_file():
        raise ValueError(f"{out} holds a catalog.json without the {BUILD_FILE} that `bouquet seeds build` writes; "
                         f"build into another --out folder")
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(settings, indent=1))
    tmp.replace(path)


def _difference(before: dict, now: dict, key: str) -> str:
    def short(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "…"

    return f"{key} was {short(before.get(key))}, now {short(now.get(key))}"


def _open_catalog(out: Path, base: SeedDescriptor, probes: list[str], words: tuple[str, ...], basis: str,
                  max_new_tokens: int, embed: Embed, batch_size: int) -> Catalog:
    """The catalog being resumed, or a new empty one with its attribute basis, saved at once."""
    if (out / CATALOG_FILE).is_file():
        return load_catalog(out)
    if basis == "text":
        vectors = text_basis(words, embed)
    else:  # the base's own answers told to write in each style, embedded with MiniLM as devices do
        vectors = attribute_basis(seed_loading.load_seed(base.seed_id), probes, words, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size)
    catalog = Catalog(out, base.seed_id, base.content_hash, vectors, probes, max_new_tokens)
    catalog.save()
    return catalog


def _state(catalog: Catalog, folder: Path, job: SeedJob) -> str:
    """"done" (explained, folder intact), "explain" (delta on disk, not yet in the catalog) or "build"."""
    if not (folder / SEED_FILE).is_file():
        return "build"
    meta = read_seed_file(folder)
    if meta.get("fingerprint") != job.fingerprint:
        raise ValueError(f"seed {job.name!r} in {catalog.folder} was built from other data ({meta.get('built_from')}; "
                         f"now: {job.built_from}); build into another --out folder")
    try:
        content_hash = materialize(str(folder.resolve())).content_hash
    except ValueError as err:
        log.warning("seed %s: rebuilding a damaged folder (%s)", job.name, err)
        return "build"
    known = {e.name: e.content_hash for e in catalog.entries}
    return "done" if known.get(job.name) == content_hash else "explain"


def _jsonable(obj):
    return json.loads(json.dumps(obj))
