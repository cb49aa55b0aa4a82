"""The device's privacy policy: its file, its refusals, its ε ledger, its randomness, and the profile noise the
coordinator cannot remove."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from participants.device import Device
from participants.device_setup import init_device
from participants.privacy_ledger import LEDGER_FILE, BudgetExceeded, PrivacyLedger
from participants.privacy_policy import POLICY_FILE, PolicyError, PolicyRefused, PrivacyPolicy
from protocols import messages as M
from protocols.records import PersonalRecord, save_records
from protocols.settings import ParticipantSettings


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower stamps a message with the run and node it runs in; outside a run, pin them."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def device_with(tmp_path, policy: dict | None = None, n: int = 8) -> Device:
    records = [PersonalRecord("ann", f"what about topic {i}?", f"ann thinks topic {i} is lovely, truly")
               for i in range(n)]
    save_records(records, tmp_path / "data.jsonl")
    device = init_device(tmp_path / "dev", tmp_path / "data.jsonl").device
    if policy is not None:  # a given policy lets the few records here share, unless it says otherwise
        (device.root / POLICY_FILE).write_text(json.dumps({"min-share-records": 1} | policy))
    return device


def ask(device: Device, message_type: str, config: dict | None = None, node_id: int = 7) -> Message:
    """One message through the whole ClientApp (its mods included), as the SuperNode delivers it."""
    from participants.client_app import app

    msg = Message(RecordDict({M.CONFIG: ConfigRecord(config or {})}), dst_node_id=node_id, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    context = Context(run_id=1, node_id=node_id, node_config={"device-dir": str(device.root)}, state=RecordDict(),
                      run_config={})
    return app(msg, context)


# --- the file ---------------------------------------------------------------------------------------------------


def test_device_init_writes_the_safe_default_policy_and_keeps_an_edited_one(tmp_path):
    device = device_with(tmp_path)
    path = device.root / POLICY_FILE
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    policy = PrivacyPolicy.load(path)
    assert policy == PrivacyPolicy() and policy.share and policy.max_share_ratio < 1 and policy.pinned_seed is None
    assert policy.profile_epsilon <= policy.epsilon_budget
    path.write_text('{"max-share-ratio": 0.25}')
    init_device(device.root, tmp_path / "data.jsonl")
    assert device.policy() == PrivacyPolicy(max_share_ratio=0.25)
    path.write_text('{"max-share-ratio": 2}')
    with pytest.raises(PolicyError, match="max-share-ratio"):
        init_device(device.root, tmp_path / "data.jsonl")
    assert PrivacyPolicy.load(tmp_path / "absent.json") == PrivacyPolicy()


@pytest.mark.parametrize("text, words", [
    ('{"max-share-ratio": 1.5}', ["'max-share-ratio'", "(0, 1]", '"max-share-ratio": 0.5']),
    ('{"max-share-ratio": 0}', ["'max-share-ratio'", '"share": false']),
    ('{"share": "no"}', ["'share'", "true or false", '"share": true']),
    ('{"profile-epsilon": -1}', ["'profile-epsilon'", "> 0", '"profile-epsilon": 1.0']),
    ('{"profile-delta": 1}', ["'profile-delta'", "(0, 1)"]),
    ('{"report-metrics": "seed-*"}', ["'report-metrics'", "list"]),
    ('{"pinned-seed": 1.5}', ["'pinned-seed'", "null"]),
    ('{"min-share-records": 0}', ["'min-share-records'", ">= 1", '"min-share-records": 64']),
    ('{"min-share-records": 2.5}', ["'min-share-records'", "whole number"]),
    ('{"max-share-ration": 0.5}', ["unknown key", "max-share-ration", "max-share-ratio"]),
    ('{"profile-epsilon": 4, "epsilon-budget": 3}', ["'profile-epsilon' and 'epsilon-budget' contradict",
                                                     '"epsilon-budget" >= 4']),
    ('{"share": true,', ["not JSON", '"max-share-ratio": 0.5']),
    ('[1, 2]', ["JSON object"]),
])
def test_a_bad_policy_names_the_file_the_key_and_what_to_write(tmp_path, text, words):
    path = tmp_path / POLICY_FILE
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        PrivacyPolicy.load(path)
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_a_broken_policy_stops_every_request(tmp_path):
    device = device_with(tmp_path, {"max-share-ratio": "all"})
    with pytest.raises(Exception, match="max-share-ratio"):
        from types import SimpleNamespace

        from participants.client_app import _request

        msg = SimpleNamespace(content=RecordDict({M.CONFIG: ConfigRecord({})}))
        _request(msg, Context(run_id=1, node_id=1, node_config={"device-dir": str(device.root)},
                              state=RecordDict(), run_config={}))


# --- what a request gets ------------------------------------------------------------------------------------------


def test_the_share_is_the_smaller_of_the_request_and_the_policy_and_a_non_sharer_refuses():
    policy = PrivacyPolicy()
    assert policy.share_ratio(1.0) == 0.5 and policy.share_ratio(0.2) == 0.2
    assert PrivacyPolicy(max_share_ratio=1.0).share_ratio(1.0) == 1.0
    with pytest.raises(PolicyRefused, match="'share' is false"):
        PrivacyPolicy(share=False).share_ratio(0.1)


def test_a_share_request_to_a_device_that_does_not_share_is_refused_before_any_work(tmp_path):
    device = device_with(tmp_path, {"share": False})
    with pytest.raises(PolicyRefused, match=f"{POLICY_FILE}: key 'share' is false"):
        ask(device, M.SHARE, {"seed-model": "tiny-random", "lora-steps": 1})


def test_the_share_request_gets_the_policys_ratio_and_fresh_randomness(tmp_path):
    from participants.device_privacy import share_request

    device = device_with(tmp_path, {"min-share-records": 8})
    s, first, dp = share_request(device, ParticipantSettings(share_ratio=1.0))
    _, second, _ = share_request(device, ParticipantSettings(share_ratio=1.0))
    assert s.share_ratio == 0.5 and first != second and dp is None  # the OS's randomness: a new draw every time
    (device.root / POLICY_FILE).write_text('{"pinned-seed": 3, "min-share-records": 8}')
    assert share_request(device, ParticipantSettings())[1] == share_request(device, ParticipantSettings())[1]


def test_a_device_with_fewer_own_records_than_min_share_records_refuses_before_spending_anything(tmp_path):
    from participants.device_privacy import share_request

    device = device_with(tmp_path, n=8)  # the default policy asks for more records than 8
    assert device.policy().min_share_records > 8
    with pytest.raises(PolicyRefused) as err:
        ask(device, M.SHARE, {"seed-model": "tiny-random", "lora-steps": 1})
    message = str(err.value)
    assert f"{POLICY_FILE}: key 'min-share-records' is {PrivacyPolicy().min_share_records}" in message
    assert "8" not in message.replace(str(PrivacyPolicy().min_share_records), "")  # the threshold, not the count
    assert not (device.root / LEDGER_FILE).exists()  # refused before the ledger wrote the request down
    (device.root / POLICY_FILE).write_text('{"min-share-records": 9}')
    with pytest.raises(PolicyRefused, match="'min-share-records' is 9"):
        share_request(device, ParticipantSettings())
    (device.root / POLICY_FILE).write_text('{"min-share-records": 8}')
    assert share_request(device, ParticipantSettings())[0].share_ratio == 0.5


def test_a_simulation_lowers_min_share_records_to_its_history_unless_told(tmp_path):
    from simulation.settings import SimulateSettings

    assert SimulateSettings(history=16).device_policy().min_share_records == 16
    assert SimulateSettings(history=500).device_policy().min_share_records == PrivacyPolicy().min_share_records
    assert SimulateSettings(history=16, min_share_records=32).device_policy().min_share_records == 32
    (tmp_path / "p.json").write_text('{"min-share-records": 40}')
    assert SimulateSettings(history=16, policy=str(tmp_path / "p.json")).device_policy().min_share_records == 40
    (tmp_path / "p.json").write_text('{"max-share-ratio": 0.25}')
    policy = SimulateSettings(history=16, policy=str(tmp_path / "p.json")).device_policy()
    assert (policy.min_share_records, policy.max_share_ratio) == (16, 0.25)


def test_only_the_metrics_the_policy_allows_leave_the_device():
    metrics = {"seed-perplexity": 3.0, "lora-loss-last": 1.0, "upload-bytes": 10, "something-new": 1}
    assert PrivacyPolicy().reported(metrics) == {"seed-perplexity": 3.0, "lora-loss-last": 1.0, "upload-bytes": 10}
    assert PrivacyPolicy(report_metrics=("seed-*",)).reported(metrics) == {"seed-perplexity": 3.0}
    assert PrivacyPolicy(report_metrics=()).reported(metrics) == {}


# --- the ε ledger -------------------------------------------------------------------------------------------------


def test_the_ledger_adds_up_refuses_past_the_budget_and_writes_atomically(tmp_path):
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE)
    assert ledger.spent() == (0, 0)
    assert ledger.spend("profile", 1.0, 1e-5, budget=2.5) == 1.0
    assert ledger.spend("profile", 1.0, 1e-5, budget=2.5) == 2.0
    with pytest.raises(BudgetExceeded, match=r"'epsilon-budget' 2.5 would be exceeded: 2 spent"):
        ledger.spend("profile", 1.0, 1e-5, budget=2.5)
    assert ledger.spent() == pytest.approx((2.0, 2e-5))
    data = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert data["epsilon-spent"] == 2.0 and [r["what"] for r in data["releases"]] == ["profile", "profile"]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    (tmp_path / LEDGER_FILE).write_text("{half a ledger")
    with pytest.raises(ValueError, match="not a privacy ledger"):
        ledger.spend("profile", 0.1, 1e-5, budget=100)


def test_profile_replies_report_their_epsilon_and_stop_at_the_budget(tmp_path):
    device = device_with(tmp_path, {"profile-epsilon": 1.0, "epsilon-budget": 2.0, "profile-delta": 1e-6})
    for spent in (1.0, 2.0):
        reply = ask(device, M.PROFILE)
        metrics = dict(reply.content[M.METRICS].items())
        assert metrics == {"profile-epsilon": 1.0, "profile-delta": 1e-6, "epsilon-spent": spent}
        assert len(reply.content[M.PROFILE_RECORD]["embedding"]) == 384
    with pytest.raises(PolicyRefused, match="epsilon-budget"):
        ask(device, M.PROFILE)
    assert device.ledger().spent()[0] == 2.0  # the refused release spent nothing
    # and a policy that keeps its spending to itself
    (device.root / POLICY_FILE).write_text('{"report-metrics": ["profile-*"], "epsilon-budget": 5}')
    assert set(ask(device, M.PROFILE).content[M.METRICS].keys()) == {"profile-epsilon", "profile-delta"}


# --- randomness the coordinator cannot know ----------------------------------------------------------------------


def coordinator_candidates(rng_seed: int, node_id: int, key_hex: str) -> list:
    """Every seed the coordinator could derive from what it holds (the run config's rng-seed, the node id, the key
    id the profile reported), in every form the device's code could use them: alone, combined, with the purpose
    tag a pinned policy adds, and the formula the ClientApp used before the policy (rng-seed * 7919 + key id)."""
    key_int = int(key_hex, 16)
    plain = {rng_seed, node_id, key_int, int(key_hex[:8], 16), int(key_hex[:16], 16),
             rng_seed * 7919 + int(key_hex[:8], 16), rng_seed + node_id, rng_seed * 7919 + node_id}
    return [*plain, *([c, tag] for c in plain for tag in (1, 2)), [rng_seed, node_id], [rng_seed, key_int]]


def best_reproduction(reply: Message, device: Device, rng_seed: int, node_id: int) -> float:
    """The closest any coordinator-derived noise comes to explaining the release: cos(release, mean + noise) is 1
    exactly when the coordinator has the device's noise (and then mean = |mean + noise| · release − noise)."""
    from participants.gaussian_mechanism import gaussian_sigma
    from participants.profile import clipped_mean, embed_texts

    rec, metrics = reply.content[M.PROFILE_RECORD], reply.content[M.METRICS]
    release, n = np.asarray(rec["embedding"], dtype=np.float64), int(rec["count"])
    clip = PrivacyPolicy().profile_clip_norm  # the coordinator knows the default policy, and ε, δ from the reply
    sigma = gaussian_sigma(metrics["profile-epsilon"], metrics["profile-delta"], 2 * clip / n)
    # the true clipped mean: what the attack would recover; only the test (the device's owner) knows it
    mean = clipped_mean(embed_texts([f"{r.input}\n{r.output}" for r in device.history()]), clip)
    best = -1.0
    for seed in coordinator_candidates(rng_seed, node_id, str(rec["key-id"])):
        guess = mean + np.random.default_rng(seed).normal(0.0, sigma, size=mean.shape)
        best = max(best, float(release @ guess / np.linalg.norm(guess)))
    return best


