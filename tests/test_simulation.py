"""A real Flower simulation (Ray) on the tiny seed: the whole loop, with one broken participant."""

import json

import pytest
from conftest import tiny_catalog

from coordinator.pool import PiecePool
from protocols.records import PersonalRecord, save_records
from simulation.cli import main as cli
from simulation.datasets import load_users
from simulation.federation import collect_adapters, prepare_devices, simulate_devices
from simulation.settings import SimulateSettings

# A simulation waits up to its `timeout` (600 s) for a step's replies: the test's own limit lies above it, so
# that a stuck participant is reported by the simulation, not cut off by pytest-timeout. The first step starts
# every Ray worker: on 2 cores shared with other jobs that once took past 300 s, so the margin is wide (a broken
# participant answers with an error at once, so the wait costs nothing when all is well).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]
STYLES = ["ZAP!", "meh.", "Dear sir,", "lol", "KINDLY NOTE", "~~"]


def simulate(root, catalog, users):
    """The run's summary (summary.json): the coordinator's report joined with the devices' users by the harness."""
    run_dir = root / "run"
    settings = SimulateSettings(seed_model="tiny-random", out_dir=str(run_dir), sharers=3, newcomers=2,
                                lora_steps=8, gate_steps=4, lora_rank=4, lora_alpha=8, max_new_tokens=8, timeout=600,
                                sharer_selection="most-active", min_nodes=len(users), catalog=str(catalog.folder))
    mapping = prepare_devices(users, run_dir, settings.rng_seed)
    # one participant whose data is corrupt: it answers every message with an error
    (run_dir / "devices" / "5" / "history.jsonl").write_text("{not json\n")
    return run_dir, mapping, simulate_devices(run_dir, mapping, settings), settings


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    catalog = tiny_catalog(root / "catalog")
    recs = [PersonalRecord(f"user{u}", f"tell me about item {i}", f"{s} item {i} is fine {s}")
            for u, s in enumerate(STYLES) for i in range(12)]
    save_records(recs, root / "data.jsonl")
    users = load_users(str(root / "data.jsonl"), history_size=8, test_size=4)
    return root, catalog, users, simulate(root, catalog, users)


@pytest.fixture(scope="module")
def run(world):
    run_dir, mapping, metrics, _ = world[3]
    return run_dir, mapping, metrics


def test_sharers_fill_the_pool_and_newcomers_get_adapters(run):
    run_dir, mapping, metrics = run
    assert len(metrics["sharers"]) == 3
    # the run asks for share-ratio 1; each device's default policy sends at most half of its 8 pieces
    assert all(m["pieces-cut"] == 8 and m["share-ratio"] == 0.5 and m["pieces-shared"] == 4 and m["accepted"] == 4
               for m in metrics["sharers"].values())
    assert metrics["pool_pieces"] == 12 and metrics["refused"] == []
    newcomers = metrics["newcomers"]
    assert len(newcomers) == 2
    for m in newcomers:
        assert m["history-size"] == 8 and m["test-size"] == 4
        assert m["seed-perplexity"] > 0 and m["assembled-perplexity"] > 0
        assert 0 <= m["assembled-rouge1"] <= 1 and m["download-bytes"] > 0
        meta = json.loads((run_dir / "adapters" / m["user"] / "bouquet.json").read_text())
        assert len(meta["choices"]) >= 1


def test_every_participant_picks_a_seed_and_its_pieces_land_in_that_seeds_pool(run):
    run_dir, mapping, metrics = run
    answering = [u for n, u in mapping.items() if n != 5]
    assert sorted(metrics["selections"]) == sorted(answering)
    for sel in metrics["selections"].values():
        assert sel["seed"] in ("zappy", "formal") and "your data reads as" in sel["reason"]
    sharer_seeds = sorted({metrics["selections"][u]["seed"] for u in metrics["sharers"]})
    with PiecePool(run_dir / "pool") as pool:
        filled = sorted(sid.removeprefix("catalog:") for sid, n in metrics["pool_by_seed"].items() if n)
        assert filled == sharer_seeds  # each sharer's pieces went to the pool of the seed it chose
        assert sum(metrics["pool_by_seed"].values()) == pool.count() == 12
    for m in metrics["newcomers"]:
        meta = json.loads((run_dir / "adapters" / m["user"] / "bouquet.json").read_text())
        assert meta["seed_model"] == m["seed"]  # it assembled on the seed whose pool it drew from
        if not m["seed"].endswith(metrics["selections"][m["user"]]["seed"]):  # its own seed's pool was empty
            moved = [f for f in metrics["fallbacks"].values() if f["used"] == m["seed"]]
            assert moved and all(metrics["pool_by_seed"].get(f["wanted"], 0) == 0 for f in moved)


