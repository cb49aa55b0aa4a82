"""Reading a participant's reply as untrusted input: each record fetched by key and type, each value checked.

A reply can come from a device that is broken or hostile, so nothing in it is indexed blindly: a missing
record, a record of the wrong type, a non-finite number, an overlong text or list raises `BadReply`, which
names the check that failed. The ServerApp's per-reply guard turns it into one line of the round's report, and
the round goes on for everyone else.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

MAX_TEXT = 4096  # characters of one text value (a user name, a reason)
MAX_METRICS = 256  # entries of one metrics record


class BadReply(ValueError):
    """A reply that fails a check; `.check` names it, `.reason` says what was wrong."""

    def __init__(self, check: str, reason: str):
        self.check = check
        self.reason = reason
        super().__init__(f"check {check!r}: {reason}")


def record(rep: Message, key: str, kind: type[ConfigRecord] | type[ArrayRecord] | type[MetricRecord]):
    """The record under `key`, which must be of type `kind`."""
    content = rep.content
    if key not in content:
        raise BadReply("record", f"the reply has no {key!r} record (it has {sorted(content)[:8]})")
    found = content[key]
    if not isinstance(found, kind):
        raise BadReply("record", f"{key!r} is a {type(found).__name__}, expected a {kind.__name__}")
    return found


def text(rec: ConfigRecord, key: str, limit: int = MAX_TEXT, *, required: bool = True) -> str:
    if key not in rec:
        if required:
            raise BadReply("record", f"{key!r} is missing")
        return ""
    value = rec[key]
    if not isinstance(value, str):
        raise BadReply("record", f"{key!r} is a {type(value).__name__}, expected text")
    if len(value) > limit:
        raise BadReply("bounds", f"{key!r} is {len(value)} characters, above {limit}")
    return value


def number(rec: ConfigRecord, key: str, *, whole: bool = False, low: float = -math.inf,
           high: float = math.inf, infinite: bool = False) -> float:
    """A number within [low, high]; never NaN, and infinite only when `infinite` says it may be."""
    value = rec[key] if key in rec else None
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise BadReply("record", f"{key!r} is {type(value).__name__}, expected {'an integer' if whole else 'a number'}")
    if not ((infinite or math.isfinite(value)) and low <= value <= high):
        raise BadReply("bounds", f"{key!r} = {value!r} is outside [{low:g}, {high:g}]")
    return value


def strings(rec: ConfigRecord, key: str, limit: int, *, item_limit: int = 256) -> list[str]:
    """A list of at most `limit` texts (a single text is not a list)."""
    value = rec[key] if key in rec else None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadReply("record", f"{key!r} is {type(value).__name__}, expected a list of texts")
    if len(value) > limit:
        raise BadReply("bounds", f"{key!r} holds {len(value)} items, above {limit}")
    if any(len(v) > item_limit for v in value):
        raise BadReply("bounds", f"{key!r} holds an item longer than {item_limit} characters")
    return list(value)


def vector(rec: ConfigRecord, key: str, length: int) -> np.ndarray:
    """A finite float vector of exactly `length` entries."""
    value = rec[key] if key in rec else None
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise BadReply("record", f"{key!r} is {type(value).__name__}, expected a list of numbers")
    if len(value) != length:
        raise BadReply("profile", f"{key!r} has {len(value)} entries, expected {length}")
    arr = np.asarray(value, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise BadReply("profile", f"{key!r} holds {int((~np.isfinite(arr)).sum())} NaN/inf values")
    return arr.astype(np.float32)


def metrics(rep: Message, key: str) -> dict:
    """A metrics record as a dict of numbers; non-finite numbers become None so that metrics.json stays JSON."""
    rec = record(rep, key, MetricRecord)
    if len(rec) > MAX_METRICS:
        raise BadReply("bounds", f"{key!r} holds {len(rec)} entries, above {MAX_METRICS}")
    out = {}
    for name, value in rec.items():
        if len(name) > 128:
            raise BadReply("bounds", f"a metric name is {len(name)} characters long")
        if isinstance(value, list):
            raise BadReply("record", f"metric {name!r} is a list; metrics are single numbers")
        out[name] = value if math.isfinite(value) else None
    return out
