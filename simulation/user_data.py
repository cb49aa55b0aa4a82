"""A virtual participant's data, whatever data set it comes from: a private history and a held-out test."""

from __future__ import annotations

from dataclasses import dataclass

from protocols.records import PersonalRecord


@dataclass
class UserData:
    user: str
    history: list[PersonalRecord]
    test: list[PersonalRecord]
