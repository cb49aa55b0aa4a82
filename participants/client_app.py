"""The Flower ClientApp: each message type of protocols.messages mapped to on-device work.

Nothing in a reply is personal data: a noised profile vector, the pieces this participant chose
to share, the ids of the pool pieces it wants, and metrics.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from participants.adapters import branches, save_peft_adapter
from participants.assembly import assemble, shortlist
from participants.cutting import choose_share, cut_into_pieces
from participants.device import Device
from participants.evaluation import evaluate
from participants.gate_training import train_gates
from participants.lora_training import train_private_lora
from participants.seed_loading import load_seed
from participants.settings import assembly_settings, lora_settings
from protocols import messages as M
from protocols.seeds import DEFAULT_SEED

log = logging.getLogger("bouquet")
app = ClientApp()


def _config(msg: Message) -> ConfigRecord:
    return msg.content[M.CONFIG] if M.CONFIG in msg.content else ConfigRecord()


def _seed(cfg: ConfigRecord):
    return load_seed(str(cfg.get("seed", DEFAULT_SEED)))


def _reply(msg: Message, **records) -> Message:
    return Message(RecordDict(records), reply_to=msg)


@app.query("style")
def style(msg: Message, context: Context) -> Message:
    """XPerT selection on the device: the own style in the catalog's words, and the nearest seed (or the base)."""
    from participants.style_direction import choose_from_catalog
    from protocols.catalog import catalog_from_json

    cfg = _config(msg)
    device = Device.from_node_config(context.node_config)
    catalog = catalog_from_json(str(msg.content[M.CATALOG]["json"]))
    start = time.perf_counter()
    max_distance = float(cfg.get("max-seed-distance", 0.0)) or float("inf")
    selection, own = choose_from_catalog(load_seed(catalog.base), device.history(), catalog, max_distance)
    log.info("%s", selection.reason)
    return _reply(msg, **{
        M.SELECTION: ConfigRecord({"seed": selection.seed_id or "", "distance": float(selection.distance),
                                   "reason": selection.reason, "user": device.history()[0].user,
                                   "ranking": sorted(selection.distances, key=lambda k: (selection.distances[k], k))}),
        M.METRICS: MetricRecord({"selection-seconds": time.perf_counter() - start,
                                 "own-residual": float(own.residual), "catalog-seeds": len(catalog.entries)})})


@app.query("profile")
def profile(msg: Message, context: Context) -> Message:
    """A noised mean embedding of the history and its size, for the coordinator's sharer choice."""
    from participants.profile import noised_profile

    cfg = _config(msg)
    device = Device.from_node_config(context.node_config)
    rng = np.random.default_rng(int(cfg.get("seed-number", 0)) + int(context.node_id % 2**31))
    count, vec = noised_profile(device.history(), noise_std=float(cfg.get("profile-noise", 0.02)), rng=rng)
    return _reply(msg, **{M.PROFILE_RECORD: ConfigRecord({"count": count, "embedding": [float(v) for v in vec]})})


@app.train("share")
def share(msg: Message, context: Context) -> Message:
    """Train a private LoRA and its gates, cut into signed pieces, send back a share of them."""
    cfg = _config(msg)
    device = Device.from_node_config(context.node_config)
    history = device.history()
    seed = _seed(cfg)
    settings = lora_settings(cfg)
    user = history[0].user
    weights, lora_report = train_private_lora(seed, history, settings, desc=f"{user}: private LoRA")
    gates, gate_report = train_gates(seed, history, weights, settings, steps=int(cfg.get("gate-steps", 30)),
                                     lr=float(cfg.get("gate-lr", 5e-3)), desc=f"{user}: gates")
    pieces = cut_into_pieces(seed.descriptor, weights, gates, settings.rank, settings.alpha, device.key())
    shared = choose_share(pieces, float(cfg.get("share-ratio", 1.0)), seed=settings.seed + context.node_id % 2**31)
    arrays, meta = M.pieces_to_records(shared)
    metrics = MetricRecord({
        "num-examples": len(history), "pieces-cut": len(pieces), "pieces-shared": len(shared),
        "lora-seconds": lora_report.seconds, "lora-steps": len(lora_report.losses),
        "lora-tokens": lora_report.tokens, "lora-loss-first": lora_report.losses[0],
        "lora-loss-last": lora_report.losses[-1], "gate-seconds": gate_report.seconds,
        "gate-tokens": gate_report.tokens, "upload-bytes": int(arrays.count_bytes()),
    })
    return _reply(msg, **{M.PIECES: arrays, M.PIECE_META: meta, M.METRICS: metrics,
                          M.INFO: ConfigRecord({"user": user})})


@app.query("gates")
def gates(msg: Message, context: Context) -> Message:
    """Phase 1 of assembly: score the pool's gates on the own history, ask for the best pieces."""
    cfg = _config(msg)
    device = Device.from_node_config(context.node_config)
    seed = _seed(cfg)
    entries = M.gates_from_records(msg.content[M.GATE_ARRAYS], msg.content[M.GATE_META])
    start = time.perf_counter()
    ids = shortlist(seed, device.history(), entries, assembly_settings(cfg)) if entries else []
    return _reply(msg, **{M.SHORTLIST: ConfigRecord({"ids": ids}),
                          M.METRICS: MetricRecord({"shortlist-seconds": time.perf_counter() - start,
                                                   "gates-received": len(entries)})})


@app.train("assemble")
def assemble_adapter(msg: Message, context: Context) -> Message:
    """Phase 2: assemble from the shortlisted pieces, keep the adapter, report held-out metrics."""
    cfg = _config(msg)
    device = Device.from_node_config(context.node_config)
    seed = _seed(cfg)
    pieces = M.pieces_from_records(msg.content[M.PIECES], msg.content[M.PIECE_META])
    bad = [p.position for p in pieces if not p.signature_ok() or p.seed_hash != seed.descriptor.content_hash]
    if bad:
        raise ValueError(f"refusing {len(bad)} pieces whose signature or seed hash does not check out: {bad[:3]}")
    history, test = device.history(), device.test()
    settings = assembly_settings(cfg)
    result = assemble(seed, history, pieces, settings)
    save_peft_adapter(device.adapter_dir, result.weights, result.rank, result.alpha, seed.descriptor.seed_id,
                      extra={"user": history[0].user, "seed": seed.descriptor.seed_id,
                             "seed_hash": seed.descriptor.content_hash, "choices": result.choices})
    metrics = {"history-size": len(history), "test-size": len(test), "assembly-seconds": result.seconds,
               "assembly-tokens": result.tokens, "pieces-received": len(pieces),
               "download-bytes": int(msg.content[M.PIECES].count_bytes())}
    if test:
        max_new = int(cfg.get("max-new-tokens", 48))
        gen = bool(cfg.get("generate", True))
        base = evaluate(seed, test, None, max_new_tokens=max_new, with_generation=gen, max_len=settings.max_len)
        mine = evaluate(seed, test, branches(result.weights, 1.0, seed.device), max_new_tokens=max_new,
                        with_generation=gen, max_len=settings.max_len)
        metrics |= {f"seed-{k}": v for k, v in base.items()} | {f"assembled-{k}": v for k, v in mine.items()}
    return _reply(msg, **{M.METRICS: MetricRecord(metrics), M.INFO: ConfigRecord({"user": history[0].user})})
