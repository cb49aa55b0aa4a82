"""The device's policy applied where data leaves it: the ClientApp calls these, a benchmark can too.

    release_profile      the DP profile: budget spent in the ledger first, then the noise from the policy's
                         randomness (never the coordinator's rng-seed); its (ε, δ) in the metrics
    share_request        the share a request gets: refused when the policy does not share, else
                         min(requested, max-share-ratio), drawn with the policy's randomness
    report_allowed_metrics
                         a Flower mod: every reply's metrics cut down to the policy's report-metrics
"""

from __future__ import annotations

from dataclasses import replace

from flwr.app import Context, Message, MetricRecord

from participants.device import Device
from participants.profile import ProfileRelease, noised_profile
from protocols import messages as M
from protocols.settings import ParticipantSettings


def release_profile(device: Device) -> tuple[ProfileRelease, dict]:
    """The profile this device may release now, and the metrics that say what it cost."""
    policy = device.policy()
    history = device.history()  # a device that cannot read its data spends nothing
    spent = device.ledger().spend("profile", policy.profile_epsilon, policy.profile_delta, policy.epsilon_budget)
    release = noised_profile(history, rng=policy.rng("profile"), clip_norm=policy.profile_clip_norm,
                             epsilon=policy.profile_epsilon, delta=policy.profile_delta)
    return release, {"profile-epsilon": release.epsilon, "profile-delta": release.delta, "epsilon-spent": spent}


def share_request(device: Device, s: ParticipantSettings) -> tuple[ParticipantSettings, int]:
    """(the settings with the share ratio this device sends, the seed of the draw of which pieces)."""
    policy = device.policy()
    return replace(s, share_ratio=policy.share_ratio(s.share_ratio)), policy.random_seed("share")


def report_allowed_metrics(msg: Message, context: Context, call_next) -> Message:
    """A ClientApp mod: the reply's metrics record keeps only what the device's report-metrics allows."""
    reply = call_next(msg, context)
    if reply.has_error() or M.METRICS not in reply.content:
        return reply
    policy = Device.from_node_config(context.node_config).policy()
    reply.content[M.METRICS] = MetricRecord(policy.reported(dict(reply.content[M.METRICS].items())))
    return reply
