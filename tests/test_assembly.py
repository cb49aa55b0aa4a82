import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from participants.adapters import branches, load_peft_adapter, save_peft_adapter
from participants.assembly import AssemblySettings, assemble, random_assembly, shortlist
from participants.chat_data import batches, encode_all, predicts_answer_mask
from participants.lora_hooks import attached
from protocols.pieces import Piece

Q0 = "model.layers.0.self_attn.q_proj"
O0 = "model.layers.0.self_attn.o_proj"
Q1 = "model.layers.1.self_attn.q_proj"
D = 64


def make_piece(seed_desc, position, rng, key, gate=None, scale=0.3, rank=4):
    return Piece(seed_desc.seed_id, seed_desc.content_hash, position, rank, 2.0 * rank,
                 (rng.standard_normal((rank, D)) * scale).astype(np.float32),
                 (rng.standard_normal((D, rank)) * scale).astype(np.float32),
                 (rng.standard_normal(D) if gate is None else gate).astype(np.float32)).signed(key)


def layer0_q_inputs(seed, history):
    """The inputs of layer 0's q_proj on the history batch, and the answer-predicting mask."""
    batch = next(batches(encode_all(seed.tokenizer, history, 128), 8, seed.tokenizer.pad_token_id, "cpu"))
    captured = {}
    module = dict(seed.model.named_modules())[Q0]
    handle = module.register_forward_hook(lambda m, a, o: captured.setdefault("x", a[0].detach()))
    with torch.no_grad():
        seed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    return captured["x"], predicts_answer_mask(batch["labels"])


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def test_one_batch_assembly_matches_the_formula(tiny_seed, make_records, key):
    """Scores, top-k, softmax and both mixes (A and B separately; the updates B A), checked against a direct
    computation."""
    rng = np.random.default_rng(0)
    history = make_records("n", "ZAP", 4)
    pieces = [make_piece(tiny_seed.descriptor, Q0, rng, key) for _ in range(4)]
    settings = AssemblySettings(top_k=2, temperature=0.5, batch_size=8, mix="ab")
    result = assemble(tiny_seed, history, pieces, settings)
    updates = assemble(tiny_seed, history, pieces, AssemblySettings(top_k=2, temperature=0.5, batch_size=8, mix="dw",
                                                                     norm="pieces"))

    # reference: layer 0 q_proj sees the normed embeddings, untouched by any other piece
    x, mask = layer0_q_inputs(tiny_seed, history)
    x, mask = F.layer_norm(x, (D,)), mask.float()
    scores = []
    for p in pieces:
        g = F.layer_norm(torch.from_numpy(p.gate), (D,))
        s = (x @ g) / math.sqrt(D)
        scores.append(float(((s * mask).sum(1) / mask.sum(1)).mean()))
    top = np.argsort(scores)[::-1][:2]
    w = np.exp(np.array(scores)[top] / 0.5)
    w /= w.sum()
    A = sum(wi * pieces[i].A for wi, i in zip(w, top))
    B = sum(wi * pieces[i].B * pieces[i].scaling for wi, i in zip(w, top))
    np.testing.assert_allclose(result.weights[Q0][0], A, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.weights[Q0][1], B, rtol=1e-4, atol=1e-6)
    chosen = [pid for pid, _ in result.choices[0][Q0]]
    assert chosen == [pieces[i].piece_id for i in top]
    # dw: the update is the weighted sum of the chosen pieces' updates, exactly, at rank top-k x r, rescaled
    # (mix-norm pieces) to the weighted mean of their own lengths
    own = [pieces[i].scaling * pieces[i].B @ pieces[i].A for i in top]
    dW = sum(wi * u for wi, u in zip(w, own))
    dW = dW * sum(wi * np.linalg.norm(u) for wi, u in zip(w, own)) / np.linalg.norm(dW)
    A_dw, B_dw = updates.weights[Q0]
    assert updates.rank == 2 * pieces[0].rank == A_dw.shape[0]
    np.testing.assert_allclose(B_dw @ A_dw, dW, rtol=1e-4, atol=1e-6)