def test_the_coordinator_cannot_reproduce_the_profile_noise_at_the_default_policy(tmp_path):
    rng_seed, node_id = 0, 7
    device = device_with(tmp_path)
    reply = ask(device, M.PROFILE, {"rng-seed": rng_seed}, node_id=node_id)
    assert best_reproduction(reply, device, rng_seed, node_id) < 0.5
    # two releases of the same data differ: the noise is fresh each time, whatever the message says
    again = ask(device, M.PROFILE, {"rng-seed": rng_seed}, node_id=node_id)
    assert rec_embedding(again) != rec_embedding(reply)
    # the check has teeth: a policy whose pinned seed the coordinator can guess (here: the run's rng-seed) is
    # reproduced exactly, which is why a pinned seed is for experiments only
    (device.root / POLICY_FILE).write_text(json.dumps({"pinned-seed": rng_seed}))
    pinned = ask(device, M.PROFILE, {"rng-seed": rng_seed}, node_id=node_id)
    assert best_reproduction(pinned, device, rng_seed, node_id) > 0.9999


def rec_embedding(reply: Message) -> list[float]:
    return list(reply.content[M.PROFILE_RECORD]["embedding"])


def test_the_simulation_pins_each_virtual_devices_policy_from_the_runs_rng_seed(tmp_path):
    from simulation.federation import prepare_devices
    from simulation.user_data import UserData

    users = [UserData(u, [PersonalRecord(u, "q?", f"{u} says hi")], []) for u in ("ann", "bob")]
    prepare_devices(users, tmp_path / "a", rng_seed=3)
    (tmp_path / "a" / "devices" / "0" / LEDGER_FILE).write_text("{}")  # a ledger from an earlier run
    prepare_devices(users, tmp_path / "a", rng_seed=3)
    prepare_devices(users, tmp_path / "b", rng_seed=3)
    prepare_devices(users, tmp_path / "c", rng_seed=4)
    policy = {run: [Device(tmp_path / run / "devices" / str(pid)).policy() for pid in (0, 1)] for run in "abc"}
    assert policy["a"] == policy["b"] and policy["a"] != policy["c"]
    assert policy["a"][0].pinned_seed is not None and policy["a"][0].pinned_seed != policy["a"][1].pinned_seed
    assert policy["a"][0].max_share_ratio == PrivacyPolicy().max_share_ratio  # otherwise the defaults,
    assert policy["a"][0].min_share_records == 1  # but any device with its one record may share
    assert not (tmp_path / "a" / "devices" / "0" / LEDGER_FILE).exists()  # a fresh virtual device spent nothing
