"""`bouquet bench` end to end on the tiny seed: every method per target, the report, resuming, and
a fidelity classifier that never sees held-out items; with a seed catalog, every participant's own seed."""

import json
import math
from dataclasses import replace

import pytest
from conftest import tiny_catalog

from coordinator.pool import PiecePool
from coordinator.validation import RegisteredSeed, seed_shapes
from participants.privacy_policy import PrivacyPolicy
from participants.seed_loading import is_loaded
from protocols.records import PersonalRecord, save_records
from simulation.bench import run as bench_run
from simulation.bench import seeds as bench_seeds
from simulation.bench.methods import Bench
from simulation.bench.run import run_bench
from simulation.bench.settings import METHODS, BenchSettings, check_run_dir, resolve_settings
from simulation.bench.sharers import device_pieces, prepare_sharers
from simulation.bench.sweeps import sweep_values
from simulation.bench.users import split_users
from simulation.user_data import UserData
from simulation.fidelity import training_set
from simulation.styleqa import style_label

STYLES = ["ZAP!", "meh.", "Dear sir,", "lol", "KINDLY NOTE", "~~"]


def tiny_settings(root, **changes) -> BenchSettings:
    recs = [PersonalRecord(f"user{u}", f"tell me about item {i}", f"{s} item {i} is fine {s}")
            for u, s in enumerate(STYLES) for i in range(9)]
    save_records(recs, root / "data.jsonl")
    # three sharers sending all their pieces, so that every position has candidates (the policy's cap: below)
    return resolve_settings(**{"data": str(root / "data.jsonl"), "seed_model": "tiny-random", "sharers": 3,
                               "targets": 2, "history": 6, "test": 3, "lora_steps": 4, "gate_steps": 2,
                               "lora_rank": 4, "lora_alpha": 8.0, "max_len": 48, "max_new_tokens": 4,
                               "max_share_ratio": 1.0} | changes)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    settings = tiny_settings(root, sweep=("top-k", "history", "mix-scale"))
    out = root / "out"
    return out, settings, run_bench(settings, out)


def method_rows(report):
    return [r for r in report["rows"] if r["kind"] == "method"]


def test_every_method_has_a_finite_row_per_target_and_the_report_is_written(bench):
    out, _, report = bench
    for name in ("report.json", "report.md", "quality_vs_cost.png", "per_user_perplexity.png", "sweep_top-k.png",
                 "sweep_history.png", "sweep_mix-scale.png", "settings.json", "sharers.json"):
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
    assert [t["met"] in (True, False) for t in report["targets"]] == [True] * 9  # 7 goals, the gates check, the oracle
    sharers = json.loads((out / "sharers.json").read_text())
    assert len(sharers) == 3 and all(s["upload_bytes"] > 0 and s["train_tokens"] > 0 for s in sharers.values())


def test_costs_follow_what_each_method_does(bench):
    _, _, report = bench
    means = report["means"]
    assert means["seed"]["tokens_forward"] == 0 and means["seed"]["bytes_stored"] == 0
    assert means["oppu"]["tokens_forward"] == means["oppu"]["tokens_backward"] > 0
    assert means["perpcs"]["tokens_backward"] == 0 < means["perpcs"]["tokens_forward"]
    assert means["perpcs+ft"]["tokens_forward"] > means["perpcs"]["tokens_forward"]
    # the forward-only newcomer: more forward passes on top of perpcs's, and still no backward pass
    assert means["perpcs+zo"]["tokens_forward"] > means["perpcs"]["tokens_forward"]
    assert means["perpcs+zo"]["tokens_backward"] == 0
    # dw keeps the mix exact at top-k times the rank, so the assembled adapter is top-k times OPPU's
    growth = bench[1].top_k if bench[1].mix == "dw" else 1
    assert means["perpcs"]["bytes_stored"] < means["perpcs"]["bytes_adapter"] == growth * means["oppu"]["bytes_adapter"]
    # lorahub: forward passes only, one over the history per candidate after the uniform start
    assert means["lorahub"]["tokens_backward"] == 0 < means["lorahub"]["tokens_forward"]
    rows = method_rows(report)
    for r in (r for r in rows if r["method"] == "lorahub"):
        assert r["detail"]["evaluations"] == bench[1].lorahub_steps + 1
        assert r["detail"]["loss"] <= r["detail"]["uniform_loss"]
    # rag: no adaptation; perpcs+rag: perpcs's own cost; the prompts change what both score
    assert means["rag"]["tokens_forward"] == means["rag"]["tokens_backward"] == means["rag"]["bytes_adapter"] == 0
    for k in ("tokens_forward", "bytes_stored", "bytes_adapter", "bytes_downloaded"):
        assert means["perpcs+rag"][k] == means["perpcs"][k]
    assert means["rag"]["perplexity"] != means["seed"]["perplexity"]
    assert means["perpcs+rag"]["perplexity"] != means["perpcs"]["perplexity"]
    assert report["gain_recovery"]["seed"] == 0 and report["cost_ratios"]["oppu"]["tokens"] == 1