def test_the_piece_whose_gate_matches_the_history_wins(tiny_seed, make_records, key):
    rng = np.random.default_rng(1)
    history = make_records("n", "ZAP", 6)
    # the mean normalised activation at q_proj of layer 0 is what a well-trained gate points at
    x, mask = layer0_q_inputs(tiny_seed, history)
    aligned = F.layer_norm(x, (D,))[mask].mean(0).numpy()
    pieces = [make_piece(tiny_seed.descriptor, Q0, rng, key, gate=-aligned)] + \
             [make_piece(tiny_seed.descriptor, Q0, rng, key, gate=aligned)] + \
             [make_piece(tiny_seed.descriptor, Q0, rng, key) for _ in range(3)]
    result = assemble(tiny_seed, history, pieces, AssemblySettings(top_k=1))
    assert all(c[Q0][0][0] == pieces[1].piece_id for c in result.choices)
    gates = [(p.piece_id, p.position, p.rank, p.gate) for p in pieces]
    assert shortlist(tiny_seed, history, gates, AssemblySettings(top_k=1, shortlist=2))[0] == pieces[1].piece_id


def test_later_positions_are_scored_on_earlier_choices(tiny_seed, make_records, key):
    """Changing only the layer-0 candidates changes the layer-1 mix: assembly is sequential."""
    rng = np.random.default_rng(2)
    history = make_records("n", "ZAP", 4)
    later = [make_piece(tiny_seed.descriptor, Q1, rng, key) for _ in range(2)]
    small = [make_piece(tiny_seed.descriptor, O0, rng, key, scale=0.01) for _ in range(2)]
    large = [make_piece(tiny_seed.descriptor, O0, rng, key, scale=3.0) for _ in range(2)]
    settings = AssemblySettings(top_k=2)
    a = assemble(tiny_seed, history, small + later, settings).weights[Q1][0]
    b = assemble(tiny_seed, history, large + later, settings).weights[Q1][0]
    assert not np.allclose(a, b, atol=1e-6)


def test_assembly_averages_over_history_batches(tiny_seed, make_records, key):
    rng = np.random.default_rng(3)
    history = make_records("n", "ZAP", 6) + make_records("n", "completely different and much longer words", 6)
    pieces = [make_piece(tiny_seed.descriptor, Q0, rng, key) for _ in range(5)]
    result = assemble(tiny_seed, history, pieces, AssemblySettings(top_k=2, batch_size=4))
    assert len(result.choices) == 3 and result.tokens > 0


def test_pieces_of_another_rank_are_left_out_and_an_empty_pool_is_an_error(tiny_seed, make_records, key):
    rng = np.random.default_rng(4)
    pieces = [make_piece(tiny_seed.descriptor, Q0, rng, key) for _ in range(3)] + \
             [make_piece(tiny_seed.descriptor, Q0, rng, key, rank=2)]
    result = assemble(tiny_seed, make_records("n", "ZAP", 4), pieces, AssemblySettings(top_k=5, mix="ab"))
    assert result.rank == 4 and len(result.choices[0][Q0]) == 3
    updates = assemble(tiny_seed, make_records("n", "ZAP", 4), pieces, AssemblySettings(top_k=5, mix="dw"))
    assert updates.rank == 20 and updates.weights[Q0][0].shape == (20, D) and len(updates.choices[0][Q0]) == 3
    with pytest.raises(ValueError, match="pool is empty"):
        assemble(tiny_seed, make_records("n", "ZAP", 4), [], AssemblySettings())
    rnd = random_assembly(pieces, AssemblySettings(top_k=2), rng_seed=0)
    assert rnd.rank == 8 and rnd.weights[Q0][0].shape == (8, D)  # dw, the default: top-k x r


