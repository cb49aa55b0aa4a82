"""The bench's rivals of Per-Pcs on the tiny seed: LoraHub's gradient-free composition, and the newcomer's own
history retrieved into the prompt (rag), scored on the same answer tokens as every other method."""

import math

import numpy as np
import pytest
import torch
from test_bench import tiny_settings

from coordinator.pool import PiecePool
from coordinator.validation import RegisteredSeed, seed_shapes
from participants.adapters import branches
from participants.assembly import mixed_factors
from participants.chat_data import IGNORE, encode, encode_after, encode_all
from participants.evaluation import perplexity
from participants.history_prompt import FOOTER, history_prompts
from protocols.records import PersonalRecord
from simulation.bench.lorahub import L1, lorahub
from simulation.bench.sharers import device_pieces, prepare_sharers
from simulation.bench.users import split_users


def test_mixed_factors_compose_each_mix_exactly_with_weights_of_any_sign():
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 2, 5, generator=gen), torch.randn(3, 4, 2, generator=gen)
    w = torch.tensor([0.5, -0.3, 0.0])
    A_dw, B_dw = mixed_factors(A, B, w, "dw")
    assert A_dw.shape == (4, 5)  # the zero-weighted piece is left out, the negative one kept
    torch.testing.assert_close(B_dw @ A_dw, sum(w[j] * B[j] @ A[j] for j in range(3)))
    A_ab, B_ab = mixed_factors(A, B, w, "ab")
    torch.testing.assert_close(B_ab @ A_ab, sum(w[j] * B[j] for j in range(3)) @ sum(w[j] * A[j] for j in range(3)))
    A0, B0 = mixed_factors(A, B, torch.zeros(3), "dw")
    assert float((B0 @ A0).abs().max()) == 0


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_seed):
    """Three tiny sharers' adapters, and a target's history."""
    root = tmp_path_factory.mktemp("rivals")
    settings = tiny_settings(root)
    sharers, targets = split_users(settings)
    with PiecePool(root / "pool") as pool:
        pool.register_seed(RegisteredSeed(tiny_seed.descriptor.seed_id, tiny_seed.descriptor.content_hash,
                                          seed_shapes(tiny_seed.descriptor.path)))
        prepare_sharers(tiny_seed, settings, sharers, root, pool, 1.0)
    return {u.user: device_pieces(root, u.user) for u in sharers}, targets[0].history, settings


@pytest.mark.parametrize("mix", ["dw", "ab"])
def test_lorahub_moves_from_uniform_and_returns_the_best_weighting_it_scored(shared, tiny_seed, mix):
    adapters, history, s = shared
    found = lorahub(tiny_seed, history, adapters, mix=mix, budget=10, max_len=s.max_len, rng_seed=0)
    w = np.array(list(found.sharer_weights.values()))
    assert list(found.sharer_weights) == list(adapters)
    assert np.abs(w - 1 / len(adapters)).max() > 1e-3 and np.all(np.abs(w) <= 1.5)
    assert found.losses[0] == found.uniform_loss and len(found.losses) == 11
    assert found.loss == min(found.losses) < found.uniform_loss
    # the adapter returned is the one that scored: its history loss plus the L1 term is the loss reported
    ppl = perplexity(tiny_seed, history, branches(found.weights, 1.0, tiny_seed.device), max_len=s.max_len)
    assert math.log(ppl) + L1 * np.abs(w).mean() == pytest.approx(found.loss, rel=1e-5)
    per_pass = sum(len(e.input_ids) for e in encode_all(tiny_seed.tokenizer, history, s.max_len))
    assert found.tokens == 11 * per_pass
    again = lorahub(tiny_seed, history, adapters, mix=mix, budget=10, max_len=s.max_len, rng_seed=0)
    assert again.sharer_weights == found.sharer_weights  # seeded: a rerun finds the same weights


TOPICS = [("how should I feed my new kitten?", "kittens want wet food four times a day"),
          ("what is the offside rule in football?", "a player is offside when nearer the goal line than the ball"),
          ("how do I file my income taxes?", "fill in the return online before the end of april"),
          ("which tomatoes grow well on a balcony?", "cherry tomatoes in a big pot with lots of sun"),
          ("how do I change a flat bicycle tyre?", "lever the tyre off, patch the tube, pump it up"),
          ("what is a good first programming language?", "python, for its plain syntax")]


def test_rag_prompts_hold_the_nearest_history_items_nearest_last_and_never_the_answer():
    history = [PersonalRecord("u", q, a) for q, a in TOPICS]
    test = [PersonalRecord("u", "what should a cat eat?", "SECRET-ANSWER tuna"),
            PersonalRecord("u", "my bike tyre is flat, what now?", "SECRET-ANSWER patch")]
    cat, bike = history_prompts(history, test, k=2)
    for prompt, record, nearest in ((cat, test[0], TOPICS[0]), (bike, test[1], TOPICS[4])):
        assert prompt.count("Request: ") == 2 and "SECRET-ANSWER" not in prompt
        assert prompt.endswith(f"{FOOTER}\n\n{record.input}")
        # the nearest item comes last, right before the request
        assert prompt.index(f"Request: {nearest[0]}\nAnswer: {nearest[1]}") > prompt.index("Request: ")
    assert "offside" not in cat and "kitten" not in bike
    everything = history_prompts(history, test[:1], k=10)[0]
    assert all(q in everything for q, _ in TOPICS)


def test_a_prompt_in_place_of_the_input_scores_the_same_answer_tokens(tiny_seed):
    tok = tiny_seed.tokenizer
    recs = [PersonalRecord("u", f"q{i}", f"ok {i}" if i < 2 else "a long answer " * 10) for i in range(3)]
    for r in recs:  # the last answer is longer than max_len: cut as encode() cuts it
        plain, context = encode(tok, r, 40), encode_after(tok, r, "some examples first\n\n" + r.input, 40)
        answer = [t for t in plain.labels if t != IGNORE]
        assert [t for t in context.labels if t != IGNORE] == answer and context.n_target == plain.n_target
        assert context.labels[-len(answer):] == answer == context.input_ids[-len(answer):]
        assert set(context.labels[:-len(answer)]) == {IGNORE} and len(context.input_ids) > len(plain.input_ids)
    # the plain input as the prompt, where encode() did not cut the prompt: exactly the perplexity without prompts
    whole = recs[:2]
    assert all(encode_after(tok, r, r.input, 40) == encode(tok, r, 40) for r in whole)
    assert perplexity(tiny_seed, whole, max_len=40, prompts=[r.input for r in whole]) == perplexity(
        tiny_seed, whole, max_len=40)
    assert perplexity(tiny_seed, recs, max_len=40, prompts=["other words\n\n" + r.input for r in recs]) != \
        perplexity(tiny_seed, recs, max_len=40)