def test_sweep_points_at_the_run_settings_reproduce_perpcs(bench):
    _, settings, report = bench
    perpcs = report["means"]["perpcs"]["perplexity"]
    sweeps = report["sweeps"]
    assert [p["value"] for p in sweeps["top-k"]] == sweep_values("top-k", settings)
    assert {p["value"]: p["perplexity"] for p in sweeps["top-k"]}[settings.top_k] == pytest.approx(perpcs, rel=1e-6)
    assert {p["value"]: p["perplexity"] for p in sweeps["mix-scale"]}[settings.mix_scale] == pytest.approx(perpcs,
                                                                                                          rel=1e-6)
    assert len({p["perplexity"] for p in sweeps["mix-scale"]}) == len(sweeps["mix-scale"])  # the scale acts
    assert sweeps["history"][-1]["value"] == settings.history
    assert sweeps["history"][-1]["perplexity"] == pytest.approx(perpcs, rel=1e-6)


def test_a_rerun_recomputes_nothing_and_other_settings_are_refused(bench):
    out, settings, _ = bench
    before = (out / "results.jsonl").read_text()
    run_bench(settings, out)
    assert (out / "results.jsonl").read_text() == before
    with pytest.raises(ValueError, match="other settings.*lora_steps: 4 there, 5 now"):
        run_bench(replace(settings, lora_steps=5), out)


def test_a_rerun_may_change_only_settings_no_stored_result_read(tmp_path):
    ran = BenchSettings(methods=("seed", "perpcs"), zo_lr=0.04, rag_k=4)
    check_run_dir(tmp_path, ran)
    # no zeroth-order method or rag ran there: their settings are free, and the new ones are recorded
    check_run_dir(tmp_path, replace(ran, methods=("perpcs", "perpcs+zo"), zo_lr=0.01, rag_k=2))
    assert json.loads((tmp_path / "settings.json").read_text())["zo_lr"] == 0.01
    # now perpcs+zo's results depend on zo-lr
    with pytest.raises(ValueError, match="zo_lr: 0.01 there, 0.02 now"):
        check_run_dir(tmp_path, replace(ran, zo_lr=0.02))
    # a zeroth-order trainer reads them for every method
    other = tmp_path / "zo"
    check_run_dir(other, replace(ran, trainer="zeroth-order"))
    with pytest.raises(ValueError, match="zo_lr"):
        check_run_dir(other, replace(ran, trainer="zeroth-order", zo_lr=0.02))


def test_a_changed_judge_rescores_the_stored_generations_without_rerunning(bench):
    out, settings, _ = bench
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    stale = [r | {"fidelity": -1.0, "judge": "old"} if r["kind"] == "method" else r for r in rows]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    run_bench(settings, out)
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r.get("fidelity") for r in again] == [r.get("fidelity") for r in rows]
    assert all(r["judge"] != "old" for r in again if r["kind"] == "method")


