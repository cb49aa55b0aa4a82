"""DP-SGD for what a sharer sends: the accountant's noise, per-record clipping, ε in the signed pieces, and the
device policy that asks for it (participants.dp_sgd, participants.sharing, participants.privacy_policy)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from participants.chat_data import encode_all
from participants.dp_sgd import DpPlan, DpSgd, run_dp_steps, spent_epsilon, spent_epsilon_of
from participants.feature_gates import private_centroid_gates, train_centroid_gates
from participants.privacy_ledger import BudgetExceeded
from participants.privacy_policy import PolicyError, PolicyRefused, PrivacyPolicy
from participants.sharing import train_and_share
from protocols.pieces import Piece, PieceFormatError
from protocols.records import PersonalRecord
from protocols.settings import ParticipantSettings, from_config, key
from test_privacy_policy import device_with, task_identity  # noqa: F401 (a fixture)

TINY_SHARE = ParticipantSettings(seed_model="tiny-random", lora_rank=2, lora_alpha=4.0, lora_steps=3, gate_steps=2,
                                 batch_size=2, dp_lora_steps=4, dp_batch_size=3, max_len=32, share_ratio=0.5)


def new_key():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def records(n: int = 6) -> list[PersonalRecord]:
    return [PersonalRecord("ann", f"tell me about {i}", f"ann says {i} is grand") for i in range(n)]


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_the_plan_spends_at_most_its_epsilon_and_more_epsilon_means_less_noise():
    plans = {eps: DpSgd(eps).plan(records=16, batch_size=4, steps=50, generator=generator(0)) for eps in (1, 2, 8)}
    for eps, plan in plans.items():
        assert plan.sample_rate == 0.25 and plan.steps == 50
        assert 0.9 * eps <= plan.epsilon <= eps  # the smallest noise that keeps within ε, to the tolerance
        assert spent_epsilon(plan.noise_multiplier, 0.25, 50, 1e-5) == pytest.approx(plan.epsilon)
    assert plans[1].noise_multiplier > plans[2].noise_multiplier > plans[8].noise_multiplier > 0.5
    # more steps over the same records cost more: at the same σ, ε grows
    assert spent_epsilon(plans[8].noise_multiplier, 0.25, 100, 1e-5) > plans[8].epsilon


def test_a_full_batch_release_is_composed_with_the_steps_at_one_noise_multiplier():
    steps_only = DpSgd(8.0).plan(records=16, batch_size=4, steps=12, generator=generator(0))
    with_gates = DpSgd(8.0).plan(records=16, batch_size=4, steps=12, generator=generator(0), full_releases=1)
    assert with_gates.full_releases == 1 and 0.95 * 8 <= with_gates.epsilon <= 8
    history = [(with_gates.noise_multiplier, 0.25, 12), (with_gates.noise_multiplier, 1.0, 1)]
    assert spent_epsilon_of(history, 1e-5) == pytest.approx(with_gates.epsilon)
    # the release over every record costs budget: the same ε needs more noise than the steps alone
    assert with_gates.noise_multiplier > steps_only.noise_multiplier
    assert spent_epsilon(with_gates.noise_multiplier, 0.25, 12, 1e-5) < with_gates.epsilon


def centroid_plan(sigma: float, clip: float, seed: int = 0) -> DpPlan:
    return DpPlan(noise_multiplier=sigma, sample_rate=1.0, clip_norm=clip, steps=1, delta=1e-5, epsilon=1.0,
                  generator=generator(seed), full_releases=1)


def test_private_centroid_gates_clip_every_record_and_release_shared_inputs_once(tiny_seed):
    positions = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                 "model.layers.1.self_attn.o_proj"]
    exact, _ = train_centroid_gates(tiny_seed, records(), positions, max_len=32)
    free, _ = private_centroid_gates(tiny_seed, records(), positions, centroid_plan(0.0, 1e6), max_len=32)
    for pos in positions:  # no noise and no clipping: the sum of the features, the centroid's direction
        cosine = exact[pos] @ free[pos] / (np.linalg.norm(exact[pos]) * np.linalg.norm(free[pos]))
        assert cosine > 0.9999
    # q and v read the same input: one release, identical gates, even under noise
    noisy, _ = private_centroid_gates(tiny_seed, records(), positions, centroid_plan(1.0, 1.0), max_len=32)
    assert np.array_equal(noisy[positions[0]], noisy[positions[1]])
    assert not np.allclose(noisy[positions[0]], noisy[positions[2]][: len(noisy[positions[0]])])
    # each record's features (all positions together) are clipped to C: without noise the sum is at most n C
    clipped, _ = private_centroid_gates(tiny_seed, records(), positions, centroid_plan(0.0, 0.5), max_len=32)
    released = np.concatenate([clipped[positions[0]], clipped[positions[2]]])
    assert np.linalg.norm(released) <= len(records()) * 0.5 * (1 + 1e-5)
    # the noise is σC per coordinate, drawn from the plan's generator alone
    a, _ = private_centroid_gates(tiny_seed, records(), positions, centroid_plan(50.0, 1e-3, seed=3), max_len=32)
    b, _ = private_centroid_gates(tiny_seed, records(), positions, centroid_plan(50.0, 1e-3, seed=3), max_len=32)
    assert np.array_equal(a[positions[2]], b[positions[2]])
    assert np.std(a[positions[2]]) == pytest.approx(50.0 * 1e-3, rel=0.3)


def test_a_dp_share_with_centroid_gates_keeps_the_centroid_objective_within_its_epsilon(tiny_seed):
    settings = replace(TINY_SHARE, gate_objective="centroid")
    plain = train_and_share(tiny_seed, records(), settings, new_key(), share_seed=2)
    private = train_and_share(tiny_seed, records(), settings, new_key(), share_seed=2, dp=DpSgd(4.0))
    assert private.dp.full_releases == 1 and private.dp.steps == settings.dp_lora_steps == private.dp.taken
    assert 3.8 <= private.epsilon <= 4.0 and all(p.dp_epsilon == private.epsilon for p in private.shared)
    # the gates are noised centroids, not lm gates (which start at zero and move a little) nor the exact ones
    gate, exact = private.pieces[0].gate, plain.pieces[0].gate
    assert np.linalg.norm(gate) > 1e-3 and not np.allclose(gate, exact)


@pytest.mark.parametrize("kwargs, words", [({"epsilon": 0}, "epsilon"), ({"epsilon": float("inf")}, "epsilon"),
                                           ({"epsilon": 1, "delta": 1}, "delta"),
                                           ({"epsilon": 1, "clip_norm": -1}, "clip norm")])
def test_bad_dp_settings_are_refused_by_name(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DpSgd(**kwargs)


def one_step(tiny_seed, plan: DpPlan) -> float:
    """The norm of the change one DP-SGD step (plain SGD, lr 1) makes to a fresh linear probe on the tiny model."""
    model = tiny_seed.model
    head = model.lm_head.weight
    head.requires_grad_(True)
    before = head.detach().clone()
    try:
        examples = encode_all(tiny_seed.tokenizer, records(4), 32)
        opt = torch.optim.SGD([head], lr=1.0)
        run_dp_steps(model, examples, tiny_seed.tokenizer.pad_token_id, tiny_seed.device, 1, opt, [head], plan, "t")
        return float((head.detach() - before).norm())
    finally:
        with torch.no_grad():
            head.copy_(before)
        head.requires_grad_(False)


def test_each_records_gradient_is_clipped_and_the_noise_follows_the_plan(tiny_seed):
    exact = dict(noise_multiplier=0.0, sample_rate=1.0, steps=1, delta=1e-5, epsilon=float("inf"))
    free = one_step(tiny_seed, DpPlan(clip_norm=1e6, generator=generator(0), **exact))
    clipped = one_step(tiny_seed, DpPlan(clip_norm=1e-3, generator=generator(0), **exact))
    assert free > 1e-2  # the unclipped mean gradient is large ...
    assert clipped <= 1e-3 * (1 + 1e-4)  # ... the mean of records clipped to C is at most C
    # noise of σ C per coordinate on the sum, divided by the expected batch (4 records)
    noisy = DpPlan(noise_multiplier=2.0, sample_rate=1.0, clip_norm=1e-3, steps=1, delta=1e-5, epsilon=1.0,
                   generator=generator(1))
    n_params = tiny_seed.model.lm_head.weight.numel()
    expected = 2.0 * 1e-3 / 4 * np.sqrt(n_params)
    assert 0.9 * expected < one_step(tiny_seed, noisy) < 1.1 * expected + 1e-3
    # the sampling and the noise come from the plan's generator alone: the same seed, the same step
    same, again, other = (one_step(tiny_seed, DpPlan(**{**noisy.__dict__, "generator": generator(g),
                                                                 "taken": 0}))
                          for g in (7, 7, 8))
    assert same == again != other


def test_a_dp_share_carries_its_epsilon_in_every_signed_piece_and_its_metrics(tiny_seed):
    key = new_key()
    plain = train_and_share(tiny_seed, records(), TINY_SHARE, key, share_seed=5)
    private = train_and_share(tiny_seed, records(), TINY_SHARE, key, share_seed=5, dp=DpSgd(4.0))
    assert plain.epsilon is None and "pieces-epsilon" not in plain.metrics()
    assert all(p.dp_epsilon is None and "dp_epsilon" not in p.meta() for p in plain.pieces)
    assert 3.6 <= private.epsilon <= 4.0 and private.metrics()["pieces-epsilon"] == private.epsilon
    for piece in private.shared:
        assert piece.dp_epsilon == private.epsilon and piece.dp_delta == 1e-5 and piece.signature_ok()
        back = Piece.from_bytes(piece.to_bytes())
        assert back.dp_epsilon == piece.dp_epsilon and back.piece_id == piece.piece_id and back.signature_ok()
    # the noise moves the weights: DP-SGD's adapter is not the plain one
    assert not np.allclose(plain.pieces[0].A, private.pieces[0].A)


def test_the_accountant_counts_every_dp_step_of_both_phases(tiny_seed):
    lm_gates = replace(TINY_SHARE, gate_objective="lm")  # trained gates: DP-SGD steps of their own
    private = train_and_share(tiny_seed, records(), lm_gates, new_key(), share_seed=2, dp=DpSgd(8.0))
    # dp-lora-steps (not lora-steps) LoRA steps, then gate-steps gate steps, at expected batch dp-batch-size
    assert len(private.lora.losses) == 4 and len(private.gates.losses) == 2
    plan = private.dp
    assert plan.steps == plan.taken == 4 + 2 and plan.sample_rate == 3 / 6
    assert plan.epsilon == pytest.approx(spent_epsilon(plan.noise_multiplier, 0.5, 6, 1e-5)) and plan.epsilon <= 8
    # the same ε over more steps needs more noise
    longer = train_and_share(tiny_seed, records(), replace(lm_gates, dp_lora_steps=12), new_key(), share_seed=2,
                             dp=DpSgd(8.0))
    assert longer.dp.taken == 14 and longer.dp.noise_multiplier > plan.noise_multiplier


def test_a_dp_share_trains_and_cuts_only_its_dp_targets_and_a_plain_share_keeps_every_projection(tiny_seed):
    values_only = replace(TINY_SHARE, dp_lora_targets="v_proj")
    private = train_and_share(tiny_seed, records(), values_only, new_key(), share_seed=3, dp=DpSgd(8.0))
    plain = train_and_share(tiny_seed, records(), values_only, new_key(), share_seed=3)
    layers = tiny_seed.model.config.num_hidden_layers
    assert sorted({p.position.rsplit(".", 1)[-1] for p in private.pieces}) == ["v_proj"]
    assert len(private.pieces) == layers and all(p.dp_epsilon == private.epsilon for p in private.shared)
    assert any(np.abs(p.B).sum() > 0 for p in private.pieces)  # trained, not left at LoRA's zero init
    # without DP the setting does not apply: the LoRA covers the run's usual four projections
    assert sorted({p.position.rsplit(".", 1)[-1] for p in plain.pieces}) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_no_step_runs_past_what_the_accountant_counted(tiny_seed):
    plan = DpSgd(8.0).plan(records=4, batch_size=2, steps=1, generator=generator(0))
    one_step(tiny_seed, plan)
    assert plan.taken == 1
    with pytest.raises(ValueError, match="would pass the 1 its ε was accounted for"):
        one_step(tiny_seed, plan)
    assert plan.taken == 1


@pytest.mark.parametrize("change, name", [({"dp_lora_steps": 0}, "dp-lora-steps"),
                                          ({"dp_batch_size": 0}, "dp-batch-size"),
                                          ({"dp_lora_steps": 2.5}, "dp-lora-steps"),
                                          ({"dp_lora_targets": " , "}, "dp-lora-targets"),
                                          ({"dp_lora_targets": "v_proj,q proj"}, "dp-lora-targets")])
def test_bad_dp_training_settings_are_refused_by_name(change, name):
    with pytest.raises(ValueError, match=name):
        from_config(ParticipantSettings, {key(k): v for k, v in change.items()})


def test_a_piece_with_half_or_a_bad_privacy_claim_does_not_decode(tiny_seed):
    share = train_and_share(tiny_seed, records(), TINY_SHARE, new_key(), share_seed=1, dp=DpSgd(8.0))
    piece = share.shared[0]
    tensors = {"A": piece.A, "B": piece.B, "gate": piece.gate}
    meta = piece.meta() | {"public_key": piece.public_key.hex(), "signature": piece.signature.hex()}
    with pytest.raises(PieceFormatError, match="together or neither"):
        Piece.from_parts({k: v for k, v in meta.items() if k != "dp_delta"}, tensors)
    with pytest.raises(PieceFormatError, match="dp_epsilon"):
        Piece.from_parts(meta | {"dp_epsilon": "-1"}, tensors)
    # a claim changed after signing breaks the signature
    assert not Piece.from_parts(meta | {"dp_epsilon": "0.5"}, tensors).signature_ok()


def test_the_policy_asks_for_dp_sgd_and_refuses_what_contradicts(tmp_path):
    assert PrivacyPolicy().dp_sgd() is None
    dp = PrivacyPolicy.from_dict({"piece-epsilon": 4, "piece-clip-norm": 0.5}).dp_sgd()
    assert (dp.epsilon, dp.delta, dp.clip_norm) == (4, 1e-5, 0.5)
    with pytest.raises(PolicyError, match="'piece-epsilon'.*null"):
        PrivacyPolicy.from_dict({"piece-epsilon": -2})
    with pytest.raises(PolicyError, match="'piece-epsilon' and 'epsilon-budget' contradict"):
        PrivacyPolicy.from_dict({"piece-epsilon": 20, "epsilon-budget": 10})
    with pytest.raises(PolicyError, match="min-hours-between-shares"):
        PrivacyPolicy.from_dict({"min-hours-between-shares": -1})


def test_a_dp_share_spends_its_epsilon_first_and_stops_at_the_budget(tmp_path):
    from participants.device_privacy import share_request

    device = device_with(tmp_path, {"piece-epsilon": 4, "profile-epsilon": 1, "epsilon-budget": 9})
    for _ in range(2):
        _, _, dp = share_request(device, ParticipantSettings())
        assert dp.epsilon == 4
    assert device.ledger().spent()[0] == 8
    with pytest.raises(BudgetExceeded, match="'epsilon-budget' 9"):
        share_request(device, ParticipantSettings())
    assert len(device.ledger().shares()) == 2  # a refused request is not a share


def test_a_device_shares_no_more_often_than_its_policy_allows(tmp_path):
    from participants.device_privacy import share_request

    device = device_with(tmp_path, {"min-hours-between-shares": 24})
    share_request(device, ParticipantSettings())
    with pytest.raises(PolicyRefused, match="'min-hours-between-shares' is 24; it shared 0.00 h ago"):
        share_request(device, ParticipantSettings())
    ledger = json.loads((device.root / "privacy-ledger.json").read_text())
    ledger["shares"] = [t - 25 * 3600 for t in ledger["shares"]]  # a day and an hour later
    (device.root / "privacy-ledger.json").write_text(json.dumps(ledger))
    share_request(device, ParticipantSettings())
    assert len(device.ledger().shares()) == 2


def test_a_device_whose_policy_asks_for_dp_sgd_sends_pieces_that_say_so(tmp_path, task_identity):
    from protocols import messages as M
    from test_privacy_policy import ask

    device = device_with(tmp_path, {"piece-epsilon": 6, "max-share-ratio": 1.0})
    reply = ask(device, M.SHARE, {"seed-model": "tiny-random", "dp-lora-steps": 2, "dp-batch-size": 2,
                                  "gate-steps": 1, "lora-rank": 2, "max-len": 32, "share-ratio": 1.0})
    pieces = M.pieces_from_records(reply.content[M.PIECES], reply.content[M.PIECE_META])
    metrics = dict(reply.content[M.METRICS].items())
    assert pieces and all(p.dp_epsilon == metrics["pieces-epsilon"] and p.signature_ok() for p in pieces)
    assert 5.4 <= metrics["pieces-epsilon"] <= 6 and metrics["pieces-noise-multiplier"] > 0
    assert device.ledger().releases()[-1] | {"time": 0} == {"what": "pieces", "epsilon": 6.0, "delta": 1e-5, "time": 0}


def dp_step_update(tiny_seed, micro_batch: int, clip_norm: float, n: int = 6) -> list[torch.Tensor]:
    """The change one noiseless DP-SGD step (SGD, lr 1, every record drawn) makes to a fresh LoRA on the tiny
    model, its records' gradients taken `micro_batch` at a time."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_seed.model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, bias="none",
                                                       target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():  # B away from zero, so that A's gradient is not zero either
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=generator(1)))
        before = [p.detach().clone() for p in params]
        lengths = [records(n)[i].output + " and more" * i for i in range(n)]  # records of different lengths: padding
        examples = encode_all(tiny_seed.tokenizer, [PersonalRecord("ann", f"q {i}", a) for i, a in enumerate(lengths)],
                              32)
        plan = DpPlan(noise_multiplier=0.0, sample_rate=1.0, clip_norm=clip_norm, steps=1, delta=1e-5,
                      epsilon=float("inf"), generator=generator(0))
        run_dp_steps(model, examples, tiny_seed.tokenizer.pad_token_id, tiny_seed.device, 1,
                     torch.optim.SGD(params, lr=1.0), params, plan, "t", micro_batch=micro_batch)
        return [(p.detach() - b) for p, b in zip(params, before)]
    finally:
        model.unload()
        tiny_seed.model.requires_grad_(False)


@pytest.mark.parametrize("clip_norm", [1e6, 0.05])
def test_batched_per_record_gradients_clip_each_record_exactly_as_one_at_a_time(tiny_seed, clip_norm):
    one_by_one = dp_step_update(tiny_seed, micro_batch=1, clip_norm=clip_norm)
    batched = dp_step_update(tiny_seed, micro_batch=4, clip_norm=clip_norm)
    assert sum(float(u.norm()) for u in one_by_one) > 1e-4  # the step moved the LoRA (A and B alike) ...
    assert all(float(u.norm()) > 0 for u in one_by_one)
    for a, b in zip(one_by_one, batched):  # ... and the batched records moved it the same way
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_per_record_gradients_are_refused_for_a_tied_or_non_linear_parameter(tiny_seed):
    from participants.per_record_grads import linear_owners

    model = tiny_seed.model
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    found = linear_owners(model, [model.get_output_embeddings().weight])
    assert (found is None) == tied
    assert linear_owners(model, [model.get_input_embeddings().weight]) is None  # an embedding, not a linear layer
