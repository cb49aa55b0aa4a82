"""The device's policy applied where data leaves it: the ClientApp calls these, a benchmark can too.

    release_profile      the DP profile: budget spent in the ledger first, then the noise from the policy's
                         randomness (never the coordinator's rng-seed); its (ε, δ) in the metrics
    share_request        the share a request gets: refused when the policy does not share, the device holds too few
                         of its own records, or it shared too recently,
                         else min(requested, max-share-ratio), drawn with the policy's randomness, and the
                         DP-SGD it is trained with (its ε spent in the ledger first)
    share_history        what a share trains on: under DP-SGD the owner's records without the pairs written from them
    report_allowed_metrics
                         a Flower mod: every reply's metrics cut down to the policy's report-metrics
"""

from __future__ import annotations

from dataclasses import replace

from flwr.app import Context, Message, MetricRecord

from participants.device import Device
from participants.dp_sgd import DpSgd
from participants.profile import ProfileRelease, noised_profile
from protocols import messages as M
from protocols.records import PersonalRecord
from protocols.settings import ParticipantSettings


def release_profile(device: Device) -> tuple[ProfileRelease, dict]:
    """The profile this device may release now, and the metrics that say what it cost."""
    policy = device.policy()
    # its own records only: a written pair repeats a record, which (ε, δ) per record does not cover; a device
    # that cannot read its data spends nothing
    history = device.history(with_synthetic=False)
    spent = device.ledger().spend("profile", policy.profile_epsilon, policy.profile_delta, policy.epsilon_budget)
    release = noised_profile(history, rng=policy.rng("profile"), clip_norm=policy.profile_clip_norm,
                             epsilon=policy.profile_epsilon, delta=policy.profile_delta)
    return release, {"profile-epsilon": release.epsilon, "profile-delta": release.delta, "epsilon-spent": spent}


def share_request(device: Device, s: ParticipantSettings) -> tuple[ParticipantSettings, int, DpSgd | None]:
    """(the settings with the share ratio this device sends, the seed of the draw of which pieces and of DP-SGD's
    noise, the DP-SGD to train with or None). A refused request spends nothing; an accepted one is written in the
    ledger (its time, and its ε when DP) before any work, so a crash never forgets it."""
    policy = device.policy()
    ratio = policy.share_ratio(s.share_ratio)
    policy.check_share_records(len(device.history(with_synthetic=False)))
    dp = policy.dp_sgd()
    ledger = device.ledger()
    if dp is not None:
        ledger.spend("pieces", dp.epsilon, dp.delta, policy.epsilon_budget)
    ledger.record_share(policy.min_hours_between_shares)
    return replace(s, share_ratio=ratio), policy.random_seed("share"), dp


def share_history(device: Device, dp: DpSgd | None) -> list[PersonalRecord]:
    """What a share trains on. Under DP-SGD the owner's own records only: the pairs the device's model wrote from a
    record would let that record count more than once, and the ε is per record."""
    return device.history(with_synthetic=dp is None)


def report_allowed_metrics(msg: Message, context: Context, call_next) -> Message:
    """A ClientApp mod: the reply's metrics record keeps only what the device's report-metrics allows."""
    reply = call_next(msg, context)
    if reply.has_error() or M.METRICS not in reply.content:
        return reply
    policy = Device.from_node_config(context.node_config).policy()
    reply.content[M.METRICS] = MetricRecord(policy.reported(dict(reply.content[M.METRICS].items())))
    return reply