def test_sharers_send_what_their_default_policy_allows(tmp_path, tiny_seed):
    settings = replace(tiny_settings(tmp_path), max_share_ratio=resolve_settings().max_share_ratio)
    assert settings.max_share_ratio == PrivacyPolicy().max_share_ratio < 1 == settings.share_ratio
    sharers, _ = split_users(settings)
    with PiecePool(tmp_path / "pool") as pool:
        pool.register_seed(RegisteredSeed(tiny_seed.descriptor.seed_id, tiny_seed.descriptor.content_hash,
                                          seed_shapes(tiny_seed.descriptor.path)))
        prepare_sharers(tiny_seed, settings, sharers, tmp_path, pool, settings.sent_share_ratio())
        in_pool = {pid for pid, *_ in pool.gates(tiny_seed.descriptor.seed_id)}
    full = {u.user: device_pieces(tmp_path, u.user) for u in sharers}
    for pieces in full.values():
        assert len({p.piece_id for p in pieces} & in_pool) == round(settings.max_share_ratio * len(pieces))
    bench = Bench(tiny_seed, settings, tmp_path, [u.user for u in sharers], [], full, {})
    assert {p.piece_id for p in bench.shared(len(sharers), 1.0)} == in_pool  # the sweeps draw what was sent
    assert sweep_values("share-ratio", settings) == [0.25, 0.5]
    assert sweep_values("share-ratio", replace(settings, max_share_ratio=1.0)) == [0.25, 0.5, 0.75, 1.0]


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


def test_styleqa_split_gives_every_target_a_sharer_of_its_style(styleqa_folder):
    sharers, targets = split_users(BenchSettings(data=str(styleqa_folder), sharers=9, targets=4, history=2, test=1))
    assert len(sharers) == 9 and len(targets) == 4
    assert not {u.user for u in sharers} & {u.user for u in targets}
    assert {style_label(t.user) for t in targets} <= {style_label(s.user) for s in sharers}


def test_presets_fill_in_and_flags_override():
    s = resolve_settings("small", data="healthtweets", lora_steps=4)
    assert (s.sharers, s.targets, s.lora_steps, s.ft_steps, s.max_len) == (6, 4, 4, 1, 96)
    assert resolve_settings("small", data="styleqa").max_len == 128
    for bad, message in [({"top_k": 4, "shortlist": 2}, "shortlist"), ({"sweep": ("depth",)}, "unknown sweep"),
                         ({"share_ratio": 0.0}, "share-ratio"), ({"targets": 0}, "targets")]:
        with pytest.raises(ValueError, match=message):
            resolve_settings(**bad)


# --- with a seed catalog ------------------------------------------------------------------------------------


class Forced:
    """The real on-device choice (XPerT against the base) runs for everyone, then the test overrides the seed it
    picks (None = the base), so that one run covers a catalog seed, a kept base, and a fallback. It also counts
    the choices made and the seeds loaded, in order."""

    def __init__(self, monkeypatch, seeds: dict[str, str | None]):
        self.seeds, self.events = seeds, []  # ("choose", user) and ("load", source), in order
        choose, load = bench_seeds.choose_from_catalog, bench_run.load_seed

        def forced_choice(base, records, catalog, max_distance=math.inf):
            selection, own = choose(base, records, catalog, max_distance)
            self.events.append(("choose", records[0].user))
            name = self.seeds[records[0].user]
            return replace(selection, seed_id=name, distance=selection.distances[name] if name else math.inf), own

        def counted_load(source, *args, **kwargs):
            self.events.append(("load", source))
            return load(source, *args, **kwargs)

        monkeypatch.setattr(bench_seeds, "choose_from_catalog", forced_choice)
        monkeypatch.setattr(bench_run, "load_seed", counted_load)

    @property
    def chosen(self) -> list[str]:
        return [what for kind, what in self.events if kind == "choose"]

    @property
    def loaded(self) -> list[str]:
        return [what for kind, what in self.events if kind == "load"]


def catalog_run(root, picks):
    """A catalog bench where sharers and targets pick the seeds `picks` names by role and position."""
    catalog = tiny_catalog(root / "catalog")
    settings = tiny_settings(root, catalog=str(catalog.folder))
    sharers, targets = split_users(settings)
    seeds = dict(zip([u.user for u in sharers + targets], picks["sharers"] + picks["targets"], strict=True))
    with pytest.MonkeyPatch.context() as mp:
        forced = Forced(mp, seeds)
        report = run_bench(settings, root / "out")
    return root / "out", settings, catalog, sharers, targets, report, forced


@pytest.fixture(scope="module")
def with_catalog(tmp_path_factory):
    # the second target picks "formal", which no sharer picked: it moves to the nearest seed that has sharers
    return catalog_run(tmp_path_factory.mktemp("catalog"),
                       {"sharers": ["zappy", "zappy", None], "targets": ["zappy", "formal"]})


