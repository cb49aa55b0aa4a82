"""`bouquet bench` end to end on the tiny seed: every method per target, the report, resuming, and
a fidelity classifier that never sees held-out items."""

import json
import math
from dataclasses import replace

import pytest

from protocols.records import PersonalRecord, save_records
from simulation.bench import run_bench, split_users, sweep_values
from simulation.bench_settings import METHODS, BenchSettings, resolve_settings
from simulation.datasets import UserData
from simulation.fidelity import style_label, training_set

STYLES = ["ZAP!", "meh.", "Dear sir,", "lol", "KINDLY NOTE", "~~"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    recs = [PersonalRecord(f"user{u}", f"tell me about item {i}", f"{s} item {i} is fine {s}")
            for u, s in enumerate(STYLES) for i in range(9)]
    save_records(recs, root / "data.jsonl")
    settings = resolve_settings(data=str(root / "data.jsonl"), seed_model="tiny-random", sharers=3, targets=2,
                                history=6, test=3, steps=4, gate_steps=2, rank=4, alpha=8.0, max_len=48,
                                max_new_tokens=4, sweep=("topk", "history"))
    out = root / "out"
    return out, settings, run_bench(settings, out)


def method_rows(report):
    return [r for r in report["rows"] if r["kind"] == "method"]


def test_every_method_has_a_finite_row_per_target_and_the_report_is_written(bench):
    out, _, report = bench
    for name in ("report.json", "report.md", "quality_vs_cost.png", "per_user_perplexity.png", "sweep_topk.png",
                 "sweep_history.png", "settings.json", "sharers.json"):
        assert (out / name).is_file(), name
    rows = method_rows(report)
    assert sorted((r["target"], r["method"]) for r in rows) == sorted(
        (t, m) for t in report["targets_users"] for m in METHODS)
    metrics = ("perplexity", "rouge1", "rougeL", "fidelity", "seconds", "tokens_forward", "tokens_backward",
               "bytes_stored", "bytes_adapter", "bytes_downloaded")
    assert all(math.isfinite(r[k]) for r in rows for k in metrics)
    assert json.loads((out / "report.json").read_text())["means"].keys() == set(METHODS)
    md = (out / "report.md").read_text()
    assert "## targets" in md and md.count("| perpcs |") == md.count("| perpcs+ft |") == 1
    assert [t["met"] in (True, False) for t in report["targets"]] == [True] * 5
    sharers = json.loads((out / "sharers.json").read_text())
    assert len(sharers) == 3 and all(s["upload_bytes"] > 0 and s["train_tokens"] > 0 for s in sharers.values())


def test_costs_follow_what_each_method_does(bench):
    _, _, report = bench
    means = report["means"]
    assert means["seed"]["tokens_forward"] == 0 and means["seed"]["bytes_stored"] == 0
    assert means["oppu"]["tokens_forward"] == means["oppu"]["tokens_backward"] > 0
    assert means["perpcs"]["tokens_backward"] == 0 < means["perpcs"]["tokens_forward"]
    assert means["perpcs+ft"]["tokens_forward"] > means["perpcs"]["tokens_forward"]
    assert means["perpcs"]["bytes_stored"] < means["perpcs"]["bytes_adapter"] == means["oppu"]["bytes_adapter"]
    assert report["gain_recovery"]["seed"] == 0 and report["cost_ratios"]["oppu"]["tokens"] == 1


def test_sweep_points_at_the_run_settings_reproduce_perpcs(bench):
    _, settings, report = bench
    perpcs = report["means"]["perpcs"]["perplexity"]
    sweeps = report["sweeps"]
    assert [p["value"] for p in sweeps["topk"]] == sweep_values("topk", settings)
    assert {p["value"]: p["perplexity"] for p in sweeps["topk"]}[settings.top_k] == pytest.approx(perpcs, rel=1e-6)
    assert sweeps["history"][-1]["value"] == settings.history
    assert sweeps["history"][-1]["perplexity"] == pytest.approx(perpcs, rel=1e-6)


def test_a_rerun_recomputes_nothing_and_other_settings_are_refused(bench):
    out, settings, _ = bench
    before = (out / "results.jsonl").read_text()
    run_bench(settings, out)
    assert (out / "results.jsonl").read_text() == before
    with pytest.raises(ValueError, match="other settings.*steps: 4 there, 5 now"):
        run_bench(replace(settings, steps=5), out)


def test_a_changed_judge_rescores_the_stored_generations_without_rerunning(bench):
    out, settings, _ = bench
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    stale = [r | {"fidelity": -1.0, "judge": "old"} if r["kind"] == "method" else r for r in rows]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    run_bench(settings, out)
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r.get("fidelity") for r in again] == [r.get("fidelity") for r in rows]
    assert all(r["judge"] != "old" for r in again if r["kind"] == "method")


def test_fidelity_classifier_never_sees_held_out_items():
    def user(name, n=3):
        return UserData(name, [PersonalRecord(name, "q", f"{name} history {i}") for i in range(n)],
                        [PersonalRecord(name, "q", f"{name} TEST {i}") for i in range(n)])

    users = [user("alice"), user("bob"), user("carol")]
    texts, labels = training_set(users, "alice")
    assert not any("TEST" in t for t in texts)
    assert "alice history 0" in texts and set(labels) == {"alice", "bob", "carol"}  # per-user: its own history

    styled = [user("style0-u0"), user("style0-u1"), user("style1-u0")]
    texts, labels = training_set(styled, "style0-u1")
    assert not any("TEST" in t or "style0-u1" in t for t in texts)  # classes: the others carry its label
    assert set(labels) == {"style0", "style1"} and style_label("style0-u1") == "style0"
    with pytest.raises(ValueError, match="two labels"):
        training_set(styled[:2], "style0-u0")


def test_styleqa_split_gives_every_target_a_sharer_of_its_style():
    sharers, targets = split_users(BenchSettings(data="styleqa", sharers=9, targets=4, history=2, test=1))
    assert len(sharers) == 9 and len(targets) == 4
    assert not {u.user for u in sharers} & {u.user for u in targets}
    assert {style_label(t.user) for t in targets} <= {style_label(s.user) for s in sharers}


def test_presets_fill_in_and_flags_override():
    s = resolve_settings("small", data="healthtweets", steps=4)
    assert (s.sharers, s.targets, s.steps, s.ft_steps, s.max_len) == (6, 4, 4, 1, 96)
    assert resolve_settings("small", data="styleqa").max_len == 128
    for bad, message in [({"top_k": 4, "shortlist": 2}, "shortlist"), ({"sweep": ("depth",)}, "unknown sweep"),
                         ({"rho": 0.0}, "rho"), ({"targets": 0}, "targets")]:
        with pytest.raises(ValueError, match=message):
            resolve_settings(**bad)
