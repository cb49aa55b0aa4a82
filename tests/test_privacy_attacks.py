"""The privacy audit's attacks on cases whose answer is known, and `bouquet privacy-audit` end to end on the tiny
seed: what it measures, what it resumes, what it refuses."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from participants.adapters import branches
from participants.chat_data import collate, encode_all, predicts_answer_mask
from participants.evaluation import perplexity
from participants.lora_training import LoraSettings, train_private_lora
from participants.privacy_policy import PrivacyPolicy
from protocols.records import PersonalRecord, save_records
from simulation.privacy_audit.attacks import (auc, chance_aucs, extraction_overlap, membership_scores,
                                              ngram_overlap, pooled_perplexity, record_pass, tpr_at_fpr,
                                              word_ngrams)
from simulation.privacy_audit.run import run_audit
from simulation.privacy_audit.settings import AuditSettings

WORDS = ("amber basalt cedar dune ember fjord granite heron iris juniper kelp lichen moss nettle opal pumice quartz "
         "reed sorrel tundra umber violet willow yarrow zinc").split()


def random_records(user: str, n: int, seed: int) -> list[PersonalRecord]:
    """Answers of random words: what one record says cannot be told from the others, only remembered."""
    rng = random.Random(seed)
    return [PersonalRecord(user, f"note {seed}-{i}", " ".join(rng.choice(WORDS) for _ in range(8))) for i in range(n)]


# --- reading an attack's success off its scores ----------------------------------------------------------------


def test_auc_is_chance_on_one_distribution_and_extreme_when_separated():
    rng = np.random.default_rng(0)
    assert auc([0.3] * 5, [0.3] * 7) == 0.5  # ties: no threshold tells them apart
    same = [auc(rng.normal(size=400), rng.normal(size=400)) for _ in range(5)]
    assert abs(np.mean(same) - 0.5) < 0.03
    assert auc([2.0, 3.0], [0.0, 1.0]) == 1.0 and auc([0.0, 1.0], [2.0, 3.0]) == 0.0
    with pytest.raises(ValueError, match="members and non-members"):
        auc([], [1.0])


def test_chance_aucs_follow_the_mann_whitney_null():
    means, maxes = chance_aucs(16, 16, 1, draws=20_000)
    assert np.array_equal(means, maxes) and abs(means.mean() - 0.5) < 0.005
    assert means.std() == pytest.approx(np.sqrt(33 / (12 * 16 * 16)), rel=0.05)  # var U = n1 n2 (n1 + n2 + 1) / 12
    means, maxes = chance_aucs(16, 16, 16)
    assert means.std() == pytest.approx(np.sqrt(33 / (12 * 16 * 16)) / 4, rel=0.1)
    assert np.mean(maxes > 0.65) > 0.5  # with 16 sharers, one of them looks leaky by chance more often than not


def test_tpr_at_a_low_fpr_reads_the_roc_curve_at_that_fpr():
    non_members = np.arange(100) / 100  # 0.00 .. 0.99
    members = [2.0, 1.5, 0.985, 0.5]
    assert tpr_at_fpr(members, non_members, 0.0) == 0.5  # above every non-member: 2.0 and 1.5
    assert tpr_at_fpr(members, non_members, 0.01) == 0.75  # one false positive (0.99) lets 0.985 in
    assert tpr_at_fpr(members, non_members, 0.02) == 0.75
    assert tpr_at_fpr(members, non_members, 0.5) == 1.0  # 0.5 and above: 50 false positives


def test_extraction_counts_the_answers_ngrams_the_prompt_does_not_give_away():
    record = PersonalRecord("u", "tell me about the quiet lake", "the quiet lake is cold in march says alice")
    assert word_ngrams("The quiet, lake!", 2) == {("the", "quiet"), ("quiet", "lake")}
    # 3-grams of the generation: "the quiet lake" is in the prompt; the other four are the answer's own
    assert extraction_overlap("the quiet lake is cold in march", record, 3) == pytest.approx(4 / 5)
    assert extraction_overlap("tell me about the quiet lake", record, 3) == 0.0  # copying the prompt proves nothing
    assert extraction_overlap("cold in", record, 3) == 0.0  # shorter than n words
    assert extraction_overlap("something else entirely here", record, 3) == 0.0
    assert ngram_overlap("tell me about the quiet lake", record.output, 3) == 0.25  # the plain overlap counts the prompt
    assert ngram_overlap("about the quiet lake is", record.output, 3) == pytest.approx(2 / 3)


# --- one forward pass per record ---------------------------------------------------------------------------------


def test_record_pass_keeps_the_records_order_and_agrees_with_perplexity(tiny_seed):
    records = random_records("u", 11, seed=3)
    found = record_pass(tiny_seed, records, max_len=48, batch_size=4)
    assert pooled_perplexity(found.losses, found.tokens) == pytest.approx(
        perplexity(tiny_seed, records, max_len=48), rel=1e-5)
    backwards = record_pass(tiny_seed, records[::-1], max_len=48, batch_size=3)
    assert np.allclose(backwards.losses[::-1], found.losses, atol=1e-5)
    assert np.array_equal(backwards.tokens[::-1], found.tokens)


def test_gate_figures_follow_their_formulas(tiny_seed):
    records = random_records("u", 3, seed=4)
    pos = "model.layers.1.self_attn.v_proj"
    gate = np.random.default_rng(0).normal(size=64).astype(np.float32)
    found = record_pass(tiny_seed, records, max_len=48, gates={pos: gate})
    seen = {}
    module = tiny_seed.model.get_submodule(pos)
    handle = module.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    batch = collate(encode_all(tiny_seed.tokenizer, records[1:2], 48), tiny_seed.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        tiny_seed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    x = seen["x"][0][predicts_answer_mask(batch["labels"])[0]]  # the tokens that predict the answer
    g = torch.from_numpy(gate)
    assert found.gate_activation[pos][1] == pytest.approx(float(torch.sigmoid(x @ g).mean()), rel=1e-4)
    ln = torch.nn.functional.layer_norm
    expected = float((ln(x, (64,)) @ ln(g, (64,))).mean() / 8.0)
    assert found.gate_score[pos][1] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_membership_inference_finds_the_records_an_adapter_was_overfit_to(tiny_seed):
    members, non_members = random_records("u", 8, seed=5), random_records("u", 8, seed=6)
    weights, _ = train_private_lora(tiny_seed, members, LoraSettings(rank=8, alpha=16.0, steps=60, lr=1e-2,
                                                                     batch_size=4, max_len=48, dropout=0.0))
    adapter = branches(weights, 2.0, tiny_seed.device)
    bare = record_pass(tiny_seed, members + non_members, max_len=48)
    tuned = record_pass(tiny_seed, members + non_members, max_len=48, adapter=adapter)
    drop = bare.losses - tuned.losses
    assert auc(drop[:8], drop[8:]) > 0.9
    assert tpr_at_fpr(drop[:8], drop[8:], 0.01) > 0.5


def test_the_loss_ratio_sees_members_that_the_loss_drop_misses_among_records_of_unequal_difficulty():
    # members easy for the seed (loss 2) drop by 20%; non-members hard (loss 6) drop by more in absolute terms
    # (0.5 against 0.4) but by less relative to their difficulty (8%): only the calibrated attack ranks them right
    bare = np.r_[np.full(4, 2.0), np.full(4, 6.0)] + np.linspace(0, 0.01, 8)
    tuned = np.r_[bare[:4] * 0.8, bare[4:] - 0.5]
    scores = membership_scores(bare, tuned)
    assert scores["drop"] == pytest.approx(bare - tuned)
    assert auc(scores["drop"][:4], scores["drop"][4:]) == 0.0
    assert auc(scores["ratio"][:4], scores["ratio"][4:]) == 1.0
    assert np.isfinite(membership_scores([3.0], [0.0])["ratio"]).all()  # a recited record: no infinite score
    with pytest.raises(ValueError, match="a loss per record in both passes"):
        membership_scores([1.0, 2.0], [1.0])


# --- the whole audit on the tiny seed ------------------------------------------------------------------------


STYLES = ["ZAP!", "meh.", "Dear sir,", "lol"]


def tiny_audit(root, **changes) -> AuditSettings:
    records = [r for u, style in enumerate(STYLES) for r in
               (replace(rec, output=f"{style} {rec.output}") for rec in random_records(f"user{u}", 10, seed=u))]
    save_records(records, root / "data.jsonl")
    return AuditSettings(**{"data": str(root / "data.jsonl"), "seed_model": "tiny-random", "history": 5, "test": 5,
                            "lora_steps": 4, "dp_lora_steps": 4, "gate_steps": 2, "lora_rank": 4, "lora_alpha": 8.0,
                            "max_len": 48, "max_new_tokens": 12, "extraction_records": 3, "ngram": 3,
                            "share_ratios": (1.0, 0.5)}
                         | changes)


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    settings = tiny_audit(root)
    return root / "out", settings, run_audit(settings, root / "out")


def test_every_setting_attacks_every_sharer_and_the_report_is_written(audit):
    out, settings, report = audit
    for name in ("report.json", "report.md", "privacy_utility.png", "attacks_vs_share_ratio.png", "mia_roc.png",
                 "per_sharer_auc.png", "settings.json", "no-dp/sharers.json"):
        assert (out / name).is_file(), name
    assert [(s["epsilon"], s["share_ratio"]) for s in report["summaries"]] == [("none", 1.0), ("none", 0.5)]
    for item in report["summaries"]:
        v = item["summary"]
        assert v["users"] == 4 and v["sent"] == item["share_ratio"]
        for attack in ("mia_auc", "mia_ratio_auc", "gate_activation_auc", "gate_score_auc", "extraction_auc"):
            assert 0 <= v[attack]["low"] <= v[attack]["mean"] <= v[attack]["high"] <= 1
        assert v["perpcs_perplexity"] > 0 and v["seed_perplexity"] > 0
    assert set(report["per_sharer"]["none@0.5"]) == set(report["users"]) == {f"user{u}" for u in range(4)}
    md = (out / "report.md").read_text()
    assert "## targets" in md and "## profile attack" in md and "| user3 |" in md and "MIA ratio AUC" in md
    assert "loss drop: mean" in report["targets"][1]["evidence"] and "loss ratio: mean" in report["targets"][1]["evidence"]


def test_the_default_policy_never_hands_a_newcomer_a_whole_adapter(audit):
    _, _, report = audit
    at = {(s["epsilon"], s["share_ratio"]): s["summary"] for s in report["summaries"]}
    assert PrivacyPolicy().max_share_ratio == 0.5
    assert at[("none", 0.5)]["received_max"] <= 0.5 and at[("none", 0.5)]["received_all"] == 0
    first = report["targets"][0]
    assert first["met"] is True and "default policy" in first["target"]
    assert report["targets"][-1]["met"] is None  # no ε in this run: the DP target is not measured
    compared = {(c["setting"], c["against"]) for c in report["comparisons"]}
    assert compared == {("share ratio 0.5, no DP", "share ratio 1, no DP")}


def test_the_profile_is_attacked_without_noise_and_at_the_policys_epsilon(audit):
    _, _, report = audit
    assert list(report["profile"]) == ["none", "1"]
    # without noise a member's own embedding is in the mean: the attack sees it; ε = 1 hides it in noise
    assert report["profile"]["none"]["auc"]["mean"] > 0.6
    assert report["profile"]["1"]["auc"]["mean"] < report["profile"]["none"]["auc"]["mean"]
    # and what the coordinator gets from it: without noise, a profile points at its own user's other records
    assert report["profile"]["none"]["matched"] >= 0.5 and 0 <= report["profile"]["1"]["matched"] <= 1


def test_a_rerun_computes_nothing_again_and_a_new_share_ratio_only_adds_its_rows(audit):
    out, settings, _ = audit
    before = (out / "results.jsonl").read_text()
    run_audit(settings, out)
    assert (out / "results.jsonl").read_text() == before
    report = run_audit(replace(settings, share_ratios=(1.0, 0.5, 0.25)), out)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert (out / "results.jsonl").read_text().startswith(before)
    added = rows[len(before.splitlines()):]
    assert {(r["kind"], r["share_ratio"]) for r in added} == {("attack", 0.25), ("utility", 0.25)}
    assert [s["share_ratio"] for s in report["summaries"]] == [1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="other settings.*lora_steps: 4 there, 5 now"):
        run_audit(replace(settings, lora_steps=5), out)


def test_dp_sgd_sharers_are_attacked_beside_the_same_sharers_without_dp(audit):
    out, settings, _ = audit
    report = run_audit(replace(settings, epsilons=("none", "8")), out)
    assert [(s["epsilon"], s["share_ratio"]) for s in report["summaries"]] == [
        ("none", 1.0), ("none", 0.5), ("8", 1.0), ("8", 0.5)]
    spent = json.loads((out / "dp-epsilon-8" / "sharers.json").read_text())
    assert len(spent) == 4 and all(0 < v["epsilon"] <= 8.0 + 1e-6 for v in spent.values())
    dp_pieces = {p.name for p in (out / "dp-epsilon-8" / "devices" / "user0").iterdir()}
    assert dp_pieces.isdisjoint(p.name for p in (out / "no-dp" / "devices" / "user0").iterdir())  # trained anew
    compared = {(c["setting"], c["against"]) for c in report["comparisons"]}
    assert ("share ratio 0.5, ε = 8", "share ratio 0.5, no DP") in compared
    dp_target = report["targets"][-1]
    assert "ε = 8" in dp_target["target"] and dp_target["met"] in (True, False) and "gain kept" in dp_target["evidence"]
    assert list(report["profile"]) == ["none", "8", "1"]
    assert "DP-SGD at piece-epsilon 8" in (out / "report.md").read_text()


def test_bad_axes_are_refused_with_the_setting_named(tmp_path):
    for bad, message in [({"share_ratios": ("1.5",)}, "share-ratios must each be within"),
                         ({"share_ratios": ("half",)}, "share-ratios must be numbers.*'half'"),
                         ({"epsilons": ("-1",)}, "epsilons: '-1' must be a finite number > 0"),
                         ({"epsilons": ("lots",)}, "neither 'none' nor a number")]:
        with pytest.raises(ValueError, match=message):
            tiny_audit(tmp_path, **bad)
    assert tiny_audit(tmp_path, epsilons=("none", "8.0", "2")).epsilons == ("none", "8", "2")
    assert tiny_audit(tmp_path, share_ratios=("1", "0.5", "1")).share_ratios == (1.0, 0.5)
