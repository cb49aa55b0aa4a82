"""`bouquet seeds bench` end to end on tiny-model seeds: the four comparisons, their bookkeeping, resuming."""

import json

import pytest

from catalog_build import ExplainSettings, build_catalog_from_labels
from participants.lora_training import LoraSettings
from protocols.seeds import TINY
from simulation.seeds_bench import SeedBenchSettings, run_seed_bench
from simulation.seeds_bench.users import bench_users
from simulation.styleqa import styleqa_groups, styleqa_probes

SETTINGS = SeedBenchSettings(users_per_style=2, search_users_per_style=1, history=4, test=2, ft_steps=3, eval_every=1, styles_for_tuning=2,
                             lora_steps=2, gate_steps=1, max_len=48, scaling_sizes=(2, 4))


@pytest.fixture(scope="module", autouse=True)
def _styleqa(styleqa_found):
    """The seeds bench reads styleqa by name: every test here runs on the tests' own styleqa folder."""
    return styleqa_found


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    lora = LoraSettings(rank=4, alpha=8.0, steps=4, lr=0.02, batch_size=2, max_len=48)
    build_catalog_from_labels(root / "catalog", styleqa_groups(6, styles=(2, 5)), TINY, lora, styleqa_probes(2),
                              ExplainSettings(("expert", "concise", "friendly")), max_new_tokens=6)
    return root, run_seed_bench(root / "catalog", root / "out", SETTINGS)


def test_accuracy_has_a_confusion_matrix_per_method(bench):
    _, report = bench
    acc = report["accuracy"]
    assert acc["styles"] == [2, 5] and acc["users"] == 4
    for method, users in (("xpert", 4), ("exhaustive", 2), ("halving", 2)):
        assert 0.0 <= acc[method]["accuracy"] <= 1.0
        assert acc[method]["users"] == sum(map(sum, acc[method]["confusion"])) == users
    assert acc["exhaustive"]["seeds_loaded"] == 2
    # re-explained from all the catalog's probes with the rule in use, the replay is the choice the devices made
    (full,) = acc["sensitivity"]
    assert full["probes"] == 2 and full["mix"] == acc["xpert"]["accuracy"] and 0.0 <= full["raw"] <= 1.0


def test_search_cost_grows_with_the_catalog_and_xpert_loads_no_seed(bench):
    _, report = bench
    small, large = report["scaling"]
    assert (small["seeds"], large["seeds"]) == (2, 4)
    assert large["exhaustive_tokens"] == 2 * small["exhaustive_tokens"]
    assert large["exhaustive_bytes"] > small["exhaustive_bytes"] > 0
    assert large["xpert_bytes"] > small["xpert_bytes"]  # one more explanation per seed, no weights


