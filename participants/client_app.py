"""The Flower ClientApp: each message type of protocols.messages mapped to on-device work.

A dispatcher: the work lives in functions a benchmark calls just the same (participants.sharing for the sharer,
participants.newcomer for the newcomer). Nothing in a reply is personal data: a noised profile vector, the
pieces this participant chose to share, the ids of the pool pieces it wants, and metrics.
Every handler first checks the message against the device's limits (participants.limits): a request beyond them
raises, and Flower answers the coordinator with an error reply that names the limit. What leaves the device
follows its own privacy policy, never the message (participants.device_privacy): the profile's noise and the
share's draw come from randomness the coordinator cannot know, and replies carry only the metrics it allows.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from participants.adapters import branches
from participants.device import Device
from participants.device_privacy import release_profile, report_allowed_metrics, share_history, share_request
from participants.error_replies import plain_errors
from participants.evaluation import evaluate
from participants.newcomer import assemble_pieces, shortlist_pieces
from participants.precision import resolve_precision
from participants.seed_loading import LoadedSeed, load_seed, pick_device
from participants.sharing import train_and_share
from participants.trainer_choice import fit_trainer
from protocols import messages as M
from protocols.identity import key_id, public_bytes
from protocols.settings import ParticipantSettings, from_config

log = logging.getLogger("bouquet")
app = ClientApp(mods=[plain_errors,  # an error reply names the exception's type, never a path or a record
                      report_allowed_metrics])  # a reply's metrics: only those the device's policy allows


def _settings(msg: Message) -> ParticipantSettings:
    return from_config(ParticipantSettings, msg.content[M.CONFIG] if M.CONFIG in msg.content else {})


def _request(msg: Message, context: Context) -> tuple[ParticipantSettings, Device]:
    """The message's settings and this device, refused as a whole when they ask beyond the device's limits."""
    s = _settings(msg)
    device = Device.from_node_config(context.node_config)
    device.limits().check_settings(s)
    resolve_precision(s.precision, pick_device())  # bf16 asked of hardware without it: refused before any work
    device.policy()  # a broken policy.json stops every request, naming the file and the key
    return s, device


def _seed(msg: Message, s: ParticipantSettings, device: Device) -> LoadedSeed:
    """The run's base, or the catalog seed the coordinator names (by name and hash), from the device's catalog."""
    if M.SEED not in msg.content:
        return load_seed(s.seed_model, precision=s.precision)
    ref = msg.content[M.SEED]
    name, content_hash = str(ref["catalog-seed"]), str(ref["content-hash"])
    seed = load_seed(str(device.catalog_seed_folder(name)), precision=s.precision)
    if seed.descriptor.content_hash != content_hash:
        raise ValueError(f"catalog seed {name!r} on this device has weights {seed.descriptor.content_hash[:12]}…, "
                         f"the coordinator's has {content_hash[:12]}…: update the device's catalog")
    return seed


def _key_id(device: Device) -> str:
    return key_id(public_bytes(device.key().public_key()))


def _reply(msg: Message, **records) -> Message:
    return Message(RecordDict(records), reply_to=msg)


@app.query("style")
def style(msg: Message, context: Context) -> Message:
    """XPerT selection on the device: the own style in the catalog's words, and the nearest seed (or the base)."""
    from participants.style_direction import choose_from_catalog
    from protocols.catalog import catalog_from_json

    s, device = _request(msg, context)
    catalog = catalog_from_json(str(msg.content[M.CATALOG]["json"]))
    start = time.perf_counter()
    selection, own = choose_from_catalog(load_seed(catalog.base, precision=s.precision), device.history(), catalog,
                                         s.max_seed_distance or float("inf"))
    log.info("%s", selection.reason)
    return _reply(msg, **{
        M.SELECTION: ConfigRecord({"seed": selection.seed_id or "", "distance": float(selection.distance),
                                   "reason": selection.reason,
                                   "ranking": sorted(selection.distances, key=lambda k: (selection.distances[k], k))}),
        M.METRICS: MetricRecord({"selection-seconds": time.perf_counter() - start,
                                 "own-residual": float(own.residual), "catalog-seeds": len(catalog.entries)})})


