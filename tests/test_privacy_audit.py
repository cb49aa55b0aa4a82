"""Pseudonyms: nothing that names a participant, points at its device or quotes its data reaches the coordinator.

The audit runs a real Flower simulation (Ray, the tiny seed, a tiny catalog so that the seed choice is exchanged
too) with a Grid that records every message in both directions, and searches every message, every file the
coordinator wrote and the coordinator's log for each user's name, each device folder's path and every
20-character window of each user's history and held-out records. One device's data is broken so that error
replies are audited as well.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from conftest import tiny_catalog
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from participants.error_replies import DeviceError, plain_errors
from participants.limits import LimitExceeded
from protocols import messages as M
from protocols.records import PersonalRecord, save_records
from simulation.federation import prepare_devices, simulate_devices
from simulation.settings import SimulateSettings
from simulation.user_data import UserData
from simulation.wire_audit import auditing_server_app, coordinator_blobs, coordinator_log, leaks, private_texts

NAMES = ["Ottoline-Quarrington", "Bartholomew-Vexley", "Philippa-Zanzibar", "Evander-Mulgrave"]
WORDS = ("lantern marzipan quixotic harbour velvet juniper obsidian tangerine walrus cobalt pergola saffron "
         "zeppelin fjord mandolin turmeric gazebo archipelago").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def user(pid: int, name: str) -> UserData:
    rng = random.Random(pid)
    style = ["ZAP!", "Dear sir,", "ZAP!", "Dear sir,"][pid]
    records = [PersonalRecord(name, f"what about the {sentence(rng, 4)}?", f"{style} {sentence(rng, 7)} {style}",
                              id=f"{pid}-{i}") for i in range(8)]
    return UserData(name, records[:6], records[6:])


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_no_name_path_or_record_text_reaches_the_coordinator(tmp_path):
    catalog = tiny_catalog(tmp_path / "catalog")
    users = [user(pid, name) for pid, name in enumerate(NAMES)]
    run_dir = tmp_path / "run"
    settings = SimulateSettings(seed_model="tiny-random", out_dir=str(run_dir), sharers=2, newcomers=1,
                                lora_steps=2, gate_steps=1, lora_rank=4, lora_alpha=8, max_len=48, max_new_tokens=4,
                                generate=False, timeout=600, sharer_selection="most-active", min_nodes=len(users),
                                catalog=str(catalog.folder))
    mapping = prepare_devices(users, run_dir, settings.rng_seed)
    # the last device's data is broken in a way whose message names its user and its file
    broken = users[-1].history[:2]
    save_records([broken[0], PersonalRecord(NAMES[-1], broken[1].input, broken[1].output, id=broken[0].id)],
                 run_dir / "devices" / "3" / "history.jsonl")

    grids: list = []
    with coordinator_log() as captured:
        summary = simulate_devices(run_dir, mapping, settings, server_app=auditing_server_app(settings, grids))

    # the round did all it should, so that every kind of message was audited
    (grid,) = grids
    kinds = {(direction, kind) for direction, kind, _ in grid.messages}
    assert kinds == {(d, k) for d in ("sent", "received") for k in (M.STYLE, M.PROFILE, M.SHARE, M.GATES, M.ASSEMBLE)}
    assert len(summary["sharers"]) == 2 and len(summary["newcomers"]) == 1 and summary["pool_pieces"] > 0
    assert any("node" in line and "DataFormatError on the device" in line for line in summary["unanswered"])

    secrets = private_texts(users, run_dir, public=[(catalog.folder / "catalog.json").read_text()])
    assert len(secrets) > 1000 and set(NAMES) <= secrets
    blobs = coordinator_blobs(run_dir, grid, captured.getvalue())
    assert sum(name.startswith("message ") for name in blobs) == len(grid.messages) > 0
    assert "metrics.json" in blobs and any(name.startswith("pool") for name in blobs)
    assert "sharers" in captured.getvalue()  # the log was captured
    assert leaks(blobs, secrets) == []
    # and the search itself finds what it looks for
    assert leaks({"a device file": (run_dir / "devices" / "0" / "history.jsonl").read_bytes()}, secrets)

    # the harness's own summary names the users, joined by key id
    assert {NAMES[0], NAMES[1], NAMES[2]} == set(summary["sharers"]) | {m["user"] for m in summary["newcomers"]}
    assert json.loads((run_dir / "summary.json").read_text())["nodes"] == summary["nodes"]


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_real_health_tweets_with_dp_sgd_pieces_leave_no_trace_on_the_coordinator(tmp_path):
    """The same audit on real records (four health-tweet accounts: URLs, names of outlets, hashtags), with every
    device's policy training its pieces by DP-SGD, through `bouquet simulate --audit-wire`'s own audit."""
    from participants.privacy_policy import PrivacyPolicy
    from simulation.datasets import load_users
    from simulation.wire_audit import audit_run

    users = [UserData(u.user, u.history[:6], u.test[:2])
             for u in load_users("healthtweets", history_size=6, test_size=2, seed=5)[:4]]
    run_dir = tmp_path / "run"
    settings = SimulateSettings(seed_model="tiny-random", out_dir=str(run_dir), sharers=2, newcomers=2,
                                lora_steps=2, dp_lora_steps=2, gate_steps=1, lora_rank=4, lora_alpha=8, max_len=48,
                                max_new_tokens=4, timeout=600, min_nodes=len(users), piece_epsilon=8.0, history=6)
    assert settings.device_policy() == PrivacyPolicy(piece_epsilon=8.0, min_share_records=6)
    mapping = prepare_devices(users, run_dir, settings.rng_seed, settings.device_policy())
    grids: list = []
    summary = simulate_devices(run_dir, mapping, settings, server_app=auditing_server_app(settings, grids))
    assert len(summary["newcomers"]) == 2 and all(m.get("pieces-epsilon", 0) > 7 for m in summary["sharers"].values())
    audit = audit_run(users, run_dir, grids[0], coordinator_log="")
    assert audit["messages"] >= 12 and audit["secrets-searched"] > 1000 and audit["leaks"] == []
    # the search is not blind to these records: a device's own file holds them
    assert leaks({"history": (run_dir / "devices" / "0" / "history.jsonl").read_bytes()},
                 private_texts(users, run_dir))


@pytest.fixture
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def test_an_error_reply_names_the_exception_type_and_a_refusal_its_limit(task_identity):
    msg = Message(RecordDict(), dst_node_id=5, message_type=M.SHARE)

    def fails(m, c):
        raise ValueError("/home/ann/device/history.jsonl:3: duplicate id '7' of user 'ann'")

    with pytest.raises(DeviceError) as err:
        plain_errors(msg, None, fails)
    assert str(err.value) == "train.share: ValueError on the device (its own log has the details)"
    assert err.value.__cause__ is None and err.value.__suppress_context__

    def refuses(m, c):
        raise LimitExceeded("refused by this device's limits.json: lora-steps 900 > 300")

    with pytest.raises(LimitExceeded, match="lora-steps 900 > 300"):
        plain_errors(msg, None, refuses)
    assert plain_errors(msg, None, lambda m, c: "the reply") == "the reply"


def test_the_harness_joins_node_ids_with_its_users_by_key_id_and_prints_them():
    from rich.console import Console

    from simulation.federation import summarize
    from simulation.summary import print_summary

    share = {"lora-loss-first": 2.0, "lora-loss-last": 1.0, "lora-seconds": 1.0, "gate-seconds": 1.0,
             "pieces-shared": 4, "accepted": 4}
    metrics = {"sharers": {"11": {"key-id": "aa"} | share, "12": {"key-id": "bb"} | share},
               "selections": {"11": {"key-id": "aa", "seed": "zappy", "distance": 0.1, "reason": "r"},
                              "13": {"seed": "base", "distance": 0.5, "reason": "r"}},  # no profile: no key id
               "newcomers": [{"node": 14, "key-id": "dd", "seed": "tiny-random", "history-size": 8}],
               "refused": [], "unanswered": ["profile: node 13: no reply within 1 s"], "pool_pieces": 8}
    summary = summarize(metrics, {"aa": "Ottoline", "bb": "Bartholomew", "dd": "Evander"})
    assert summary["sharers"]["Ottoline"] == {"node": 11, "key-id": "aa"} | share
    assert sorted(summary["selections"]) == ["Ottoline", "node 13"]
    assert summary["newcomers"] == [{"user": "Evander"} | metrics["newcomers"][0]]
    assert summary["nodes"] == {"11": "Ottoline", "12": "Bartholomew", "13": "node 13", "14": "Evander"}
    assert summary["unanswered"] == metrics["unanswered"] and summary["pool_pieces"] == 8
    out = io.StringIO()
    print_summary(summary, Path("run"), Console(file=out, width=200))
    assert all(name in out.getvalue() for name in ("Ottoline", "Bartholomew", "Evander"))


def test_the_leak_search_finds_every_secret_wherever_it_lies(monkeypatch):
    import simulation.wire_audit as wire_audit

    monkeypatch.setattr(wire_audit, "_CHUNK", 64)  # many chunks, so that secrets straddle their edges
    rng = random.Random(0)
    names = ["Ottoline", "ünïcode wïndow of twenty+ chars"]  # shorter and longer than a window, in bytes
    windows = {sentence(rng, 4)[:20] for _ in range(300)}
    secrets = windows | set(names)
    chosen = sorted(windows)[:5] + names
    noise = bytes(rng.randrange(256) for _ in range(5000))
    blob = b"".join(noise[i * 700:(i + 1) * 700] + s.encode() for i, s in enumerate(chosen))
    found = wire_audit.leaks({"blob": blob, "clean": noise}, secrets)
    assert sorted(found) == sorted(f"blob: {s!r}" for s in chosen)