@pytest.mark.parametrize("mix", ["ab", "dw"])
def test_saved_adapter_is_a_peft_folder_with_the_same_outputs(tiny_seed, make_records, key, tmp_path, mix):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(5)
    pieces = [make_piece(tiny_seed.descriptor, pos, rng, key) for pos in (Q0, O0, Q1) for _ in range(2)]
    result = assemble(tiny_seed, make_records("n", "ZAP", 4), pieces, AssemblySettings(top_k=2, mix=mix))
    folder = save_peft_adapter(tmp_path / "adapter", result.weights, result.rank, result.alpha,
                               tiny_seed.descriptor.path, extra={"choices": result.choices})
    base = AutoModelForCausalLM.from_pretrained(tiny_seed.descriptor.path)
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        with attached(tiny_seed.model, branches(result.weights, 1.0, "cpu")):
            got = tiny_seed.model(input_ids=ids).logits
        bare = tiny_seed.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(bare, expected, atol=1e-4)
    weights, rank, alpha = load_peft_adapter(folder)
    assert rank == result.rank == (4 if mix == "ab" else 8) and alpha == result.alpha
    assert sorted(weights) == sorted(result.weights)


@pytest.mark.parametrize("mix", ["ab", "dw"])
def test_mix_scale_multiplies_the_assembled_update_and_keeps_the_choice(tiny_seed, make_records, key, mix):
    rng = np.random.default_rng(5)
    history = make_records("n", "ZAP", 4)
    pieces = [make_piece(tiny_seed.descriptor, Q0, rng, key) for _ in range(4)]

    def update(assembly):
        A, B = assembly.weights[Q0]
        return B @ A

    plain = assemble(tiny_seed, history, pieces, AssemblySettings(top_k=2, mix=mix))
    scaled = assemble(tiny_seed, history, pieces, AssemblySettings(top_k=2, mix=mix, scale=1.5))
    assert scaled.choices == plain.choices  # layer 0's q_proj is scored before any update acts on it
    np.testing.assert_allclose(update(scaled), 1.5 * update(plain), rtol=1e-4, atol=1e-6)
    rnd = [random_assembly(pieces, AssemblySettings(top_k=2, mix=mix, scale=s), rng_seed=1) for s in (1.0, 0.5)]
    assert rnd[0].choices == rnd[1].choices
    np.testing.assert_allclose(update(rnd[1]), 0.5 * update(rnd[0]), rtol=1e-4, atol=1e-6)


def test_dp_trained_pieces_are_mixed_dp_top_k_at_a_time_and_a_position_with_any_other_top_k(tiny_seed, make_records,
                                                                                          key):
    from dataclasses import replace

    rng = np.random.default_rng(7)
    history = make_records("n", "ZAP", 4)

    def piece(position, dp):
        p = make_piece(tiny_seed.descriptor, position, rng, key)
        return replace(p, dp_epsilon=8.0, dp_delta=1e-5).signed(key) if dp else p

    private = [piece(Q0, True) for _ in range(5)]  # every candidate at Q0 carries an ε
    mixed = [piece(O0, True) for _ in range(4)] + [piece(O0, False)]  # one at O0 makes no privacy claim
    settings = AssemblySettings(top_k=2, dp_top_k=4, batch_size=8, mix="dw")
    for assembled in (assemble(tiny_seed, history, private + mixed, settings),
                      random_assembly(private + mixed, settings, rng_seed=0)):
        for choice in assembled.choices:
            assert len(choice[Q0]) == 4 and len(choice[O0]) == 2
        assert assembled.rank == 4 * private[0].rank  # dw keeps the widest position's mix exactly
        A, B = assembled.weights[O0]
        assert A.shape[0] == B.shape[1] == assembled.rank  # narrower mixes are padded to the adapter's rank
    # dp-top-k past the candidates takes them all
    wide = assemble(tiny_seed, history, private, AssemblySettings(top_k=2, dp_top_k=9, batch_size=8))
    assert len(wide.choices[0][Q0]) == 5 and wide.rank == 9 * private[0].rank


