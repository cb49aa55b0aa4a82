"""Training within a device's memory and time: the base's precision, the zeroth-order trainer, the trainer choice."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from participants.adapters import branches
from participants.evaluation import perplexity
from participants.gate_training import train_gates
from participants.lora_training import LoraSettings, train_private_lora
from participants.precision import Bf16Hardware, resolve_precision
from participants.seed_loading import LoadedSeed
from participants.trainer_choice import MIB, MemoryEstimate, choose_trainer, estimate_memory
from participants.zeroth_order import Directions, ZerothOrderSettings, fresh_lora, lora_positions, spsa_steps
from protocols.settings import ParticipantSettings

ZO = LoraSettings(rank=4, alpha=8, steps=25, lr=5e-3, batch_size=4, max_len=64, trainer="zeroth-order",
                  zeroth_order=ZerothOrderSettings(eps=1e-2, lr=2e-2, gate_lr=1e-1, perturbations=1,
                                                     step_factor=4))
AMX = Bf16Hardware(fast=True, native=True, what="CPU with AMX bf16")
AVX512 = Bf16Hardware(fast=False, native=True, what="CPU with AVX-512 bf16, no AMX")
NONE = Bf16Hardware(fast=False, native=False, what="CPU without bf16 arithmetic")


@pytest.mark.parametrize("asked, hardware, expected", [
    ("auto", AMX, "bf16"), ("auto", AVX512, "fp32"), ("auto", NONE, "fp32"), ("fp32", AMX, "fp32"),
    ("bf16", AMX, "bf16"), ("bf16", AVX512, "bf16")])
def test_auto_takes_bf16_only_on_a_fast_path(asked, hardware, expected):
    assert resolve_precision(asked, torch.device("cpu"), hardware) == expected


def test_bf16_on_hardware_without_it_is_refused_naming_what_fits():
    with pytest.raises(ValueError, match="no bf16 arithmetic: use precision fp32"):
        resolve_precision("bf16", torch.device("cpu"), NONE)


def test_a_bf16_base_on_a_cpu_attends_in_fp32_with_sdpa_masks(tiny_seed, make_records):
    from participants.chat_data import answer_loss, batches, encode_all
    from participants.fp32_attention import NAME, use_fp32_attention

    from protocols.records import PersonalRecord

    records = make_records("u", "ZAP", 5) + [PersonalRecord("u", "a longer question", "ZAP " * 12)]
    examples = encode_all(tiny_seed.tokenizer, records, 256)
    padded = next(batches(examples, 6, tiny_seed.tokenizer.pad_token_id, tiny_seed.device))
    assert (padded["attention_mask"] == 0).any()  # the mask matters in this batch
    reference = copy.deepcopy(tiny_seed.model)  # fp32 throughout
    bf16 = copy.deepcopy(tiny_seed.model).to(torch.bfloat16)
    with torch.no_grad():
        plain = answer_loss(bf16, padded)
        assert use_fp32_attention(bf16) and bf16.config._attn_implementation == NAME
        upcast, exact = answer_loss(bf16, padded), answer_loss(reference, padded)
    assert torch.isfinite(upcast) and abs(float(upcast - exact)) <= abs(float(plain - exact)) + 2e-2
    eager = copy.deepcopy(tiny_seed.model)
    eager.set_attn_implementation("eager")
    assert not use_fp32_attention(eager) and eager.config._attn_implementation == "eager"  # kept


def test_what_is_trained_stays_fp32_on_a_bf16_base(tiny_seed, make_records):
    bf16 = LoadedSeed(tiny_seed.descriptor, copy.deepcopy(tiny_seed.model).to(torch.bfloat16), tiny_seed.tokenizer,
                      tiny_seed.device, "bf16")
    recs = make_records("u", "ZAP", 8)
    seen = []

    def dtypes(step, report):
        seen.extend({p.dtype for n, p in bf16.model.named_parameters() if "lora_" in n})
    weights, report = train_private_lora(bf16, recs, replace(ZO, trainer="adamw", steps=3), on_step=dtypes)
    assert seen and set(seen) == {torch.float32}
    assert all(A.dtype == np.float32 and B.dtype == np.float32 for A, B in weights.values())
    assert all(np.isfinite(r) for r in report.losses)
    gates, _ = train_gates(bf16, recs, weights, replace(ZO, trainer="adamw"), steps=2, lr=1e-2)
    assert all(g.dtype == np.float32 for g in gates.values())
    assert next(bf16.model.parameters()).dtype == torch.bfloat16  # the base stays as it was


def test_zeroth_order_lora_learns_and_leaves_the_seed_bare(tiny_seed, make_records):
    recs = make_records("u", "ZAP", 12)
    before = {k: v.clone() for k, v in tiny_seed.model.state_dict().items()}
    ppl_before = perplexity(tiny_seed, recs, max_len=ZO.max_len)
    weights, report = train_private_lora(tiny_seed, recs, ZO)
    adamw, _ = train_private_lora(tiny_seed, recs, replace(ZO, trainer="adamw", steps=1))
    assert sorted(weights) == sorted(adamw) and all(weights[p][0].shape == adamw[p][0].shape for p in weights)
    assert len(report.losses) == ZO.steps * 4 and report.forward_passes == 2 * len(report.losses) and not report.stopped
    assert np.mean(report.losses[-20:]) < np.mean(report.losses[:20])
    assert perplexity(tiny_seed, recs, branches(weights, 2.0, tiny_seed.device), max_len=ZO.max_len) < ppl_before
    after = tiny_seed.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not tiny_seed.model._forward_hooks and not any(m._forward_hooks for m in tiny_seed.model.modules())


def test_zeroth_order_on_b_alone_keeps_a_as_it_started(tiny_seed, make_records):
    recs = make_records("u", "ZAP", 8)
    both = replace(ZO, steps=2, zeroth_order=replace(ZO.zeroth_order, factors="AB"))
    torch.manual_seed(both.seed)  # as the trainer does before drawing A
    start = fresh_lora(tiny_seed.model, lora_positions(tiny_seed.model, both.targets), both.rank, tiny_seed.device)
    moved_ab, _ = train_private_lora(tiny_seed, recs, both)
    moved_b, report = train_private_lora(tiny_seed, recs, replace(both, zeroth_order=replace(both.zeroth_order,
                                                                                              factors="B")))
    assert sorted(moved_b) == sorted(start) and report.forward_passes == 2 * 2 * 4 and not report.stopped
    for pos, (A, _) in start.items():
        np.testing.assert_array_equal(moved_b[pos][0], A.numpy())  # A untouched, to the bit
        assert np.abs(moved_b[pos][1]).max() > 0  # B has left zero
        assert not np.allclose(moved_ab[pos][0], A.numpy(), atol=1e-6)  # with AB, A moves too


def test_perturbations_are_regenerated_from_the_seed_and_restore_in_place():
    params = [torch.randn(3, 5), torch.randn(7)]
    start = [p.clone() for p in params]
    d = Directions(params)
    d.add([(42, 1e-2)])
    moved = [p.clone() for p in params]
    d.add([(42, -2e-2)])
    d.add([(42, 1e-2)])
    assert all(torch.allclose(p, s, atol=1e-7) for p, s in zip(params, start))
    d.add([(42, 1e-2)])
    assert all(torch.allclose(p, m, atol=1e-6) for p, m in zip(params, moved))  # the same z again, from the seed
    d.add([(43, 1e-2)])
    assert not all(torch.allclose(p, m) for p, m in zip(params, moved))


def test_more_directions_per_step_cost_two_forward_passes_each(tiny_seed, make_records):
    zo = replace(ZO, steps=2, zeroth_order=replace(ZO.zeroth_order, perturbations=3, step_factor=1,
                                                   schedule="cosine"))
    _, report = train_private_lora(tiny_seed, make_records("u", "ZAP", 8), zo)
    assert report.forward_passes == 2 * 3 * 2 and len(report.losses) == 2


class _NaNAfter:
    """A forward hook on the final norm that turns the output NaN from its `after`-th call on."""

    def __init__(self, after: int):
        self.after, self.calls = after, 0

    def __call__(self, module, args, out):
        self.calls += 1
        return out * float("nan") if self.calls > self.after else out


def test_a_nan_loss_stops_keeping_the_last_good_adapter(tiny_seed, make_records):
    recs = make_records("u", "ZAP", 8)
    # a constant rate, so that the first three steps of a longer run are these three
    short = replace(ZO, steps=1, zeroth_order=replace(ZO.zeroth_order, step_factor=3, schedule="constant"))
    good, _ = train_private_lora(tiny_seed, recs, short)  # three clean steps
    handle = tiny_seed.model.model.norm.register_forward_hook(_NaNAfter(2 * 4 + 1))  # NaN inside step 5
    try:
        kept, report = train_private_lora(tiny_seed, recs, replace(short, steps=2))
    finally:
        handle.remove()
    assert "NaN at step 5" in report.stopped and "adapter of step 3" in report.stopped and len(report.losses) == 4
    for pos in good:
        np.testing.assert_allclose(kept[pos][0], good[pos][0], atol=1e-6)
        np.testing.assert_allclose(kept[pos][1], good[pos][1], atol=1e-6)


def test_zeroth_order_gates_move_while_the_pieces_stay(tiny_seed, make_records):
    recs = make_records("u", "ZAP", 8)
    weights, _ = train_private_lora(tiny_seed, recs, replace(ZO, steps=2))
    frozen = {k: (a.copy(), b.copy()) for k, (a, b) in weights.items()}
    gates, report = train_gates(tiny_seed, recs, weights, ZO, steps=3, lr=1.0)  # lr is adamw's: not used here
    assert len(report.losses) == 3 * 4 and any(np.abs(g).max() > 0 for g in gates.values())
    assert all(g.dtype == np.float32 for g in gates.values())
    assert all(np.array_equal(weights[k][0], frozen[k][0]) and np.array_equal(weights[k][1], frozen[k][1])
               for k in weights)


def test_spsa_follows_the_gradient_on_a_quadratic():
    """On L(θ) = |θ - t|² the expected SPSA update is -η ∇L: many steps reach t."""
    target = torch.tensor([1.0, -2.0, 0.5])
    theta = torch.zeros(3)

    class Quadratic(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(1, 2, 2)
            logits[0, 0, 0] = -((theta - target) ** 2).sum()  # loss = log(1 + e^{-logit}) - ... monotone in |θ-t|²
            return type("Out", (), {"logits": logits})()

    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long),
             "labels": torch.tensor([[-100, 0]])}
    data = iter(lambda: batch, None)
    report = spsa_steps(Quadratic(), [theta], data, 400, 0.5, ZerothOrderSettings(eps=1e-3, perturbations=4),
                        "quadratic")
    assert torch.allclose(theta, target, atol=0.1) and report.losses[-1] < report.losses[0]


@pytest.mark.parametrize("change, message", [({"zo_eps": 0.0}, "zo-eps"), ({"zo_eps": 2.0}, "zo-eps"),
                                             ({"zo_lr": float("nan")}, "zo-lr"), ({"zo_lr": 5.0}, "zo-lr"),
                                             ({"trainer": "sgd"}, "trainer"), ({"precision": "fp8"}, "precision"),
                                             ({"zo_perturbations": 0}, "zo-perturbations")])
def test_bad_zeroth_order_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        ParticipantSettings(**change)


def _estimate(weights, adamw, zo, per_token=1000):
    return MemoryEstimate(weights * MIB, zo * MIB - 1, zo * MIB, adamw * MIB, 3 * per_token, per_token, per_token)


def test_auto_picks_the_trainer_the_budget_fits():
    est = _estimate(500, 2000, 900)
    assert choose_trainer("auto", 0, est, 4, 128)[0] == "adamw"
    assert choose_trainer("auto", 4000, est, 4, 128)[0] == "adamw"
    assert choose_trainer("auto", 1000, est, 4, 128)[0] == "zeroth-order"
    assert choose_trainer("zeroth-order", 4000, est, 4, 128)[0] == "zeroth-order"


def test_a_budget_nothing_fits_is_refused_with_what_would():
    from participants.error_replies import Refusal

    est = _estimate(500, 2000, 900, per_token=400 * 1024)  # 512 tokens take 200 MiB with zeroth-order
    with pytest.raises(Refusal, match=r"adamw ≈2000 MiB, zeroth-order ≈900 MiB.*would fit: batch-size \d with "
                                      r"trainer zeroth-order"):
        choose_trainer("auto", 850, est, 4, 128)
    with pytest.raises(Refusal, match="trainer zeroth-order"):
        choose_trainer("adamw", 1000, est, 4, 128)
    with pytest.raises(Refusal, match="weights alone take 500 MiB"):
        choose_trainer("auto", 400, est, 4, 128)


def test_the_estimate_orders_the_ways_to_run(tiny_seed):
    est = estimate_memory(tiny_seed, ("q_proj", "k_proj", "v_proj", "o_proj"), 4, 4, 64)
    assert est.weights < est.inference < est.zeroth_order < est.adamw and est.saved_per_token > 0
    bigger = estimate_memory(tiny_seed, ("q_proj", "k_proj", "v_proj", "o_proj"), 4, 8, 64)
    per_token = est.saved_per_token + est.logits_grad_per_token
    assert bigger.adamw - est.adamw == 4 * 64 * per_token  # linear in the batch's tokens
    assert bigger.zeroth_order - est.zeroth_order == 4 * 64 * est.per_token_forward


def test_zeroth_order_holds_the_tensors_of_inference_and_adamw_more(tmp_path, make_records):
    from protocols.records import save_records
    from simulation.trainer_memory import measure

    path = tmp_path / "records.jsonl"
    save_records(make_records("u", "ZAP", 8), path)
    live = {mode: measure(mode, "tiny-random", "fp32", str(path), 4, 64, 4, 1)["live_tensors_mib"]
            for mode in ("inference", "zeroth-order", "adamw")}
    assert live["inference"] <= live["zeroth-order"] <= 1.1 * live["inference"] < live["adamw"]


def test_the_trainers_bench_compares_both_trainers_on_the_same_users(tmp_path):
    from protocols.records import PersonalRecord, save_records
    from simulation.trainers_bench import TrainersBenchSettings, markdown, run_trainers_bench

    data = tmp_path / "data.jsonl"
    save_records([PersonalRecord(u, f"describe thing {i}", f"{m} thing {i} {m}")
                  for u, m in (("ann", "ZAP"), ("bob", "ZIP")) for i in range(12)], data)
    s = TrainersBenchSettings(seed_model="tiny-random", data=str(data), users=2, history=8, test=4, lora_steps=4,
                              zo_step_factor=3, zo_lr=2e-2, max_len=64, points=3, repeats=1,
                              parts=("throughput", "quality"))
    report = run_trainers_bench(s, tmp_path / "out")
    q = report["quality"]
    assert sorted(q["per_user"]) == ["ann", "bob"] and report["memory"] is None
    for v in q["per_user"].values():
        assert [r["step"] for r in v["adamw"]] == [0, 2, 4] and [r["step"] for r in v["zeroth_order"]] == [0, 6, 12]
        assert v["adamw"][0]["perplexity"] == v["zeroth_order"][0]["perplexity"]  # the same base, the same users
        last = v["adamw"][-1]
        assert last["perplexity"] == pytest.approx(last["perplexity_saved"], rel=1e-4)  # in place = as returned
        assert all(a["seconds"] < b["seconds"] for a, b in zip(v["zeroth_order"], v["zeroth_order"][1:]))
        assert v["zo_time_ratio"] == pytest.approx(v["zeroth_order"][-1]["seconds"] / last["seconds"])
    assert report["throughput"]["trainer_passes_per_s"] > 0
    assert (tmp_path / "out" / "heldout_vs_seconds.png").is_file() and "## held-out perplexity" in markdown(report)


def test_int8_weights_run_both_trainers_and_keep_the_base_frozen(tiny_seed, make_records):
    from participants.int8_weights import Int8Linear, int8_supported, quantize_block_linears

    if int8_supported(tiny_seed.device):
        pytest.skip(int8_supported(tiny_seed.device))
    model = copy.deepcopy(tiny_seed.model)
    assert quantize_block_linears(model) == 2 * 7
    q = LoadedSeed(tiny_seed.descriptor, model, tiny_seed.tokenizer, tiny_seed.device, "int8")
    recs = make_records("u", "ZAP", 8)
    base, quantized = (perplexity(s, recs, max_len=64) for s in (tiny_seed, q))
    assert quantized == pytest.approx(base, rel=0.02)  # per-channel int8 barely moves a forward pass
    for trainer in ("adamw", "zeroth-order"):
        weights, report = train_private_lora(q, recs, replace(ZO, trainer=trainer, steps=6))
        assert report.losses[-1] < report.losses[0] and all(A.dtype == np.float32 for A, _ in weights.values())
    assert isinstance(q.model.model.layers[0].self_attn.q_proj, Int8Linear)  # PEFT unloaded back onto it
    assert not any(p.requires_grad for p in q.model.parameters())


def test_int8_is_refused_off_the_cpu():
    with pytest.raises(ValueError, match="int8 weights are for CPU devices"):
        resolve_precision("int8", torch.device("meta"))


def test_a_device_budget_in_limits_json_picks_or_refuses_the_trainer(tiny_seed, tmp_path):
    import json

    from participants.error_replies import Refusal
    from participants.limits import DeviceLimits
    from participants.trainer_choice import fit_trainer

    (tmp_path / "limits.json").write_text(json.dumps({"memory-mib": 1}))
    budget = DeviceLimits.load(tmp_path / "limits.json").memory_mib
    s = ParticipantSettings(seed_model="tiny-random", trainer="auto", batch_size=8, max_len=64, lora_rank=4)
    with pytest.raises(Refusal, match=r"memory budget .* would fit: .*batch-size \d+ with trainer zeroth-order"):
        fit_trainer(tiny_seed, s, budget)
    assert fit_trainer(tiny_seed, s, 1000).trainer == "adamw"
    assert fit_trainer(tiny_seed, replace(s, batch_size=1), budget).trainer in ("adamw", "zeroth-order")
    assert fit_trainer(tiny_seed, replace(s, trainer="zeroth-order"), 0).trainer == "zeroth-order"


def test_the_precision_part_trains_on_precision_users_even_beyond_the_quality_users(tmp_path):
    from protocols.records import PersonalRecord, save_records
    from simulation.trainers_bench import TrainersBenchSettings, markdown, run_trainers_bench

    data = tmp_path / "data.jsonl"
    save_records([PersonalRecord(u, f"describe thing {i}", f"{m} thing {i} {m}")
                  for u, m in (("ann", "ZAP"), ("bob", "ZIP"), ("cy", "ZUP")) for i in range(12)], data)
    s = TrainersBenchSettings(seed_model="tiny-random", data=str(data), users=1, precision_users=2, history=8,
                              test=4, lora_steps=2, max_len=64, parts=("precision",))
    report = run_trainers_bench(s, tmp_path / "out")
    p = report["precision"]
    assert report["users"] == ["ann"] and p["users"] == ["ann", "bob"]
    assert len(p["fp32"]["trained_perplexity"]) == len(p["fp32"]["base_perplexity"]) == 2
    assert "AdamW trained on 2 users" in markdown(report)
