"""What `bouquet device add`, `device annotate` and `device buffer` do to a device folder's stream buffer
(participants.stream_buffer): each is one locked read-change-write, acknowledged only once the new buffer is on
disk.

    add_records      score the records of a file in order and offer each to the buffer. The file is checked as a
                     whole first: a malformed record is refused with its line and reason, and nothing of the file
                     enters. Re-adding a file whose addition was already acknowledged changes nothing.
    annotation_ask   this round's items to annotate (inputs only, up to the budget)
    annotate         the owner's answers to them, then the pairs the model writes for each
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, fields
from pathlib import Path

from participants.lora_training import LoraSettings
from participants.privacy_policy import POLICY_FILE, PrivacyPolicy
from participants.seed_loading import LoadedSeed, load_seed
from participants.selection_scores import item_features
from participants.stream_buffer import RECENT_BATCHES, StreamBuffer, load_buffer, locked, save_buffer
from participants.stream_settings import BufferSettings, SynthesisSettings
from participants.synthesis import synthesize, writer_adapter
from protocols.records import PersonalRecord, load_records
from protocols.settings import key


@dataclass(frozen=True)
class AddReport:
    added: int  # records in the file
    kept: int  # of them, how many the buffer holds now
    size: int
    capacity: int
    awaiting: int  # unannotated items in the buffer
    seen: int  # items the device has seen in all
    repeated: bool = False  # the file had been added before: nothing changed


def _device_folder(root: str | Path) -> Path:
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a device folder; create it with `bouquet device init {root}`")
    return root


def _stamp(by: str, round_no: int) -> dict:
    return {"by": by, "round": round_no, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _settled(buffer: StreamBuffer, given: dict) -> None:
    """Settings given to a device that already has a buffer must be the ones it keeps items by."""
    kept = buffer.settings.to_json() | buffer.synthesis.to_json()
    differ = sorted(n for n, v in given.items() if kept.get(n) != v)
    if differ:
        said = "; ".join(f"{key(n)} {kept.get(n)!r} there, {given[n]!r} given" for n in differ)
        raise ValueError(f"this device's buffer keeps items by other settings ({said}); leave those flags out to "
                         f"use the buffer's, or start a new buffer")


def _pick(cls, given: dict):
    return cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})


def _seed_for(buffer: StreamBuffer, loader=load_seed) -> LoadedSeed:
    seed = loader(buffer.seed_id)
    if seed.descriptor.content_hash != buffer.seed_hash:
        raise ValueError(f"the buffer was scored with {buffer.seed_id} of weights {buffer.seed_hash[:12]}…, this "
                         f"device now has {seed.descriptor.content_hash[:12]}…: scores from other weights are not "
                         f"comparable; start a new buffer for the new seed")
    return seed


def add_records(root: str | Path, data: str | Path, *, seed_model: str | None = None, given: dict | None = None,
                by: str = "owner", loader=load_seed) -> AddReport:
    """Offer the file's records, in order, to the device's buffer. The first addition creates it, with `given`
    (values of BufferSettings and SynthesisSettings fields by name; the rest default) and `seed_model`; later
    ones must not give other values. A record that carries an output counts as annotated by `by` if kept. The
    buffer's random seed comes from the OS, or from the device policy's pinned-seed (experiments only)."""
    given = given or {}
    unknown = sorted(set(given) - {f.name for f in fields(BufferSettings)} - {f.name for f in fields(SynthesisSettings)})
    if unknown:
        raise ValueError(f"unknown buffer settings {unknown}")
    fresh = _pick(BufferSettings, given), _pick(SynthesisSettings, given)  # out-of-range values refused now
    root = _device_folder(root)
    records = load_records(data, require_output=False)  # the whole file, or a DataFormatError naming the line
    digest = hashlib.sha256(Path(data).read_bytes()).hexdigest()
    with locked(root):
        buffer = load_buffer(root)
        if buffer is None:
            seed = loader(seed_model) if seed_model else loader()
            buffer = StreamBuffer.new(*fresh, seed.descriptor.seed_id, seed.descriptor.content_hash,
                                      PrivacyPolicy.load(root / POLICY_FILE).random_seed("buffer"))
        else:
            _settled(buffer, given)
            if seed_model and seed_model != buffer.seed_id:
                raise ValueError(f"this device's buffer is scored with {buffer.seed_id!r}, not {seed_model!r}")
            if digest in buffer.batches:
                return _report(buffer, len(records), 0, repeated=True)
            seed = _seed_for(buffer, loader)
        for n, rec in enumerate(records, start=1):
            if buffer.find(rec.user, rec.id, rec.input) is not None and rec.id is not None:
                raise ValueError(f"{data}: record {n} (user {rec.user!r}, id {rec.id!r}) is already in the buffer; "
                                 f"give it a new id or leave it out. Nothing was added")
        features = item_features(seed, [r.input for r in records], buffer.settings.score_len)
        for rec, f in zip(records, features):
            buffer.offer(rec, f, _stamp(by, buffer.rounds))
        kept = sum(1 for rec in records if buffer.find(rec.user, rec.id, rec.input) is not None)
        buffer.batches = (buffer.batches + [digest])[-RECENT_BATCHES:]
        save_buffer(root, buffer)
        return _report(buffer, len(records), kept)


def _report(buffer: StreamBuffer, added: int, kept: int, repeated: bool = False) -> AddReport:
    return AddReport(added, kept, len(buffer.items), buffer.settings.capacity,
                     sum(1 for it in buffer.items if not it.annotated), buffer.seen, repeated)


def annotation_ask(root: str | Path) -> list[PersonalRecord]:
    """The items this round asks the owner to annotate, as records with an empty output to fill in."""
    buffer = load_buffer(_device_folder(root))
    if buffer is None:
        raise FileNotFoundError(f"{root} has no buffer yet; add records with `bouquet device add {root} --data FILE`")
    return [PersonalRecord(it.record.user, it.record.input, "", it.record.id, it.record.time)
            for it in buffer.requests()]


def annotate(root: str | Path, answers: str | Path, *, by: str, loader=load_seed) -> list[dict]:
    """Record the owner's answers (a JSONL file of the asked records with their outputs filled in; one left blank
    is skipped) as one round, write pairs like each, and keep the result; returns per answered item its id and
    the pairs written and kept."""
    root = _device_folder(root)
    records = [r for r in load_records(answers, require_output=False) if r.output.strip()]  # blank: skipped
    if not records:
        raise ValueError(f"{answers}: no item has its 'output' filled in; nothing to record")
    with locked(root):
        buffer = load_buffer(root)
        if buffer is None:
            raise FileNotFoundError(f"{root} has no buffer yet; add records with `bouquet device add`")
        seed = _seed_for(buffer, loader) if buffer.synthesis.pairs else None
        done = buffer.annotate(records, by, (lambda recs: _write_pairs(seed, buffer, recs)) if seed else None)
        save_buffer(root, buffer)
    return [{"id": it.record.id, "written": it.written, "kept": len(it.synthetic)} for it in done]


def _write_pairs(seed: LoadedSeed, buffer: StreamBuffer, records: list[PersonalRecord]):
    """The pairs of this round's answers, written by the seed or (synthesis-writer adapter) by the seed with a LoRA
    trained on every item annotated so far, this round's included, at the device's default LoRA settings."""
    writer = None
    if buffer.synthesis.synthesis_writer == "adapter":
        writer = writer_adapter(seed, [it.record for it in buffer.annotated()], LoraSettings())
    return synthesize(seed, records, buffer.synthesis, writer=writer)


def buffer_status(root: str | Path) -> dict:
    """What the buffer holds, for `bouquet device buffer`: sizes, rounds, annotations by whom, memory."""
    buffer = load_buffer(_device_folder(root))
    if buffer is None:
        raise FileNotFoundError(f"{root} has no buffer yet; add records with `bouquet device add {root} --data FILE`")
    by: dict[str, int] = {}
    for it in buffer.annotated():
        by[it.annotation["by"]] = by.get(it.annotation["by"], 0) + 1
    return {"capacity": buffer.settings.capacity, "rule": buffer.settings.rule, "size": len(buffer.items),
            "seen": buffer.seen, "annotated": len(buffer.annotated()), "annotated-by": by, "rounds": buffer.rounds,
            "synthetic-pairs": sum(len(it.synthetic) for it in buffer.items),
            "training-records": len(buffer.training_records()), "seed": buffer.seed_id,
            "memory-bytes": buffer.memory_bytes()["total"]}
