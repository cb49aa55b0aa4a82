"""The pieces of issue 16: paired statistics, the gates' own check, contrastive gates, and mixing updates (B A)
rather than A and B apart."""

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_assembly import Q0, make_piece

from participants.assembly import AssemblySettings, assemble, random_assembly
from participants.feature_gates import (answer_features, fit_gate_directions, train_centroid_gates,
                                        train_contrast_gates)
from protocols.records import PersonalRecord
from protocols.settings import ParticipantSettings
from simulation.bench.gate_check import own_piece_ranks, summarise_gates
from simulation.bench.paired import paired_comparison
from simulation.bench.users import fold_sharers
from simulation.user_data import UserData


def test_paired_comparison_reads_the_sign_and_size_of_the_differences():
    users = [f"u{i}" for i in range(12)]
    other = {u: 10.0 for u in users}
    better = {u: 9.0 - 0.01 * i for i, u in enumerate(users)}
    c = paired_comparison(better, other)
    assert c["n"] == 12 and c["lower"] == 12 and c["higher"] == 0
    assert c["ci_low"] <= c["mean_diff"] <= c["ci_high"] < 0
    assert c["wilcoxon_p"] < 0.001 and c["sign_p"] == pytest.approx(2 * 0.5 ** 12)
    mixed = {u: 10.0 + (0.5 if i % 2 else -0.5) for i, u in enumerate(users)}
    c = paired_comparison(mixed, other)
    assert c["ci_low"] < 0 < c["ci_high"] and c["wilcoxon_p"] > 0.5 and c["sign_p"] == 1.0
    assert paired_comparison({"a": 1.0}, {"a": 2.0}) is None  # one pair is no test


def test_every_user_is_left_out_of_its_own_fold():
    users = [UserData(f"u{i}", [], []) for i in range(5)]
    folds = [[u.user for u in fold_sharers(users, i, 3)] for i in range(5)]
    assert folds[0] == ["u1", "u2", "u3"] and folds[4] == ["u0", "u1", "u2"]
    assert all(f"u{i}" not in fold for i, fold in enumerate(folds))
    with pytest.raises(ValueError, match="1 to 4 sharers"):
        fold_sharers(users, 0, 5)


def _features(seed, records):
    feats, tokens = answer_features(seed, records, [Q0], max_len=48)
    return feats[Q0], tokens


def test_contrast_gates_point_from_generic_answers_to_the_sharers(tiny_seed, make_records):
    own = make_records("a", "ZAP!", 6)
    generic = [PersonalRecord("a", r.input, "it is a thing") for r in own]
    f_own, tokens = _features(tiny_seed, own)
    f_gen, _ = _features(tiny_seed, generic)
    assert f_own.shape == (6, 64) and tokens > 0
    for steps in (0, 50):  # the difference of means, and logistic regression from it
        g = torch.from_numpy(fit_gate_directions({Q0: f_own}, {Q0: f_gen}, steps, 0.05)[Q0])
        g = torch.nn.functional.layer_norm(g, (64,))
        assert (f_own @ g).min() > (f_gen @ g).max()  # every own answer scores above every generic one
    gates, report = train_contrast_gates(tiny_seed, own, [Q0], steps=5, lr=0.01, max_len=48, max_new_tokens=4)
    assert gates[Q0].shape == (64,) and np.isfinite(gates[Q0]).all() and report.tokens > 0


def test_the_gates_check_finds_the_sharer_whose_gate_points_at_its_writing(tiny_seed, make_records):
    key = Ed25519PrivateKey.generate()
    rng = np.random.default_rng(0)
    users = {style: UserData(style, make_records(style, style, 4), make_records(style, style, 4, start=10))
             for style in ("ZAP!", "meh.", "~~")}
    plain = [PersonalRecord("x", r.input, "thing") for r in users["ZAP!"].history]
    pool = {}
    for style, u in users.items():
        own, _ = _features(tiny_seed, u.history)
        gen, _ = _features(tiny_seed, plain)
        gate = fit_gate_directions({Q0: own}, {Q0: gen}, 0, 0.0)[Q0]
        pool[style] = [make_piece(tiny_seed.descriptor, Q0, rng, key, gate=gate)]
    s = ParticipantSettings(max_len=48)
    rows = [own_piece_ranks(tiny_seed, u, pool, s) for u in users.values()]
    assert all(r["chance_top1"] == pytest.approx(1 / 3) and r["positions"] == 1 for r in rows)
    assert [r["top1"] for r in rows] == [1.0, 1.0, 1.0]
    summary = summarise_gates(rows)
    assert summary["top1_vs_chance"] == pytest.approx(3.0) and summary["below_chance"] == 0
    # untrained (equal) gates tie: they get the middle rank, which is chance, not first place
    flat = {u: [make_piece(tiny_seed.descriptor, Q0, rng, key, gate=np.zeros(64))] for u in users}
    tied = own_piece_ranks(tiny_seed, users["ZAP!"], flat, s)
    assert tied["top1"] == 0.0 and tied["mrr"] == pytest.approx(0.5)