@app.query("profile")
def profile(msg: Message, context: Context) -> Message:
    """A DP-noised mean embedding of the history (the device's policy sets its ε, δ and budget), its size, and
    the signing key id the coordinator orders nodes by."""
    _, device = _request(msg, context)
    release, spent = release_profile(device)
    return _reply(msg, **{M.PROFILE_RECORD: ConfigRecord({"count": release.count,
                                                          "embedding": [float(v) for v in release.embedding],
                                                          "key-id": _key_id(device)}),
                          M.METRICS: MetricRecord(spent)})


@app.train("share")
def share(msg: Message, context: Context) -> Message:
    """Train a private LoRA and its gates, cut into signed pieces, send back a share of them."""
    s, device = _request(msg, context)
    s, share_seed, dp = share_request(device, s)  # the policy's share ratio and randomness, or its refusal
    history = share_history(device, dp)
    seed = _seed(msg, s, device)
    s = fit_trainer(seed, s, device.limits().memory_mib)  # the trainer that fits the device's memory, or a refusal
    result = train_and_share(seed, history, s, device.key(), share_seed, dp=dp)
    arrays, meta = M.pieces_to_records(result.shared)
    metrics = MetricRecord({"num-examples": len(history), **result.metrics(), "share-ratio": s.share_ratio,
                            "upload-bytes": int(arrays.count_bytes())})
    return _reply(msg, **{M.PIECES: arrays, M.PIECE_META: meta, M.METRICS: metrics})


@app.query("gates")
def gates(msg: Message, context: Context) -> Message:
    """Phase 1 of assembly: score the pool's gates on the own history, ask for the best pieces."""
    s, device = _request(msg, context)
    device.limits().check_download("gate-bytes", int(msg.content[M.GATE_ARRAYS].count_bytes()))
    entries = M.gates_from_records(msg.content[M.GATE_ARRAYS], msg.content[M.GATE_META])
    start = time.perf_counter()
    ids = shortlist_pieces(_seed(msg, s, device), device.history(), entries, s)
    return _reply(msg, **{M.SHORTLIST: ConfigRecord({"ids": ids}),
                          M.METRICS: MetricRecord({"shortlist-seconds": time.perf_counter() - start,
                                                   "gates-received": len(entries)})})


@app.train("assemble")
def assemble_adapter(msg: Message, context: Context) -> Message:
    """Phase 2: assemble from the shortlisted pieces, keep the adapter, report held-out metrics."""
    s, device = _request(msg, context)
    device.limits().check_download("piece-bytes", int(msg.content[M.PIECES].count_bytes()))
    seed = _seed(msg, s, device)
    pieces = M.pieces_from_records(msg.content[M.PIECES], msg.content[M.PIECE_META])
    history, test = device.history(), device.test()
    result = assemble_pieces(seed, history, pieces, s, device.adapter_dir)
    metrics = {"history-size": len(history), "test-size": len(test), "assembly-seconds": result.seconds,
               "assembly-tokens": result.tokens, "pieces-received": len(pieces),
               "download-bytes": int(msg.content[M.PIECES].count_bytes())}
    if test:
        base = evaluate(seed, test, None, max_new_tokens=s.max_new_tokens, with_generation=s.generate,
                        max_len=s.max_len)
        mine = evaluate(seed, test, branches(result.weights, 1.0, seed.device), max_new_tokens=s.max_new_tokens,
                        with_generation=s.generate, max_len=s.max_len)
        metrics |= {f"seed-{k}": v for k, v in base.items()} | {f"assembled-{k}": v for k, v in mine.items()}
    return _reply(msg, **{M.METRICS: MetricRecord(metrics)})
