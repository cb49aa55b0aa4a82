"""The stream bench end to end on the tiny model: every rule and size replayed, annotated, trained, evaluated and
reported, with resumption; and the paired statistics it reports."""

import json

import numpy as np
import pytest

from simulation.paired_stats import paired_comparison


def test_paired_comparison_finds_a_consistent_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    base = rng.normal(10, 1, size=16)
    better = paired_comparison(base - 0.5 + 0.1 * rng.normal(size=16), base, lower_is_better=True)
    assert better["better"] and better["p_value"] < 0.01 and better["ci_high"] < 0 and better["wins"] >= 14
    e = rng.normal(0, 0.1, size=8)
    null = paired_comparison(base + np.concatenate([e, -e]), base, lower_is_better=True)  # differences symmetric
    assert abs(null["diff"]) < 1e-12
    assert null["p_value"] > 0.05 and null["ci_low"] < 0 < null["ci_high"]
    with pytest.raises(ValueError, match="the same users on both sides"):
        paired_comparison([1, 2], [1, 2, 3], lower_is_better=True)


@pytest.mark.parametrize("writer", ["adapter", "seed"])
def test_the_stream_bench_runs_every_rule_and_resumes(tmp_path, styleqa_found, tiny_seed, writer):
    from simulation.stream_bench import resolve_settings, run_stream_bench

    s = resolve_settings(seed_model="tiny-random", data="styleqa", users=3, stream=12, test=2, buffer_sizes=(2, 4),
                         rounds=2, lora_steps=1, batch_size=2, max_len=48, max_new_tokens=4, pairs=1,
                         synthesis_tokens=8, timing_items=2, score_len=48, synthesis_writer=writer)
    report = run_stream_bench(s, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    methods = {(r["method"], r["buffer"]) for r in rows if r["kind"] == "method"}
    assert methods == {("seed", None), ("full", None)} | {(m + v, b) for m in ("sdss", "fifo", "random", "kcenter")
                                                          for v in ("", "+syn") for b in (2, 4)}
    buffers = [r for r in rows if r["kind"] == "buffer"]
    assert all(r["annotated"] <= r["buffer"] and max(r["annotated_positions"]) <= 12 for r in buffers)
    full = [r for r in rows if r.get("method") == "full"]
    assert all(r["train_records"] == 12 and r["steps"] == 6 for r in full)  # one pass over the stream, batch 2
    # a buffer's adapter trains as many steps as the reference (buffer-training reference-steps, the default)
    assert all(r["steps"] == 6 for r in rows if r.get("method", "seed") not in ("seed", "full"))
    assert all(r["steps"] == 0 for r in rows if r.get("method") == "seed")
    assert len(report["users"]) == 3 and (tmp_path / "report.md").exists() and report["cost"]["forward_ms"] > 0
    assert {c["b"] for c in report["comparisons"] if c["a"] == "sdss"} == {"fifo", "random", "kcenter"}
    assert len(report["targets"]) == 3
    written = [r for r in rows if r["kind"] == "synthesis"]  # the seed writes once a user, an adapter once a buffer
    assert len(written) == 3 * (8 if writer == "adapter" else 1) and all(r["written"] == r["items"] for r in written)
    before = (tmp_path / "results.jsonl").read_text()
    run_stream_bench(s, tmp_path)  # everything done: nothing is run again
    assert (tmp_path / "results.jsonl").read_text() == before
    with pytest.raises(ValueError, match="other settings"):
        run_stream_bench(resolve_settings(**(s.to_json() | {"lora_steps": 2})), tmp_path)


def test_a_buffers_adapter_trains_the_references_steps_or_lora_steps():
    from simulation.stream_bench import resolve_settings

    s = resolve_settings(stream=80, batch_size=2, lora_steps=3, full_epochs=1.0)
    assert s.reference_steps() == 40 and s.buffer_steps() == 40  # one pass over 80 items, 2 a step
    assert resolve_settings(stream=80, batch_size=2, lora_steps=3, buffer_training="lora-steps").buffer_steps() == 3
    few = resolve_settings(stream=8, buffer_sizes=(2,), batch_size=4, lora_steps=5)
    assert few.reference_steps() == 5  # at least lora-steps, though one pass is 2 steps
    with pytest.raises(ValueError, match="buffer-training|buffer_training"):
        resolve_settings(buffer_training="epochs")


def test_each_user_of_the_bench_samples_its_own_positions_reproducibly():
    """Users whose streams hold the same items (styleqa's styles share their questions) get independent random
    buffers, and a rerun gets the same ones."""
    from participants.selection_scores import ItemFeatures
    from protocols.records import PersonalRecord
    from simulation.stream_bench import resolve_settings
    from simulation.stream_bench.run import replay, user_random_seed
    from simulation.user_data import UserData

    rng = np.random.default_rng(0)
    feats = []
    for _ in range(40):
        e = rng.normal(size=8).astype(np.float32)
        feats.append(ItemFeatures(e, (e / np.linalg.norm(e))[None], 1))
    s = resolve_settings(stream=40, buffer_sizes=(6,), rounds=2)
    positions = {}
    for name in ("style1-u0", "style2-u0", "style1-u0"):
        user = UserData(name, [PersonalRecord(name, f"q {i}", f"a {i}", id=str(i)) for i in range(40)], [])
        buffer = replay(user, feats, s, 6, "random", "tiny")
        positions.setdefault(name, []).append(sorted(it.seq for it in buffer.annotated()))
    assert positions["style1-u0"][0] == positions["style1-u0"][1] != positions["style2-u0"][0]
    assert user_random_seed(0, "a") != user_random_seed(1, "a") and user_random_seed(0, "a") < 1 << 128
