"""The package rule, and the settings schema: one declaration per setting, checked everywhere it is read."""

import ast
from pathlib import Path

import pytest

from coordinator.settings import RunSettings

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
    assert not {"coordinator", "catalog_build", "simulation"} & imported_packages("participants")
    assert not {"participants", "catalog_build", "simulation"} & imported_packages("coordinator")
    assert not {"participants", "coordinator", "catalog_build", "simulation"} & imported_packages("protocols")
    assert "simulation" not in imported_packages("catalog_build")  # the catalog build knows no data set


def test_run_config_keys_match_the_settings():
    import tomllib

    from protocols.settings import to_config

    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    # every setting is there (`flwr run --run-config` takes only listed keys), with the schema's default
    assert defaults == to_config(RunSettings())
    assert RunSettings.from_run_config(defaults) == RunSettings()


@pytest.mark.parametrize("change, message", [
    ({"share_ratio": 1.5}, "share-ratio"), ({"share_ratio": 0.0}, "share-ratio"), ({"top_k": 0}, "top-k"),
    ({"temperature": 0.0}, "temperature"), ({"shortlist": 1, "top_k": 3}, "shortlist"),
    ({"sharer_selection": "loudest"}, "sharer-selection"), ({"lora_lr": float("nan")}, "lora-lr"),
])
def test_bad_settings_are_refused_with_the_reason(change, message):
    with pytest.raises(ValueError, match=message):
        RunSettings(**change)


def test_unknown_run_config_keys_are_named():
    with pytest.raises(ValueError, match="num-sharers"):
        RunSettings.from_run_config({"num-sharers": 3})


def test_one_name_per_setting_from_flag_to_config_key_to_attribute():
    from dataclasses import fields

    from protocols.settings import ParticipantSettings, from_config, to_config
    from simulation.bench.settings import BenchSettings
    from simulation.cli import main
    from simulation.settings import SimulateSettings

    changed = RunSettings(lora_rank=4, share_ratio=0.5, rng_seed=7, generate=False)
    assert RunSettings.from_run_config(to_config(changed)) == changed
    # a device reads back exactly the participants' part of what the coordinator sends
    assert from_config(ParticipantSettings, changed.participant_config()) == ParticipantSettings(
        lora_rank=4, share_ratio=0.5, rng_seed=7, generate=False)
    # every field of the harness's settings is a flag of the same name, whose default is the field's
    import argparse

    for command, cls in (("simulate", SimulateSettings), ("bench", BenchSettings)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        parser = argparse.ArgumentParser()
        from simulation.cli import add_settings_flags
        add_settings_flags(parser, cls)
        args = parser.parse_args([])
        assert {f.name for f in fields(cls)} == set(vars(args))
        assert all(getattr(args, f.name) == f.default for f in fields(cls))


def test_participant_code_takes_its_defaults_from_the_schema():
    from participants.assembly import AssemblySettings
    from participants.lora_training import LoraSettings
    from participants.settings import assembly_settings, lora_settings
    from protocols.settings import ParticipantSettings

    s = ParticipantSettings()
    assert lora_settings(s) == LoraSettings() and assembly_settings(s) == AssemblySettings()
