"""A virtual participant's data, whatever data set it comes from: a private history and a held-out test."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from protocols.records import PersonalRecord


def folder_name(user: str) -> str:
    """The user's name as one safe path component: names from a data file may hold separators ("hamlet/Ham") or
    start with dots, which would nest or escape a run folder. A name that is already safe is kept as it is; an
    altered one gets a short hash of the original, so two names never meet in one folder."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", user).lstrip(".")
    if user and safe == user:
        return user
    return f"{safe or 'user'}-{hashlib.sha256(user.encode()).hexdigest()[:8]}"


@dataclass
class UserData:
    user: str
    history: list[PersonalRecord]
    test: list[PersonalRecord]
