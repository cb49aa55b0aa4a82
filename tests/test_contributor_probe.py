"""The newcomer's contributor probe: each contributor's pieces tried alone on its history, only the most helpful mixed."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from participants.adapters import branches
from participants.chat_data import encode_all
from participants.contributor_probe import probe_contributors
from participants.cutting import cut_into_pieces
from participants.evaluation import perplexity
from participants.lora_training import LoraSettings, train_private_lora
from participants.newcomer import assemble_pieces
from protocols.pieces import Piece
from protocols.settings import ParticipantSettings


@pytest.fixture(scope="module")
def pool(tiny_seed):
    """One contributor whose adapter was trained on records written as the newcomer writes (helpful, its gates
    pointing away from the newcomer's inputs), and two whose large random updates raise the loss while their gates
    point straight at the newcomer's inputs: gates alone would mix the harmful two."""
    from conftest import styled_records

    history = styled_records("n", "ZAP", 4)
    lora = LoraSettings(steps=12, lr=5e-3, batch_size=4, max_len=48)
    weights, _ = train_private_lora(tiny_seed, styled_records("h", "ZAP", 8, start=10), lora)
    aligned = _mean_inputs(tiny_seed, history, weights)
    helpful = cut_into_pieces(tiny_seed.descriptor, weights, {pos: -aligned[pos] for pos in weights}, lora.rank,
                              lora.alpha, Ed25519PrivateKey.generate())
    rng = np.random.default_rng(0)
    harmful = []
    for _ in range(2):
        noise = {pos: (rng.standard_normal(A.shape).astype(np.float32) * 0.5,
                       rng.standard_normal(B.shape).astype(np.float32) * 0.5) for pos, (A, B) in weights.items()}
        harmful.append(cut_into_pieces(tiny_seed.descriptor, noise, aligned, lora.rank, lora.alpha,
                                       Ed25519PrivateKey.generate()))
    return history, helpful, harmful


def _mean_inputs(seed, history, weights) -> dict[str, np.ndarray]:
    """Each position's mean layer-normed input on the history: what a gate that matches the history points at."""
    from participants.chat_data import batches

    batch = next(batches(encode_all(seed.tokenizer, history, 48), 8, seed.tokenizer.pad_token_id, "cpu"))
    modules = dict(seed.model.named_modules())
    seen, handles = {}, []

    def keep(pos):
        def hook(module, args, out):  # returns None: the output stays as it is
            seen[pos] = F.layer_norm(args[0], (args[0].shape[-1],)).mean((0, 1))
        return hook

    for pos in weights:
        handles.append(modules[pos].register_forward_hook(keep(pos)))
    with torch.no_grad():
        seed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in handles:
        h.remove()
    return {pos: v.numpy() for pos, v in seen.items()}


def _loss(seed, records, pieces: list[Piece]) -> float:
    adapter = branches({p.position: (p.A, p.B * p.scaling) for p in pieces}, 1.0, seed.device) if pieces else None
    return math.log(perplexity(seed, records, adapter, max_len=48))


def test_the_probe_keeps_the_contributor_whose_pieces_lower_the_history_loss(tiny_seed, pool):
    history, helpful, harmful = pool
    pieces = helpful + harmful[0] + harmful[1]
    probe = probe_contributors(tiny_seed, history, pieces, 1, max_len=48, batch_size=8)
    assert probe.ranking[0] == helpful[0].contributor
    # each loss is that contributor's pieces alone, and the helpful one is below the seed's, the harmful above
    for own in (helpful, *harmful):
        assert probe.losses[own[0].contributor] == pytest.approx(_loss(tiny_seed, history, own), rel=1e-5)
    bare = _loss(tiny_seed, history, [])
    assert probe.losses[helpful[0].contributor] < bare < min(probe.losses[h[0].contributor] for h in harmful)
    per_pass = sum(len(e.input_ids) for e in encode_all(tiny_seed.tokenizer, history, 48))
    assert probe.tokens == 3 * per_pass


def test_a_newcomer_with_the_probe_mixes_only_the_kept_contributors_and_pays_for_the_probe(tiny_seed, pool):
    history, helpful, harmful = pool
    pieces = helpful + harmful[0] + harmful[1]
    base = ParticipantSettings(seed_model="tiny-random", top_k=1, shortlist=3, max_len=48)
    gates_only = assemble_pieces(tiny_seed, history, pieces, base)
    probed = assemble_pieces(tiny_seed, history, pieces,
                             ParticipantSettings(seed_model="tiny-random", top_k=1, shortlist=3, max_len=48,
                                                 probe_records=4, probe_keep=1))
    own = {p.piece_id for p in helpful}
    # where the inputs are still the bare seed's (layer 0's q, k and v see only the embeddings), the gates alone
    # pick a harmful piece; later positions see inputs the harmful mix has already moved
    first = [pos for pos in gates_only.choices[0] if ".layers.0." in pos and "o_proj" not in pos]
    assert len(first) == 3
    assert all(choice[pos][0][0] not in own for choice in gates_only.choices for pos in first)
    assert all(c[0][0] in own for choice in probed.choices for c in choice.values())
    mixed = {True: probed, False: gates_only}
    losses = {k: math.log(perplexity(tiny_seed, history, branches(a.weights, 1.0, tiny_seed.device), max_len=48))
              for k, a in mixed.items()}
    assert losses[True] < losses[False]
    per_pass = sum(len(e.input_ids) for e in encode_all(tiny_seed.tokenizer, history, 48))
    assert probed.tokens == gates_only.tokens + 3 * per_pass
    # with no more contributors than it keeps there is nothing to choose: no probe, no cost
    alone = assemble_pieces(tiny_seed, history, helpful,
                            ParticipantSettings(seed_model="tiny-random", top_k=1, shortlist=3, max_len=48,
                                                probe_records=4, probe_keep=1))
    assert alone.tokens == per_pass


def test_assembly_records_limits_the_assembly_to_the_last_history_items(tiny_seed, pool):
    history, helpful, _ = pool
    s = ParticipantSettings(seed_model="tiny-random", top_k=1, shortlist=3, max_len=48, assembly_records=2)
    result = assemble_pieces(tiny_seed, history, helpful, s)
    assert result.tokens == sum(len(e.input_ids) for e in encode_all(tiny_seed.tokenizer, history[-2:], 48))
    assert len(result.choices) == 1  # one batch of two items


def test_with_the_probe_the_newcomer_downloads_every_piece(tiny_seed, pool):
    from participants.newcomer import shortlist_pieces

    history, helpful, harmful = pool
    pieces = helpful + harmful[0] + harmful[1]
    gates = [(p.piece_id, p.position, p.rank, p.gate) for p in pieces]
    s = ParticipantSettings(seed_model="tiny-random", top_k=1, shortlist=1, max_len=48)
    assert len(shortlist_pieces(tiny_seed, history, gates, s)) == len(helpful)  # one a position, by the gates
    probed = ParticipantSettings(seed_model="tiny-random", top_k=1, shortlist=1, max_len=48, probe_records=1)
    assert shortlist_pieces(tiny_seed, history, gates, probed) == [p.piece_id for p in pieces]


def test_each_position_keeps_the_best_ranked_contributors_that_sent_a_piece_there(tiny_seed, pool):
    from participants.contributor_probe import Probe, kept_pieces

    _, helpful, harmful = pool
    first = helpful[0].position
    pieces = helpful[1:] + harmful[0] + harmful[1]  # the helpful contributor sent nothing at the first position
    ranking = [helpful[0].contributor, harmful[1][0].contributor, harmful[0][0].contributor]
    kept = kept_pieces(pieces, Probe({}, ranking, 1, 0))
    assert {p.position for p in kept} == {p.position for p in helpful}  # every position keeps a candidate
    assert [p.contributor for p in kept if p.position == first] == [harmful[1][0].contributor]
    assert all(p.contributor == helpful[0].contributor for p in kept if p.position != first)