def test_dp_temperature_evens_the_mix_only_where_every_candidate_was_dp_trained(tiny_seed, make_records, key):
    from dataclasses import replace

    rng = np.random.default_rng(8)
    history = make_records("n", "ZAP", 4)

    def piece(position, dp):
        p = make_piece(tiny_seed.descriptor, position, rng, key)
        return replace(p, dp_epsilon=8.0, dp_delta=1e-5).signed(key) if dp else p

    private = [piece(Q0, True) for _ in range(3)]
    mixed = private[:2] + [piece(Q0, False)]  # one candidate makes no privacy claim

    def spread(pieces, settings):  # largest / smallest weight at Q0 (scored first, on the bare seed), first batch
        w = [wi for _, wi in assemble(tiny_seed, history, pieces, settings).choices[0][Q0]]
        return max(w) / min(w)

    base = AssemblySettings(top_k=3, dp_top_k=3, batch_size=8, mix="dw")
    sharp, even = replace(base, dp_temperature=0.01), replace(base, dp_temperature=100.0)
    assert spread(private, sharp) > 10 and spread(private, even) < 1.05  # all DP: dp-temperature
    assert spread(mixed, sharp) == pytest.approx(spread(mixed, even))  # with a plain piece: temperature
    assert spread(mixed, sharp) > 1.05
    for pieces, uneven in ((private, False), (mixed, True)):  # the random baseline follows the same rule
        w = [wi for _, wi in random_assembly(pieces, even, rng_seed=0).choices[0][Q0]]
        assert (max(w) / min(w) > 1.05) == uneven


def test_mix_norm_pieces_makes_the_mix_as_long_as_its_pieces_except_where_any_is_dp(tiny_seed, make_records, key):
    from dataclasses import replace

    rng = np.random.default_rng(11)
    history = make_records("n", "ZAP", 4)
    pieces = [make_piece(tiny_seed.descriptor, Q0, rng, key) for _ in range(3)]
    private = [replace(p, dp_epsilon=8.0, dp_delta=1e-5).signed(key) for p in pieces]

    def lengths(assembly, used):  # the mix's Frobenius length, and its pieces' weighted mean length
        A, B = assembly.weights[Q0]
        w = dict(assembly.choices[0][Q0])
        own = sum(w[p.piece_id] * np.linalg.norm(p.scaling * p.B @ p.A) for p in used if p.piece_id in w)
        return np.linalg.norm(B @ A), own

    mean = AssemblySettings(top_k=3, dp_top_k=3, dp_temperature=1.0, batch_size=8, mix="dw",  # DP mixed alike
                            norm="mean")
    kept = replace(mean, norm="pieces")
    mixed, own = lengths(assemble(tiny_seed, history, pieces, mean), pieces)
    assert mixed < 0.9 * own  # three random directions partly cancel
    rescaled = assemble(tiny_seed, history, pieces, kept)
    assert rescaled.choices == assemble(tiny_seed, history, pieces, mean).choices  # the choice does not change
    assert lengths(rescaled, pieces)[0] == pytest.approx(own, rel=1e-4)
    assert lengths(assemble(tiny_seed, history, private, kept), private)[0] == pytest.approx(mixed, rel=1e-4)
    some = private[:2] + pieces[2:]  # one DP-trained candidate is enough to keep the mean
    assert lengths(assemble(tiny_seed, history, some, kept), some)[0] == pytest.approx(
        lengths(assemble(tiny_seed, history, some, mean), some)[0], rel=1e-4)
    # the random baseline follows the same rule
    rmixed, rown = lengths(random_assembly(pieces, mean, rng_seed=3), pieces)
    assert lengths(random_assembly(pieces, kept, rng_seed=3), pieces)[0] == pytest.approx(rown, rel=1e-4)
    assert rmixed < 0.9 * rown
    assert lengths(random_assembly(private, kept, rng_seed=3), private)[0] == pytest.approx(rmixed, rel=1e-4)
    with pytest.raises(ValueError, match="mix-norm pieces"):
        from protocols.settings import ParticipantSettings
        ParticipantSettings(mix="ab", mix_norm="pieces")