def test_tuning_curves_and_pools_are_reported_per_user(bench):
    root, report = bench
    for row in report["tuning"]:
        assert [step for step, *_ in row["base"]["curve"]] == [0, 1, 2, 3]
        assert row["target_loss"] == min(loss for _, loss, _ in row["base"]["curve"])
        assert row["base_reaches"][0] == min(row["base"]["curve"], key=lambda point: point[1])[0]
    for row in report["pools"]:
        assert row["base_pool"]["perplexity"] > 0
    md = (root / "out" / "report.md").read_text()
    for heading in ("selection accuracy", "catalog size", "never from scratch", "base's pool"):
        assert heading in md
    assert report["plots"] == ["confusion.png", "explanations.png", "cost_vs_catalog.png", "fine_tuning.png"]
    for name in report["plots"]:
        assert (root / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in md


def test_a_rerun_recomputes_nothing_and_other_settings_are_refused(bench):
    root, _ = bench
    before = {p.name: p.read_text() for p in (root / "out").glob("*.json*") if p.name != "report.json"}
    run_seed_bench(root / "catalog", root / "out", SETTINGS)
    assert {p: (root / "out" / p).read_text() for p in before} == before
    from dataclasses import replace

    with pytest.raises(ValueError, match="other settings"):
        run_seed_bench(root / "catalog", root / "out", replace(SETTINGS, ft_steps=4))


def test_a_rebuilt_catalog_is_chosen_from_again_reusing_what_does_not_depend_on_it(bench, tmp_path, monkeypatch):
    import shutil

    from protocols.catalog import load_catalog
    from simulation.seeds_bench import accuracy, pools, state, tuning

    root, _ = bench
    shutil.copytree(root, tmp_path / "copy")
    catalog_dir, out = tmp_path / "copy" / "catalog", tmp_path / "copy" / "out"
    lora = LoraSettings(rank=4, alpha=8.0, steps=4, lr=0.02, batch_size=2, max_len=48)
    # other words re-explain the same seeds: another catalog for the bench, on the same base
    build_catalog_from_labels(catalog_dir, styleqa_groups(6, styles=(2, 5)), TINY, lora, styleqa_probes(2),
                              ExplainSettings(("expert", "friendly")), max_new_tokens=6)
    catalog = load_catalog(catalog_dir)
    chosen_by, tuned = [], []
    real_choose, real_tune = accuracy.choose_from_catalog, tuning._tune_curve
    for part in (accuracy, pools):
        monkeypatch.setattr(part, "choose_from_catalog", lambda base, history, *a: chosen_by.append(history[0].user)
                            or real_choose(base, history, *a))
    monkeypatch.setattr(tuning, "_tune_curve", lambda source, *a: tuned.append(source) or real_tune(source, *a))
    report = run_seed_bench(catalog_dir, out, SETTINGS)

    rows = [json.loads(line) for line in (out / "selection.jsonl").read_text().splitlines()]
    first, again = rows[: len(rows) // 2], rows[len(rows) // 2:]
    assert len(again) == report["accuracy"]["users"] == 4  # every user chosen for again, appended
    for before, now in zip(first, again):
        assert now["user"] == before["user"] and now["catalog"] == state.catalog_fingerprint(catalog)
        assert now["xpert"]["direction"] == before["xpert"]["direction"]  # reused, not generated again
        assert set(now["xpert"]["distances"]) == {e.name for e in catalog.entries}
    # no bench user's own style is computed again; the pool sharers choose again, and train on the new choice
    assert not {u.user for u in bench_users([2, 5], SETTINGS, SETTINGS.users_per_style)} & set(chosen_by)
    assert {u.user for u in bench_users([2, 5], SETTINGS, 1, skip=SETTINGS.users_per_style)} <= set(chosen_by)
    assert catalog.base not in tuned  # the base's fine-tuning curves depend on the base only
    assert json.loads((out / "pools.json").read_text())["catalog"] == state.catalog_fingerprint(catalog)


def test_bench_users_never_touch_the_rows_seeds_are_built_from():
    seeds = {r.input for rows in styleqa_groups(64, styles=(3,)).values() for r in rows}
    users = bench_users([3], SeedBenchSettings(), 4)
    assert not seeds & {r.input for u in users for r in u.history + u.test}
    assert len({r.input for u in users for r in u.history}) == 4 * 16


def test_the_command_line_refuses_a_missing_catalog_and_unknown_parts(tmp_path, capsys):
    from simulation.cli import main

    assert main(["seeds", "bench", "--catalog", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "no seed catalog" in capsys.readouterr().err
    assert main(["seeds", "bench", "--catalog", str(tmp_path), "--parts", "accuracy,speed"]) == 2
    assert "unknown --parts speed" in capsys.readouterr().err
    assert main(["simulate", "--catalog", str(tmp_path / "none"), "--out-dir", str(tmp_path / "run"),
                 "--seed-model", "tiny-random", "--users", "2", "--sharers", "1", "--newcomers", "1"]) == 2
    assert "no seed catalog" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
