import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may come from a hub

import pytest

from protocols.records import PersonalRecord


@pytest.fixture(scope="session")
def tiny_seed():
    from participants.seed_loading import load_seed

    return load_seed("tiny-random")


def styled_records(user: str, style: str, n: int, start: int = 0) -> list[PersonalRecord]:
    """Records whose answers carry a recognisable style marker, for learning tests."""
    return [PersonalRecord(user, f"describe thing {i}", f"{style} thing {i} {style}") for i in range(start, start + n)]


@pytest.fixture
def make_records():
    return styled_records
