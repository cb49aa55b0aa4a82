import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from participants.chat_data import IGNORE, Example, answer_loss, batches, encode, encode_all, next_token_loss
from participants.cutting import choose_share, cut_into_pieces
from participants.evaluation import perplexity, rouge
from participants.gate_training import train_gates
from participants.adapters import branches
from participants.lora_training import LoraSettings, train_private_lora
from protocols.records import PersonalRecord

FAST = LoraSettings(rank=4, alpha=8, steps=25, lr=5e-3, batch_size=4, max_len=64)


def test_loss_is_on_the_answer_and_end_of_turn_only(tiny_seed):
    tok = tiny_seed.tokenizer
    ex = encode(tok, PersonalRecord("u", "question", "answer"), max_len=128)
    target = [t for t in ex.labels if t != IGNORE]
    assert tok.decode(target) == "answer<|im_end|>"
    assert ex.input_ids[-len(target):] == target and ex.labels[0] == IGNORE


def test_long_records_keep_part_of_the_answer(tiny_seed):
    ex = encode(tiny_seed.tokenizer, PersonalRecord("u", "q" * 500, "a" * 500), max_len=64)
    assert len(ex.input_ids) == 64 and ex.n_target >= 32


def test_answer_only_head_gives_the_full_loss_with_and_without_peft(tiny_seed, make_records):
    from peft import LoraConfig, get_peft_model

    examples = encode_all(tiny_seed.tokenizer, make_records("u", "ZAP", 6), 48)
    peft = get_peft_model(tiny_seed.model, LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
    try:
        with torch.no_grad():
            for layer in peft.modules():
                if hasattr(layer, "lora_B"):
                    layer.lora_B["default"].weight.normal_()  # a LoRA that changes the logits
        for model in (tiny_seed.model, peft):
            for batch in batches(examples, 3, tiny_seed.tokenizer.pad_token_id, tiny_seed.device):
                with torch.no_grad():
                    full = next_token_loss(model(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits, batch["labels"])
                    torch.testing.assert_close(answer_loss(model, batch), full, rtol=1e-5, atol=1e-6)
        no_answer = Example(examples[0].input_ids, [IGNORE] * len(examples[0].input_ids))
        empty = next(batches([no_answer], 1, tiny_seed.tokenizer.pad_token_id, tiny_seed.device))
        assert float(answer_loss(tiny_seed.model, empty)) == 0.0
    finally:
        peft.unload()


def test_private_lora_learns_and_leaves_the_seed_bare(tiny_seed, make_records):
    recs = make_records("u", "ZAP", 12)
    before = {k: v.clone() for k, v in tiny_seed.model.state_dict().items()}
    ppl_before = perplexity(tiny_seed, recs, max_len=FAST.max_len)
    weights, report = train_private_lora(tiny_seed, recs, FAST)
    assert sorted(weights) == sorted(f"model.layers.{l}.self_attn.{p}_proj" for l in range(2) for p in "qkvo")
    A, B = weights["model.layers.0.self_attn.k_proj"]
    assert A.shape == (4, 64) and B.shape == (32, 4)
    assert report.losses[-1] < report.losses[0] and report.tokens > 0
    # the cached seed is back to its bare self: same keys, same values, nothing trainable
    after = tiny_seed.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in tiny_seed.model.parameters())
    assert perplexity(tiny_seed, recs, branches(weights, FAST.alpha / FAST.rank, tiny_seed.device), max_len=FAST.max_len) < ppl_before


def test_training_can_start_from_given_weights(tiny_seed, make_records):
    recs = make_records("u", "ZAP", 8)
    weights, _ = train_private_lora(tiny_seed, recs, FAST)
    warm = LoraSettings(**{**FAST.__dict__, "steps": 1, "lr": 1e-9})
    again, _ = train_private_lora(tiny_seed, recs, warm, init=weights)
    pos = "model.layers.1.self_attn.v_proj"
    np.testing.assert_allclose(again[pos][1], weights[pos][1], atol=1e-5)


def test_gates_learn_while_pieces_and_seed_stay_frozen(tiny_seed, make_records):
    recs = make_records("u", "ZAP", 8)
    weights, _ = train_private_lora(tiny_seed, recs, FAST)
    frozen = {k: (a.copy(), b.copy()) for k, (a, b) in weights.items()}
    gates, report = train_gates(tiny_seed, recs, weights, FAST, steps=5, lr=1e-2)
    assert set(gates) == set(weights) and all(g.shape == (weights[p][0].shape[1],) for p, g in gates.items())
    assert all(np.abs(g).max() > 0 for g in gates.values())  # moved from their zero start
    assert all(np.array_equal(frozen[p][0], weights[p][0]) for p in weights)
    assert not any(p.requires_grad for p in tiny_seed.model.parameters())
    assert len(report.losses) == 5


def test_cutting_signs_every_piece_and_the_share_ratio_is_honoured(tiny_seed):
    rng = np.random.default_rng(0)
    weights = {f"model.layers.0.self_attn.{p}_proj": (rng.standard_normal((4, 64)).astype(np.float32),
                                                      rng.standard_normal((64, 4)).astype(np.float32)) for p in "qkvo"}
    gates = {p: rng.standard_normal(64).astype(np.float32) for p in weights}
    pieces = cut_into_pieces(tiny_seed.descriptor, weights, gates, 4, 8.0, Ed25519PrivateKey.generate())
    assert len(pieces) == 4 and all(p.signature_ok() for p in pieces)
    assert all(p.seed_hash == tiny_seed.descriptor.content_hash for p in pieces)
    assert len(choose_share(pieces, 0.5, rng_seed=1)) == 2 and len(choose_share(pieces, 0.01, rng_seed=0)) == 1
    assert choose_share(pieces, 0.0, rng_seed=0) == [] and choose_share(pieces, 1.0, rng_seed=0) == pieces
    with pytest.raises(ValueError, match="share ratio"):
        choose_share(pieces, 1.5, rng_seed=0)


def test_rouge_scores_known_strings():
    r = rouge(["the cat sat", "nothing alike"], ["the cat sat", "completely different words"])
    assert r["rouge1"] == pytest.approx(0.5) and r["rougeL"] == pytest.approx(0.5)
