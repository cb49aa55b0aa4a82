"""The device's stream buffer: records arrive one at a time, a buffer of B items keeps those its rule prefers
(participants.buffer_rules, scored by participants.selection_scores), the owner annotates a few of them per round,
and the device's model writes pairs like each annotated item (participants.synthesis). What a sharer trains on is
then the annotated items plus their kept pairs (`training_records`).

It lives in the device folder as `buffer.json`: the items (their records, scores, embeddings and token states,
who annotated them and the kept pairs), the domains and running statistics the scores depend on, its settings,
the seed whose hidden states scored it, and its random seed: 128 bits drawn from the OS when the buffer is created
(or given, for a reproducible experiment), which the random rule draws from, so that every device samples its own
positions of its stream and a replay after a restart decides the same. Format 1 files (before the random seed was
the buffer's own, when every device used the setting rng-seed, 0 by default, and before items kept their token
states) still load: that setting becomes their random seed, so their replay is unchanged, and their items keep
the DSS they arrived with; they are written back as format 2.

Durability: every change is a whole new file, written to a temp file, synced, renamed into place and the folder
synced (protocols.files.write_atomic plus a directory fsync), under an exclusive lock (`buffer.lock`). A command
that returned has its change on disk; a command killed before that leaves the file as it was. A file damaged on
disk fails its SHA-256 (kept inside it) and is refused on start, saying what to do; the device never overwrites it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from participants.buffer_rules import BufferItem, annotation_order, current_domains, evict
from participants.selection_scores import ItemFeatures, StreamScorer, Welford, embedding_entropy, in_domain_dissimilarity
from participants.stream_settings import BufferSettings, SynthesisSettings
from participants.synthesis import training_mix
from protocols.files import write_atomic
from protocols.records import PersonalRecord, parse_record

BUFFER_FILE = "buffer.json"
LOCK_FILE = "buffer.lock"
FORMAT = "bouquet-buffer/2"
FORMAT_1 = "bouquet-buffer/1"  # read only: rng_seed in its settings instead of its own random seed
RECENT_BATCHES = 32  # digests of the latest added files, so that re-running an add whose reply was lost is a no-op


class BufferDamaged(RuntimeError):
    """buffer.json cannot be trusted: it does not parse, or its checksum or contents are wrong."""


def _b64(array: np.ndarray, dtype: str = "<f4") -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


def _array(text: str, shape: tuple[int, ...] | None = None, dtype: str = "<f4") -> np.ndarray:
    """The array, from its base64 bytes (float64 for the scorer's running means, so that a reload is exact)."""
    array = np.frombuffer(base64.b64decode(text, validate=True), dtype=dtype).copy()
    return array.reshape(shape) if shape is not None else array


@dataclass
class StreamBuffer:
    settings: BufferSettings
    synthesis: SynthesisSettings
    seed_id: str
    seed_hash: str
    scorer: StreamScorer
    random_seed: int  # the random rule's: the buffer's own (participants.buffer_rules)
    items: list[BufferItem] = field(default_factory=list)
    rounds: int = 0  # annotation rounds held
    kept: int = 0  # items that entered the buffer
    batches: list[str] = field(default_factory=list)  # digests of the latest added files

    @classmethod
    def new(cls, settings: BufferSettings, synthesis: SynthesisSettings, seed_id: str, seed_hash: str,
            random_seed: int | None = None):
        """An empty buffer; its random seed drawn from the OS unless given (a reproducible experiment)."""
        if random_seed is None:
            random_seed = secrets.randbits(128)
        if not 0 <= random_seed < 1 << 128:
            raise ValueError(f"a buffer's random seed is a whole number in [0, 2^128), got {random_seed}")
        return cls(settings, synthesis, seed_id, seed_hash, StreamScorer(settings.domains), random_seed)

    @property
    def seen(self) -> int:
        return self.scorer.seen

    # --- the stream -------------------------------------------------------------------------------------------

    def offer(self, record: PersonalRecord, f: ItemFeatures, annotation: dict | None = None) -> int | None:
        """Score an arriving record and keep it or not; returns the index it got, or None when not kept. The
        scorer learns from every item, kept or not."""
        sc = self.scorer
        # Learn first, then score: the arriving item and the stored ones it competes with are then measured against
        # the same μ and domains, each of which includes all of them. Centered on a mean that held the stored items
        # but not the new one, the stored ones looked unlike each other (by about 1/n in cosine) and the new one did
        # not, so IDD favoured whatever filled the buffer first.
        sc.learn(f)
        shares = sc.domain_shares(f.tokens)
        domain = int(shares.argmax())
        centered = sc.centered(f.embedding[None])[0]
        domains, _ = current_domains(self.items, sc)
        bucket = [it.embedding for it, d in zip(self.items, domains) if d == domain]
        idd = in_domain_dissimilarity(centered, sc.centered(np.stack(bucket)) if bucket else np.zeros((0, 1)))
        item = BufferItem(record, sc.seen, f.embedding.astype(np.float32), f.tokens.astype(np.float16), domain,
                          embedding_entropy(f.embedding, f.n_tokens), float(shares[domain]), idd,
                          annotation if record.output else None)
        # the stream's first item's DSS is against domains made of its own words alone, no measurement: it stays
        # out of the statistics the z-scores come from
        for k in ("eoe", "dss", "idd") if sc.seen > 1 else ("eoe", "idd"):
            sc.stats[k].add(getattr(item, k))
        if len(self.items) < self.settings.capacity:
            slot = len(self.items)
            self.items.append(item)
        else:
            slot = evict(self.items, item, sc, self.settings, self.random_seed)
            if slot is not None:
                self.items[slot] = item
        self.kept += slot is not None
        return slot

    # --- annotation -------------------------------------------------------------------------------------------

    def requests(self) -> list[BufferItem]:
        """This round's items to annotate: up to `budget` unannotated items, in the rule's order."""
        order = annotation_order(self.items, self.scorer, self.settings, self.rounds + 1, self.random_seed)
        return [self.items[i] for i in order[: self.settings.budget]]

    def find(self, user: str, item_id: str | None, input: str) -> BufferItem | None:
        for it in self.items:
            if it.record.user == user and it.record.id == item_id and (item_id is not None or it.record.input == input):
                return it
        return None

    def annotate(self, answers: list[PersonalRecord], by: str, synthesize=None) -> list[BufferItem]:
        """Record the owner's answers to buffered items as one annotation round, and the pairs `synthesize`
        (records -> participants.synthesis.Synthesis per record) writes for them. An answer must name an item
        the buffer holds, unannotated, and fit the round's budget; otherwise nothing is recorded."""
        if len(answers) > self.settings.budget:
            raise ValueError(f"{len(answers)} answers, but a round annotates at most {self.settings.budget} items "
                             f"(the buffer's budget)")
        targets = []
        for n, answer in enumerate(answers, start=1):
            item = self.find(answer.user, answer.id, answer.input)
            what = f"answer {n} (user {answer.user!r}, id {answer.id!r})"
            if item is None:
                raise ValueError(f"{what}: the buffer holds no such item (it may have left the buffer); ask "
                                 f"`bouquet device annotate DIR --ask` for the items to annotate")
            if item.annotated or item in targets:
                raise ValueError(f"{what}: already annotated by {item.annotation['by'] if item.annotation else by!r}")
            if not answer.output.strip():
                raise ValueError(f"{what}: the answer ('output') is empty")
            targets.append(item)
        self.rounds += 1
        stamp = {"by": by, "round": self.rounds, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for item, answer in zip(targets, answers):
            item.record = PersonalRecord(item.record.user, item.record.input, answer.output, item.record.id,
                                         item.record.time)
            item.annotation = dict(stamp)
        made = synthesize([t.record for t in targets]) if synthesize is not None else []
        for item, synthesis in zip(targets, made):
            item.written = synthesis.written
            item.synthetic = [p.to_json() for p in synthesis.kept]
        return targets

    def annotated(self) -> list[BufferItem]:
        return sorted((it for it in self.items if it.annotated), key=lambda it: it.seq)

    def training_records(self, with_synthetic: bool = True) -> list[PersonalRecord]:
        """What the private adapter and a sharer's pieces train on: the annotated items and their kept pairs, mixed
        as the synthesis settings say (participants.synthesis.training_mix)."""
        annotated = self.annotated()
        written = [PersonalRecord(it.record.user, p["input"], p["output"]) for it in annotated for p in it.synthetic]
        return training_mix([it.record for it in annotated], written if with_synthetic else [],
                            self.synthesis.repeat_annotated)

    def memory_bytes(self) -> dict[str, int]:
        """What the buffer holds in memory: its items' text, their embeddings and token states, and the scorer's
        state."""
        text = sum(len(it.record.input.encode()) + len(it.record.output.encode()) for it in self.items)
        pairs = sum(len(p["input"].encode()) + len(p["output"].encode()) for it in self.items for p in it.synthetic)
        emb = sum(it.embedding.nbytes + (it.tokens.nbytes if it.tokens is not None else 0) for it in self.items)
        sc = self.scorer
        state = (sc.centroids.nbytes if sc.centroids is not None else 0) + \
                (sc.mean_embedding.nbytes if sc.mean_embedding is not None else 0)
        return {"text": text, "pairs": pairs, "embeddings": emb, "scorer": state, "total": text + pairs + emb + state}

    # --- the file ---------------------------------------------------------------------------------------------

    def to_state(self) -> dict:
        sc = self.scorer
        return {
            "settings": self.settings.to_json(), "synthesis": self.synthesis.to_json(),
            "seed": {"id": self.seed_id, "content-hash": self.seed_hash},
            "random-seed": f"{self.random_seed:032x}",  # hex: 128 bits, beyond what many JSON readers keep exact
            "rounds": self.rounds, "kept": self.kept, "batches": self.batches,
            "scorer": {"seen": sc.seen, "dim": 0 if sc.mean_embedding is None else int(sc.mean_embedding.size),
                       "centroids": None if sc.centroids is None else _b64(sc.centroids, "<f8"),
                       "counts": None if sc.counts is None else [float(c) for c in sc.counts],
                       "mean": None if sc.mean_embedding is None else _b64(sc.mean_embedding, "<f8"),
                       "stats": {k: [w.n, w.mean, w.m2] for k, w in sc.stats.items()}},
            "items": [{"record": json.loads(it.record.to_json()) | {"output": it.record.output}, "seq": it.seq,
                       "embedding": _b64(it.embedding),
                       "tokens": None if it.tokens is None else _b64(it.tokens, "<f2"), "domain": it.domain,
                       "eoe": it.eoe, "dss": it.dss, "idd": it.idd, "annotation": it.annotation,
                       "synthetic": it.synthetic, "written": it.written}
                      for it in self.items],
        }

    def to_bytes(self) -> bytes:
        state = self.to_state()
        return json.dumps({"format": FORMAT, "sha256": _digest(state), "state": state}).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "StreamBuffer":
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BufferDamaged(f"{where}: not valid JSON ({err})") from None
        if not isinstance(doc, dict) or doc.get("format") not in (FORMAT, FORMAT_1):
            raise BufferDamaged(f"{where}: not a bouquet buffer file this version reads (format "
                                f"{doc.get('format')!r}; it reads {FORMAT!r} and {FORMAT_1!r}): if a newer bouquet "
                                f"wrote it, use that one" if isinstance(doc, dict) else f"{where}: not a buffer file")
        state = doc.get("state")
        if not isinstance(state, dict) or doc.get("sha256") != _digest(state):
            raise BufferDamaged(f"{where}: its contents do not match the checksum written with them: the file was "
                                f"changed or damaged on disk")
        try:
            if doc["format"] == FORMAT_1:
                state = _from_format_1(state)
            return cls._from_state(state)
        except (KeyError, TypeError, ValueError) as err:
            raise BufferDamaged(f"{where}: its contents are inconsistent ({type(err).__name__}: {err})") from None

    @classmethod
    def _from_state(cls, state: dict) -> "StreamBuffer":
        s = BufferSettings(**state["settings"])
        sc_state = state["scorer"]
        dim = int(sc_state["dim"])
        scorer = StreamScorer(s.domains, seen=int(sc_state["seen"]),
                              stats={k: Welford(int(v[0]), float(v[1]), float(v[2]))
                                     for k, v in sc_state["stats"].items()})
        if sc_state["centroids"] is not None:
            scorer.centroids = _array(sc_state["centroids"], (-1, dim), "<f8")
            scorer.counts = np.asarray(sc_state["counts"], dtype=np.float64)
            scorer.mean_embedding = _array(sc_state["mean"], (dim,), "<f8")
        items = []
        for n, raw in enumerate(state["items"]):
            record = parse_record(raw["record"], f"item {n}", require_output=False)
            embedding = _array(raw["embedding"])
            if embedding.shape != (dim,) or not np.isfinite(embedding).all():
                raise ValueError(f"item {n}'s embedding has {embedding.size} values, not {dim} finite ones")
            tokens = None if raw["tokens"] is None else _array(raw["tokens"], None, "<f2")
            if tokens is not None:
                if tokens.size == 0 or tokens.size % dim or not np.isfinite(tokens).all():
                    raise ValueError(f"item {n}'s token states are {tokens.size} values, not rows of {dim} finite ones")
                tokens = tokens.reshape(-1, dim)
            items.append(BufferItem(record, int(raw["seq"]), embedding, tokens, int(raw["domain"]), float(raw["eoe"]),
                                    float(raw["dss"]), float(raw["idd"]), raw["annotation"], list(raw["synthetic"]),
                                    int(raw["written"])))
        if len(items) > s.capacity:
            raise ValueError(f"{len(items)} items in a buffer of capacity {s.capacity}")
        random_seed = int(state["random-seed"], 16)
        if not 0 <= random_seed < 1 << 128:
            raise ValueError(f"random seed {state['random-seed']!r} is not 128 bits")
        # a buffer written before a synthesis setting existed keeps writing and training as it did then
        synthesis = SynthesisSettings(**({"synthesis_writer": "seed", "repeat_annotated": False} | state["synthesis"]))
        return cls(s, synthesis, str(state["seed"]["id"]),
                   str(state["seed"]["content-hash"]), scorer, random_seed, items, int(state["rounds"]),
                   int(state["kept"]), [str(b) for b in state["batches"]])


def _from_format_1(state: dict) -> dict:
    """A format 1 state as format 2: its settings' rng_seed becomes its random seed, so the random rule decides as
    it did; its items have no token states, so they keep the domain and DSS they arrived with."""
    settings = dict(state["settings"])
    return state | {"settings": settings, "random-seed": f"{int(settings.pop('rng_seed')):032x}",
                    "items": [raw | {"tokens": None} for raw in state["items"]]}


def _digest(state: dict) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- on disk --------------------------------------------------------------------------------------------------


def buffer_path(root: str | Path) -> Path:
    return Path(root) / BUFFER_FILE


def what_to_do(path: Path) -> str:
    return (f"the device will not overwrite it. Restore {path.name} from a backup, or move it aside "
            f"(mv {path} {path}.damaged) to start an empty buffer and add the records again")


def load_buffer(root: str | Path) -> StreamBuffer | None:
    """The device's buffer, or None when it has none; BufferDamaged (saying what to do) when it cannot be read."""
    path = buffer_path(root)
    if not path.exists():
        return None
    try:
        return StreamBuffer.from_bytes(path.read_bytes(), str(path))
    except BufferDamaged as err:
        raise BufferDamaged(f"{err}; {what_to_do(path)}") from None


def save_buffer(root: str | Path, buffer: StreamBuffer) -> None:
    """Replace buffer.json with this state, durably: synced file, atomic rename, synced folder."""
    path = buffer_path(root)
    write_atomic(path, buffer.to_bytes())
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself reaches the disk before the caller acknowledges anything
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(root: str | Path):
    """Exclusive use of the device's buffer for one read-change-write (two `device add` at once would lose one)."""
    with open(Path(root) / LOCK_FILE, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