def test_dw_mixing_is_the_weighted_sum_of_the_updates(tiny_seed, make_records):
    key = Ed25519PrivateKey.generate()
    rng = np.random.default_rng(3)
    pieces = [make_piece(tiny_seed.descriptor, Q0, rng, key) for _ in range(4)]
    history = make_records("n", "ZAP", 4)
    ab = assemble(tiny_seed, history, pieces, AssemblySettings(top_k=2, mix="ab"))
    dw = assemble(tiny_seed, history, pieces, AssemblySettings(top_k=2, mix="dw", norm="mean"))  # not rescaled
    assert dw.rank == 2 * ab.rank and dw.weights[Q0][0].shape == (8, 64)
    by_id = {p.piece_id: p for p in pieces}
    (choice,) = [c[Q0] for c in dw.choices]  # one history batch
    want = sum(w * (by_id[i].B * by_id[i].scaling) @ by_id[i].A for i, w in choice)
    A, B = dw.weights[Q0]
    np.testing.assert_allclose(B @ A, want, rtol=1e-4, atol=1e-5)
    A2, B2 = ab.weights[Q0]
    assert not np.allclose(B2 @ A2, want, atol=1e-3)  # A and B mixed apart: cross terms
    drawn = random_assembly(pieces, AssemblySettings(top_k=2, mix="dw", norm="mean"), rng_seed=0)
    (choice,) = drawn.choices
    want = sum(w * (by_id[i].B * by_id[i].scaling) @ by_id[i].A for i, w in choice[Q0])
    np.testing.assert_allclose(drawn.weights[Q0][1] @ drawn.weights[Q0][0], want, rtol=1e-4, atol=1e-5)


def test_centroid_gates_are_the_mean_answer_feature(tiny_seed, make_records):
    own = make_records("a", "ZAP!", 5)
    gates, report = train_centroid_gates(tiny_seed, own, [Q0], max_len=48)
    f, tokens = _features(tiny_seed, own)
    np.testing.assert_allclose(gates[Q0], f.mean(0).numpy(), rtol=1e-6)
    assert report.tokens == tokens > 0


def test_the_gate_phase_is_skipped_when_the_shortlist_keeps_everything_and_can_use_fewer_records(make_records):
    from participants.newcomer import gate_phase_records

    history = make_records("n", "ZAP", 10)
    gates = [(f"p{i}", Q0, 4, np.zeros(64)) for i in range(4)]
    assert gate_phase_records(history, gates, ParticipantSettings(shortlist=4)) == []
    assert gate_phase_records(history, gates, ParticipantSettings(shortlist=3)) == history
    assert gate_phase_records(history, gates, ParticipantSettings(shortlist=3, gate_records=4)) == history[-4:]


def test_tuned_oppu_picks_its_lr_and_steps_on_held_out_history(tiny_seed, make_records):
    from participants.lora_training import LoraSettings
    from simulation.bench.oppu_tuning import tune_private_lora

    base = LoraSettings(rank=4, alpha=8.0, steps=6, lr=1e-3, batch_size=2, max_len=48)
    tuned = tune_private_lora(tiny_seed, make_records("a", "ZAP!", 8), base)
    assert sorted(tuned.curves) == sorted(f"{lr:g}" for lr in (1e-3 / 3, 1e-3, 3e-3))
    assert all([s for s, _ in c] == [2, 4, 6, 8, 10, 12] for c in tuned.curves.values())  # every third, to 2x
    best = min(p for c in tuned.curves.values() for _, p in c)
    assert dict(tuned.curves[f"{tuned.lr:g}"])[tuned.steps] == best
    assert len(tuned.report.losses) == tuned.steps and tuned.tuning_tokens > tuned.report.tokens
    with pytest.raises(ValueError, match="at least 4"):
        tune_private_lora(tiny_seed, make_records("a", "ZAP!", 3), base)