def test_the_coordinators_report_knows_nodes_and_key_ids_never_users_and_the_summary_joins_them(run):
    from protocols.identity import key_id, load_or_create_key, public_bytes

    run_dir, mapping, summary = run
    report = json.loads((run_dir / "metrics.json").read_text())
    text = (run_dir / "metrics.json").read_text()
    assert not any(user in text for user in mapping.values()) and str(run_dir / "devices") not in text
    assert all(node.isdigit() for node in [*report["sharers"], *report["selections"]])
    keys = {key_id(public_bytes(load_or_create_key(run_dir / "devices" / str(pid) / "key.pem").public_key())): user
            for pid, user in mapping.items()}
    rows = [*report["sharers"].values(), *report["selections"].values(), *report["newcomers"]]
    assert rows and all(row["key-id"] in keys for row in rows)
    assert {keys[row["key-id"]] for row in report["sharers"].values()} == set(summary["sharers"])
    assert [keys[row["key-id"]] for row in report["newcomers"]] == [m["user"] for m in summary["newcomers"]]
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["nodes"] == {str(m["node"]): u for u, m in summary["sharers"].items()} | {
        str(m["node"]): u for u, m in summary["selections"].items()} | {str(m["node"]): m["user"]
                                                                         for m in summary["newcomers"]}


def test_the_broken_participant_is_reported_and_left_out(run):
    _, mapping, metrics = run
    assert any("profile" in line and "error" in line for line in metrics["unanswered"])
    # its error reply names the exception's type, not its device folder or the line that broke
    assert not any("history.jsonl" in line or "devices" in line for line in metrics["unanswered"])
    assert any("DataFormatError on the device" in line for line in metrics["unanswered"])
    assert mapping[5] not in metrics["sharers"]
    assert mapping[5] not in [m["user"] for m in metrics["newcomers"]]


def test_every_adapter_loads_with_peft(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from protocols.seeds import materialize

    run_dir, _, metrics = run
    base = AutoModelForCausalLM.from_pretrained(materialize("tiny-random").path)
    for m in metrics["newcomers"]:
        model = PeftModel.from_pretrained(base, str(run_dir / "adapters" / m["user"]))
        assert any("lora_A" in n for n, _ in model.named_parameters())
        base = model.unload()


def test_pool_verify_passes_then_catches_a_flipped_byte(run, capsys, tmp_path):
    import shutil

    run_dir, _, _ = run
    assert cli(["pool", "verify", str(run_dir)]) == 0
    assert "ok: 12 pieces from 3 contributors" in capsys.readouterr().out
    copy = tmp_path / "pool"
    shutil.copytree(run_dir / "pool", copy)
    blob = sorted((copy / "blobs").rglob("*.safetensors"))[0]
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0x01
    blob.write_bytes(bytes(data))
    assert cli(["pool", "verify", str(copy)]) == 1
    assert blob.stem[:12] in capsys.readouterr().out
    with PiecePool(copy) as pool:
        assert pool.count() == 12  # the rest stays


def test_adapters_are_collected_once_per_newcomer(run):
    run_dir, mapping, metrics = run
    collect_adapters(run_dir, mapping)
    assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == sorted(m["user"] for m in metrics["newcomers"])


def test_the_bench_assembles_exactly_what_a_newcomer_assembled_in_the_round(world):
    """Same user, pool and settings: the bench's Per-Pcs path and the Flower flow give identical weights, since
    both run participants.newcomer."""
    import numpy as np

    from participants.adapters import load_peft_adapter
    from participants.seed_loading import load_seed
    from protocols.records import load_records
    from simulation.bench.methods import perpcs

    _, catalog, _, (run_dir, mapping, metrics, settings) = world
    partition = {user: pid for pid, user in mapping.items()}
    assert metrics["newcomers"]
    with PiecePool(run_dir / "pool") as pool:
        for m in metrics["newcomers"]:
            seed_id = m["seed"]
            source = catalog.seed_source(seed_id.removeprefix("catalog:")) if seed_id.startswith("catalog:") \
                else seed_id
            history = load_records(run_dir / "devices" / str(partition[m["user"]]) / "history.jsonl")
            candidates = pool.get([pid for pid, *_ in pool.gates(seed_id)])
            _, bench = perpcs(load_seed(source), history, candidates, settings)
            federated, _, _ = load_peft_adapter(run_dir / "adapters" / m["user"])
            assert federated.keys() == bench.assembly.weights.keys()
            for pos, (A, B) in bench.assembly.weights.items():
                assert np.array_equal(federated[pos][0], A) and np.array_equal(federated[pos][1], B), pos


def test_the_same_command_picks_the_same_sharers_and_newcomers_with_the_same_results(world, tmp_path):
    """Node ids are random in every simulation; the coordinator orders nodes by their devices' key ids."""
    root, catalog, users, (_, _, first, _) = world
    _, _, again, _ = simulate(tmp_path, catalog, users)
    assert sorted(again["sharers"]) == sorted(first["sharers"])
    assert [m["user"] for m in again["newcomers"]] == [m["user"] for m in first["newcomers"]]
    for a, b in zip(first["newcomers"], again["newcomers"]):
        assert a["assembled-perplexity"] == b["assembled-perplexity"]
        assert a["seed"] == b["seed"]
