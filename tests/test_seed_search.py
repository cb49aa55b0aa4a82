"""The seed-search baselines (exhaustive, successive halving) on a catalog of tiny local seeds, one of them
trained on the user's own records so that it is clearly the right choice."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from participants.chat_data import collate, encode_all, next_token_loss
from participants.evaluation import perplexity
from participants.seed_loading import forget_seed, is_loaded, load_seed
from participants.seed_search import (download_bytes, exhaustive_search, halving_schedule, mean_loss,
                                      record_losses, successive_halving)
from protocols.records import PersonalRecord
from protocols.tiny import save_tiny_llama

USER = [PersonalRecord("u", f"describe thing {i}", f"ZAP thing {i} ZAP") for i in range(12)]


def _fine_tuned(base: Path, out: Path, records, steps: int = 30) -> None:
    """A full-model copy of the base after a few AdamW steps on the records: the seed that fits this user."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    batch = collate(encode_all(tok, records, 64), tok.pad_token_id, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        next_token_loss(logits, batch["labels"]).backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """Five seed folders: the base, three other random inits, and the base tuned on USER (named 'c-…' so that
    it is neither first nor last in any order)."""
    root = tmp_path_factory.mktemp("seeds")
    for name, init in [("a-base", 0), ("b-other", 1), ("d-other", 2), ("e-other", 3)]:
        save_tiny_llama(root / name, seed=init)
    _fine_tuned(root / "a-base", root / "c-tuned", USER)
    sources = [str(root / n) for n in ("a-base", "b-other", "c-tuned", "d-other", "e-other")]
    return sources, str(root / "c-tuned")


def test_exhaustive_search_scores_every_seed_on_everything_and_picks_the_tuned_one(catalog):
    sources, tuned = catalog
    result = exhaustive_search(sources, USER, max_len=64)
    assert result.seed_id == tuned
    assert set(result.losses) == set(sources) and result.losses[tuned] < min(
        v for s, v in result.losses.items() if s != tuned) - 0.5
    assert result.seeds_loaded == len(sources)
    tokens_per_seed = sum(len(e.input_ids) for e in encode_all(load_seed(tuned).tokenizer, USER, 64))
    assert result.tokens_forward == len(sources) * tokens_per_seed
    assert result.bytes_loaded == sum(sum(f.stat().st_size for f in Path(s).glob("*.safetensors")) for s in sources)
    assert result.rounds == [{"seeds": sources, "items": len(USER), "losses": result.losses}]
    assert result.seconds > 0
    # the same loss evaluation.perplexity reports, as its log
    assert result.losses[tuned] == pytest.approx(math.log(perplexity(load_seed(tuned), USER, max_len=64)), rel=1e-4)
    forget_seed(tuned)


def test_successive_halving_picks_the_tuned_seed_for_less_work(catalog):
    sources, tuned = catalog
    full = exhaustive_search(sources, USER, max_len=64)
    result = successive_halving(sources, USER, min_items=2, eta=2, max_len=64)
    assert result.seed_id == tuned
    assert result.tokens_forward < full.tokens_forward / 2
    assert result.seeds_loaded == len(sources) and result.bytes_loaded == full.bytes_loaded
    # 5 seeds on 2 records, the best 2 on 4 records, then one is left
    assert (result.rounds[0]["seeds"], result.rounds[0]["items"]) == (sources, 2)
    assert [(len(r["seeds"]), r["items"]) for r in result.rounds] == [(5, 2), (2, 4)]
    first = result.rounds[0]["losses"]
    assert result.rounds[1]["seeds"] == sorted(first, key=lambda s: (first[s], s))[:2]
    assert tuned in result.rounds[1]["seeds"]
    # survivors ran only the records new to them: round 1 cost records 2..3, not 0..3
    lengths = [len(e.input_ids) for e in encode_all(load_seed(tuned).tokenizer, USER, 64)]
    assert result.tokens_forward == 5 * sum(lengths[:2]) + 2 * sum(lengths[2:4])
    # and the reused losses equal a fresh evaluation on the first 4 records
    for source, loss in result.rounds[1]["losses"].items():
        per_record, _ = record_losses(load_seed(source), USER[:4], max_len=64)
        assert loss == pytest.approx(mean_loss(per_record), rel=1e-5)
        assert result.losses[source] == loss
        forget_seed(source)
    # seeds dropped after round 0 keep the loss they got there
    assert all(result.losses[s] == first[s] for s in sources if s not in result.rounds[1]["seeds"])


def test_record_losses_keep_the_records_order_whatever_the_batching(catalog):
    _, tuned = catalog
    seed = load_seed(tuned)
    records = [PersonalRecord("u", "q" * (20 - i), "a" * (i + 1)) for i in range(6)]  # lengths force a re-sort
    batched, tokens = record_losses(seed, records, max_len=64, batch_size=4)
    alone = [record_losses(seed, [r], max_len=64)[0][0] for r in records]
    assert [r.tokens for r in batched] == [r.tokens for r in alone] == [i + 2 for i in range(6)]
    assert [r.total for r in batched] == pytest.approx([r.total for r in alone], rel=1e-4)
    assert tokens == sum(len(e.input_ids) for e in encode_all(seed.tokenizer, records, 64))
    forget_seed(tuned)


def test_searches_leave_the_cache_as_they_found_it(catalog):
    sources, _ = catalog
    held = load_seed(sources[1])
    successive_halving(sources, USER[:4], max_len=64)
    exhaustive_search(sources, USER[:2], max_len=64)
    assert is_loaded(sources[1]) and load_seed(sources[1]) is held
    assert not any(is_loaded(s) for s in sources if s != sources[1])
    assert forget_seed(sources[1]) and not forget_seed(sources[1])


@pytest.mark.parametrize("n_seeds, n_records, min_items, eta, expected", [
    (5, 12, 2, 2, [(5, 2), (2, 4)]),
    (32, 100, 2, 2, [(32, 2), (16, 4), (8, 8), (4, 16), (2, 32)]),
    (9, 100, 1, 3, [(9, 1), (3, 3)]),
    (8, 3, 2, 2, [(8, 2), (4, 3)]),  # records run out: the best of that round wins
    (1, 5, 2, 2, [(1, 2)]),
    (4, 1, 5, 2, [(4, 1)]),
])
def test_halving_schedule(n_seeds, n_records, min_items, eta, expected):
    assert halving_schedule(n_seeds, n_records, min_items, eta) == expected


def test_when_records_run_out_the_lowest_loss_of_the_last_round_wins(catalog):
    sources, tuned = catalog
    result = successive_halving(sources, USER[:3], min_items=2, eta=2, max_len=64)
    assert [(len(r["seeds"]), r["items"]) for r in result.rounds] == [(5, 2), (2, 3)]
    assert result.seed_id == tuned == min(result.rounds[-1]["losses"], key=result.rounds[-1]["losses"].get)


def test_delta_seeds_count_the_delta_download(tmp_path):
    (tmp_path / "seed").mkdir()
    (tmp_path / "seed" / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "delta").mkdir()
    (tmp_path / "delta" / "adapter_model.safetensors").write_bytes(b"x" * 30)
    (tmp_path / "delta" / "adapter_config.json").write_text("{}")
    assert download_bytes(SimpleNamespace(path=str(tmp_path / "seed"), delta=str(tmp_path / "delta"))) == 30
    assert download_bytes(SimpleNamespace(path=str(tmp_path / "seed"), delta=None)) == 1000
    assert download_bytes(SimpleNamespace(path=str(tmp_path / "seed"))) == 1000


@pytest.mark.parametrize("call, message", [
    (lambda s: exhaustive_search([], USER), "no seeds to search"),
    (lambda s: successive_halving([], USER), "no seeds to search"),
    (lambda s: exhaustive_search(s, []), "no records"),
    (lambda s: successive_halving(s, []), "no records"),
    (lambda s: exhaustive_search([s[0], s[0]], USER), "more than once"),
    (lambda s: successive_halving(s, USER, min_items=0), "at least one record"),
    (lambda s: successive_halving(s, USER, eta=1), "eta"),
])
def test_bad_calls_say_what_is_wrong(catalog, call, message):
    with pytest.raises(ValueError, match=message):
        call(catalog[0])
