"""The stream bench, user by user: replay each user's stream in time order through a buffer per rule and size,
annotate what the buffer asks for by revealing those outputs only, write pairs like the annotated items, train the
private adapter on what each buffer yields, and evaluate on the items that come after the stream.

Every rule sees the same items scored by the same forward passes: an item's hidden-state features do not depend on
the buffer, so they are computed once per user (participants.selection_scores.item_features) and offered to every
buffer, exactly as `bouquet device add` offers them. Pairs are written once per annotated item and shared by every
buffer that annotated it. Training on the same records for the same steps gives the same adapter, so identical
training sets are trained once. The whole-stream reference makes full-epochs passes over the stream; a buffer's
adapter trains as many steps (buffer-training reference-steps: the same compute, the data the only difference) or
lora-steps. Rows go to results.jsonl a user at a time; a rerun with the same settings resumes. Each user's
buffers get their own random seed, derived from (rng-seed, user), as each device draws its own: users whose streams
hold the same items (styleqa's styles 1-8 share their questions) are sampled independently, and a rerun repeats.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from participants.adapters import branches
from participants.chat_data import prompt_ids
from participants.evaluation import evaluate
from participants.lora_training import LoraSettings, train_private_lora
from participants.progress import log
from participants.seed_loading import LoadedSeed, load_seed
from participants.selection_scores import item_features
from participants.stream_buffer import StreamBuffer
from participants.synthesis import synthesize, training_mix
from protocols.records import PersonalRecord
from simulation.bench.run import hardware
from simulation.stream_bench.report import write_report
from simulation.stream_bench.settings import StreamBenchSettings
from simulation.stream_bench.users import stream_users
from simulation.user_data import UserData


def check_run_dir(out: Path, s: StreamBenchSettings) -> None:
    path, mine = out / "settings.json", s.to_json()
    if path.exists():
        theirs = json.loads(path.read_text())
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if differ:
            raise ValueError(f"{out} holds a stream-bench run with other settings ({', '.join(differ)}); rerun with "
                             f"the same settings to resume it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=1))


def user_random_seed(rng_seed: int, user: str) -> int:
    """The 128-bit random seed of a user's buffers, from the run's rng-seed and the user's name."""
    return int.from_bytes(hashlib.sha256(f"stream-buffer:{rng_seed}:{user}".encode()).digest()[:16], "big")


def _key(records: list[PersonalRecord]) -> str:
    return hashlib.sha256("\x00".join(r.to_json() for r in records).encode()).hexdigest()


@torch.no_grad()
def scoring_cost(seed: LoadedSeed, user: UserData, s: StreamBenchSettings, feats) -> dict:
    """Milliseconds to score one arriving item (its forward pass through the backbone, then the sdss buffer's
    decision) against one full forward pass of the same prompt, one item at a time, on `timing_items` items."""
    items = user.history[: s.timing_items]
    buffer = StreamBuffer.new(s.buffer(max(s.buffer_sizes), "sdss"), s.synthesis_settings(), "", "",
                              user_random_seed(s.rng_seed, user.user))
    for rec, f in zip(user.history, feats):  # a buffer as full as it gets
        buffer.offer(replace(rec, output=""), f)
    item_features(seed, [items[0].input], s.score_len)  # warm-up
    score = offer = forward = 0.0
    for rec in items:
        start = time.perf_counter()
        (f,) = item_features(seed, [rec.input], s.score_len)
        mid = time.perf_counter()
        buffer.offer(replace(rec, output="", id=f"timing-{rec.id}"), f)
        end = time.perf_counter()
        ids = torch.tensor([prompt_ids(seed.tokenizer, rec.input)[-s.score_len:]], device=seed.device)
        seed.model(input_ids=ids)
        forward += time.perf_counter() - end
        score, offer = score + end - start, offer + end - mid
    n = len(items)
    return {"kind": "cost", "user": user.user, "score_ms": 1000 * score / n, "offer_ms": 1000 * offer / n,
            "forward_ms": 1000 * forward / n, "ratio": score / forward}


def replay(user: UserData, feats, s: StreamBenchSettings, capacity: int, rule: str, seed_id: str) -> StreamBuffer:
    """The user's stream through one buffer, outputs hidden; each round the buffer's requests are answered with
    the true outputs (and nothing else is revealed)."""
    buffer = StreamBuffer.new(s.buffer(capacity, rule), s.synthesis_settings(), seed_id, "",
                              user_random_seed(s.rng_seed, user.user))
    truth = {r.id: r.output for r in user.history}
    n = len(user.history)
    ends = {round(n * k / s.rounds) for k in range(1, s.rounds + 1)}
    for i, (rec, f) in enumerate(zip(user.history, feats), start=1):
        buffer.offer(replace(rec, output=""), f)
        if i in ends:
            asked = buffer.requests()
            buffer.annotate([replace(it.record, output=truth[it.record.id]) for it in asked], "simulation")
    return buffer


