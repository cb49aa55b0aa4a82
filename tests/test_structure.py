"""The package rule, and the run settings' checks."""

import ast
from pathlib import Path

import pytest

from coordinator.config import RunSettings

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_participants_and_coordinator_never_import_each_other():
    assert "coordinator" not in imported_packages("participants")
    assert "participants" not in imported_packages("coordinator")
    assert not {"participants", "coordinator", "simulation"} & imported_packages("protocols")


def test_run_config_keys_match_the_settings():
    import tomllib

    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert RunSettings.from_run_config(defaults) == RunSettings()


@pytest.mark.parametrize("change, message", [
    ({"share_ratio": 1.5}, "share-ratio"), ({"top_k": 0}, "top-k"), ({"temperature": 0.0}, "temperature"),
    ({"shortlist": 1, "top_k": 3}, "shortlist"),
])
def test_bad_settings_are_refused_with_the_reason(change, message):
    with pytest.raises(ValueError, match=message):
        RunSettings(**change)


def test_unknown_run_config_keys_are_named():
    with pytest.raises(ValueError, match="num-sharer"):
        RunSettings.from_run_config({"num-sharer": 3})