def test_with_a_catalog_every_participant_picks_its_seed_first(with_catalog):
    out, _, _, sharers, targets, report, forced = with_catalog
    users = [u.user for u in sharers + targets]
    saved = json.loads((out / "selections.json").read_text())
    assert sorted(saved["users"]) == sorted(users) == sorted(forced.chosen)
    assert [saved["users"][u]["seed"] for u in users] == ["zappy", "zappy", "base", "zappy", "formal"]
    assert [saved["users"][u]["role"] for u in users] == ["sharer"] * 3 + ["target"] * 2
    for sel in saved["users"].values():
        assert "your data reads as" in sel["reason"] and sel["seconds"] > 0
        assert (sel["distance"] is None) == (sel["seed"] == "base")
    assert report["seeds"]["participants"].keys() == set(users)
    md = (out / "report.md").read_text()
    assert "## seed choice" in md and all(f"| {u} |" in md for u in users)
    last_choice = max(i for i, (kind, _) in enumerate(forced.events) if kind == "choose")
    first_catalog_load = min(i for i, (kind, what) in enumerate(forced.events)
                             if kind == "load" and what != "tiny-random")
    assert last_choice < first_catalog_load  # everyone chose before any catalog seed was loaded


def test_sharers_share_into_the_pool_of_their_seed(with_catalog):
    out, _, catalog, sharers, _, report, _ = with_catalog
    zappy, formal = "catalog:zappy", "catalog:formal"  # a catalog seed's id: its name, never a path
    with PiecePool(out / "pool") as pool:
        in_pool = {seed: {pid for pid, *_ in pool.gates(seed)} for seed in (zappy, formal, "tiny-random")}
    for u, seed in zip(sharers, [zappy, zappy, "tiny-random"], strict=True):
        pieces = device_pieces(out, u.user)
        assert {p.seed_id for p in pieces} == {seed}
        assert {p.piece_id for p in pieces} <= in_pool[seed]  # share ratio 1: every piece is shared
    assert in_pool[formal] == set()
    assert report["seeds"]["pool_pieces"] == {"zappy": len(in_pool[zappy]), "base": len(in_pool["tiny-random"])}


def test_a_targets_methods_run_on_its_seed_or_the_nearest_seed_with_sharers(with_catalog):
    out, _, catalog, sharers, targets, report, forced = with_catalog
    rows = method_rows(report)
    assert all("seed" in r for r in report["rows"])
    on_zappy, moved = targets
    for target in targets:
        assert {(r["method"], r["seed"]) for r in rows if r["target"] == target.user} == {(m, "zappy") for m in METHODS}
    # retrieval looks only among the sharers of the target's seed
    nearest = {r["target"]: r["detail"]["sharer"] for r in rows if r["method"] == "retrieval"}
    assert set(nearest.values()) <= {sharers[0].user, sharers[1].user}
    oppu = json.loads((out / "adapters" / on_zappy.user / "oppu" / "adapter_config.json").read_text())
    assert oppu["base_model_name_or_path"] == "catalog:zappy"
    parts = report["seeds"]["participants"]
    assert parts[on_zappy.user]["ran_on"] == "zappy"
    assert parts[moved.user]["ran_on"] == "zappy (fallback: no sharer on formal)"
    assert not is_loaded(catalog.seed_source("zappy"))  # dropped once its targets were done
    assert forced.loaded.count(catalog.seed_source("zappy")) == 2  # its sharers, then its targets


def test_a_catalog_rerun_chooses_and_computes_nothing_again(with_catalog):
    out, settings, *_, forced = with_catalog
    before = {name: (out / name).read_text() for name in ("results.jsonl", "selections.json", "sharers.json")}
    with pytest.MonkeyPatch.context() as mp:
        again = Forced(mp, forced.seeds)
        run_bench(settings, out)
    assert {name: (out / name).read_text() for name in before} == before
    assert again.chosen == [] and again.loaded == ["tiny-random"]  # no catalog seed is even loaded


def test_targets_run_on_the_base_when_no_sharer_chose_a_catalog_seed(tmp_path):
    out, _, _, _, targets, report, _ = catalog_run(
        tmp_path, {"sharers": [None] * 3, "targets": ["formal", "zappy"]})
    assert {(r["target"], r["seed"]) for r in method_rows(report)} == {(t.user, "base") for t in targets}
    parts = report["seeds"]["participants"]
    assert [parts[t.user]["ran_on"] for t in targets] == ["base (fallback: no sharer on formal)",
                                                          "base (fallback: no sharer on zappy)"]