def bench_user(seed: LoadedSeed, user: UserData, s: StreamBenchSettings) -> list[dict]:
    if len({r.id for r in user.history}) != len(user.history):
        raise ValueError(f"{user.user}: stream items need distinct ids")
    start = time.perf_counter()
    feats = item_features(seed, [r.input for r in user.history], s.score_len)
    rows = [scoring_cost(seed, user, s, feats) | {"stream_seconds": time.perf_counter() - start}]
    log.info("%s: %d stream items scored in %.0f s", user.user, len(feats), time.perf_counter() - start)
    buffers = {(b, rule): replay(user, feats, s, b, rule, seed.descriptor.seed_id)
               for b in s.buffer_sizes for rule in s.rules}
    for (b, rule), buf in buffers.items():
        rows.append({"kind": "buffer", "user": user.user, "buffer": b, "rule": rule,
                     "annotated": len(buf.annotated()), "memory_bytes": buf.memory_bytes()["total"],
                     "file_bytes": len(buf.to_bytes()),
                     "annotated_positions": sorted(it.seq for it in buf.annotated())})
    lora = LoraSettings(rank=s.lora_rank, alpha=s.lora_alpha, steps=s.lora_steps, lr=s.lora_lr, dropout=s.lora_dropout,
                        batch_size=s.batch_size, max_len=s.max_len, seed=s.rng_seed)
    results: dict[str, dict] = {}  # an adapter's evaluation, by its steps and training records
    adapters: dict[str, dict | None] = {}  # ... and the adapter itself, to write pairs with
    seed_written: dict[str, list[PersonalRecord]] = {}  # an annotated item's pairs, when the seed writes them

    def trained(records: list[PersonalRecord] | None, steps: int, method: str) -> str:
        k = "seed" if records is None else f"{steps}:{_key(records)}"
        if k not in results:
            adapter, seconds = None, 0.0
            if records is not None:
                weights, report = train_private_lora(seed, records, replace(lora, steps=steps),
                                                     desc=f"{user.user}: {method}")
                adapter, seconds = branches(weights, s.lora_alpha / s.lora_rank, seed.device), report.seconds
            results[k] = evaluate(seed, user.test, adapter, max_new_tokens=s.max_new_tokens, with_generation=True,
                                  max_len=s.max_len) | {"train_seconds": seconds}
            adapters[k] = adapter
        return k

    plans: list[tuple[dict, list[PersonalRecord] | None]] = [({"method": "seed"}, None),
                                                             ({"method": "full"}, list(user.history))]
    for (b, rule), buf in buffers.items():
        annotated = [it.record for it in buf.annotated()]
        if s.synthesis in ("both", "off"):
            plans.append(({"method": rule, "rule": rule, "synthesis": False, "buffer": b}, annotated))
        if s.synthesis in ("both", "on"):
            extra = _written_pairs(seed, user, s, b, rule, annotated, buffers, rows, trained, adapters,
                                   seed_written)
            plans.append(({"method": f"{rule}+syn", "rule": rule, "synthesis": True, "buffer": b, "pairs": len(extra)},
                          training_mix(annotated, extra, s.repeat_annotated)))
    for plan, records in plans:
        steps = s.reference_steps() if plan["method"] == "full" else s.buffer_steps()
        k = trained(records, steps, plan["method"])
        plan["steps"] = 0 if records is None else steps
        rows.append({"kind": "method", "user": user.user, "buffer": None, "rule": None, "synthesis": False,
                     "train_records": 0 if records is None else len(records)} | plan | results[k])
    return rows


def _written_pairs(seed: LoadedSeed, user: UserData, s: StreamBenchSettings, b: int, rule: str,
                   annotated: list[PersonalRecord], buffers: dict, rows: list[dict], trained, adapters: dict,
                   seed_written: dict) -> list[PersonalRecord]:
    """The kept pairs for one buffer's annotated items. The seed writes once for the annotated items of every
    buffer (an item's pairs do not depend on the buffer); an adapter writer is each buffer's own adapter trained on
    its annotated items alone (the rule's row without synthesis: the same training, trained once)."""
    ss = s.synthesis_settings()
    if s.synthesis_writer == "adapter":
        writer = adapters[trained(annotated, s.buffer_steps(), f"{rule} (the synthesis writer)")]
        made = synthesize(seed, annotated, ss, batch_items=8, writer=writer)
        rows.append({"kind": "synthesis", "user": user.user, "buffer": b, "rule": rule, "items": len(annotated),
                     "written": sum(m.written for m in made), "kept": sum(len(m.kept) for m in made)})
        return [PersonalRecord(r.user, p.input, p.output) for r, m in zip(annotated, made) for p in m.kept]
    if not seed_written:
        todo = {it.record.id: it.record for buf in buffers.values() for it in buf.annotated()}
        recs = [todo[k] for k in sorted(todo)]
        made = synthesize(seed, recs, ss, batch_items=8)
        for rec, syn in zip(recs, made):
            seed_written[rec.id] = [PersonalRecord(rec.user, p.input, p.output) for p in syn.kept]
        log.info("%s: %d pairs written for %d annotated items, %d kept", user.user, sum(m.written for m in made),
                 len(recs), sum(len(m.kept) for m in made))
        rows.append({"kind": "synthesis", "user": user.user, "items": len(recs),
                     "written": sum(m.written for m in made), "kept": sum(len(m.kept) for m in made)})
    return [p for r in annotated for p in seed_written.get(r.id, [])]


def run_stream_bench(s: StreamBenchSettings, out: str | Path) -> dict:
    out = Path(out)
    check_run_dir(out, s)
    seed = load_seed(s.seed_model)
    users = stream_users(s.data, s.stream, s.test, s.users)
    path = out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    done = {r["user"] for r in rows}
    for n, user in enumerate(users, start=1):
        if user.user in done:
            continue
        start = time.perf_counter()
        mine = bench_user(seed, user, s)
        with path.open("a") as fh:  # a user's rows at once: a killed run redoes that user only
            fh.write("".join(json.dumps(r) + "\n" for r in mine))
        rows += mine
        log.info("stream-bench: user %d/%d (%s) in %.0f s", n, len(users), user.user, time.perf_counter() - start)
    return write_report(out, s, seed.descriptor.seed_id, hardware(seed), rows, [u.user for u in users])