def test_a_catalog_of_another_base_and_sweeps_with_a_catalog_are_refused(with_catalog, tmp_path):
    _, settings, catalog, *_ = with_catalog
    other = tmp_path / "other"
    other.mkdir()
    (other / "catalog.json").write_text(json.dumps(catalog.to_dict() | {"base_hash": "0" * 64}))
    with pytest.raises(ValueError, match=r"built on 'tiny-random' \(weights 000000000000…\), not on --seed-model"):
        run_bench(replace(settings, catalog=str(other)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="without --catalog"):
        replace(settings, sweep=("share-ratio",))


# --- rotating folds -------------------------------------------------------------------------------------------


def test_rotating_folds_make_every_user_a_target_with_the_others_as_sharers(tmp_path):
    settings = tiny_settings(tmp_path, rotate=True, targets=4, sharers=2, gate_objective="contrast", mix="dw",
                             methods=("seed", "oppu", "retrieval", "random", "perpcs"))
    report = run_bench(settings, tmp_path / "out")
    rows = method_rows(report)
    assert len(report["targets_users"]) == 4 and len(report["sharers"]) == 4  # everyone trains once
    assert sorted((r["target"], r["method"]) for r in rows) == sorted(
        (t, m) for t in report["targets_users"] for m in settings.methods)
    users = report["targets_users"]
    for i, t in enumerate(users):
        oracle = next(r for r in report["rows"] if r["kind"] == "oracle" and r["user"] == t)
        assert sorted(oracle["perplexity_by_sharer"]) == sorted(users[(i + j) % 4] for j in (1, 2))
        retrieval = next(r for r in rows if r["target"] == t and r["method"] == "retrieval")
        assert retrieval["detail"]["sharer"] in oracle["perplexity_by_sharer"]  # never its own adapter
        oppu = next(r for r in rows if r["target"] == t and r["method"] == "oppu")
        assert oppu["tokens_backward"] == report["sharers"][t]["lora_tokens"]  # its own adapter, reused
    paired = report["paired"]
    assert set(paired) == {"random", "retrieval", "oppu", "seed"} and all(c["n"] == 4 for c in paired.values())
    gates = [r for r in report["rows"] if r["kind"] == "gates"]
    assert len(gates) == 4 and all(r["chance_top1"] == pytest.approx(1 / 4) for r in gates)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## perpcs against each method, target by target" in md and "## the gates' own check" in md
    assert "## oracle" in md
    with pytest.raises(ValueError, match="must be below --targets"):
        replace(settings, sharers=4)

    # methods added on resume: the rows there are kept, the new ones reuse the pool and the saved perpcs adapters
    before = (tmp_path / "out" / "results.jsonl").read_text()
    more = replace(settings, methods=settings.methods + ("lorahub", "rag", "perpcs+rag"))
    report = run_bench(more, tmp_path / "out")
    assert (tmp_path / "out" / "results.jsonl").read_text().startswith(before)
    rows = method_rows(report)
    assert len(rows) == 4 * 8 and {"lorahub", "rag", "perpcs+rag"} <= set(report["paired"])
    for i, t in enumerate(users):
        mine = {r["method"]: r for r in rows if r["target"] == t}
        fold = {users[(i + j) % 4] for j in (1, 2)}
        assert set(mine["lorahub"]["detail"]["sharer_weights"]) == fold  # never its own adapter
        assert mine["perpcs+rag"]["tokens_forward"] == mine["perpcs"]["tokens_forward"]


def test_a_run_folder_from_before_mix_norm_resumes_only_with_the_mean_it_ran_with(tmp_path):
    old = BenchSettings(mix_norm="mean").to_json()
    del old["mix_norm"]  # written before the setting existed, when every mix was the mean
    (tmp_path / "settings.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="mix_norm: 'mean' there, 'pieces' now"):
        check_run_dir(tmp_path, BenchSettings(mix_norm="pieces"))
    check_run_dir(tmp_path, BenchSettings())
    assert json.loads((tmp_path / "settings.json").read_text())["mix_norm"] == "mean"
