"""Catalog seeds: stored as base + LoRA delta, merged on loading, hashed so pieces fit exactly one seed."""

import json

import numpy as np
import pytest
import torch

from participants.adapters import save_peft_adapter
from participants.seed_loading import load_seed
from protocols.catalog import Catalog, CatalogEntry, load_catalog
from protocols.explanations import AttributeBasis, Explanation
from protocols.seeds import TINY, materialize, write_seed_folder

POS = "model.layers.0.self_attn.q_proj"


def _delta(scale: float) -> dict:
    rng = np.random.default_rng(0)
    return {POS: (rng.normal(size=(4, 64)).astype(np.float32), scale * rng.normal(size=(64, 4)).astype(np.float32))}


def _seed(folder, scale=0.1, name="s1"):
    base = materialize(TINY)
    return write_seed_folder(folder, name, base,
                             lambda path: save_peft_adapter(path, _delta(scale), rank=4, alpha=8.0, base_model=TINY))


def test_a_catalog_seed_loads_as_base_plus_its_merged_delta(tmp_path):
    desc = _seed(tmp_path / "s1")
    base = load_seed(TINY)
    assert desc.delta and desc.path == base.descriptor.path and desc.content_hash != base.descriptor.content_hash
    seed = load_seed(str(tmp_path / "s1"))
    A, B = _delta(0.1)[POS]
    want = base.model.get_submodule(POS).weight + (8.0 / 4) * torch.from_numpy(B @ A)
    assert torch.allclose(seed.model.get_submodule(POS).weight, want, atol=1e-5)
    other = "model.layers.1.self_attn.q_proj"
    assert torch.equal(seed.model.get_submodule(other).weight, base.model.get_submodule(other).weight)
    assert seed.model is not base.model  # the cached bare base stays bare


def test_the_seed_hash_follows_the_delta(tmp_path):
    assert _seed(tmp_path / "a", 0.1).content_hash == _seed(tmp_path / "b", 0.1).content_hash
    assert _seed(tmp_path / "a", 0.1).content_hash != _seed(tmp_path / "c", 0.2).content_hash


def test_a_seed_built_on_other_weights_is_refused_with_the_reason(tmp_path):
    _seed(tmp_path / "s1")
    meta = json.loads((tmp_path / "s1" / "seed.json").read_text())
    (tmp_path / "s1" / "seed.json").write_text(json.dumps(meta | {"base_hash": "0" * 64}))
    with pytest.raises(ValueError, match="delta was trained on"):
        materialize(str(tmp_path / "s1"))


def test_the_catalog_file_round_trips_and_names_its_seeds(tmp_path):
    basis = AttributeBasis(("concise", "expert"), np.eye(2, 3))
    base = materialize(TINY)
    catalog = Catalog(tmp_path, TINY, base.content_hash, basis, ["What is rain?"], 32)
    desc = _seed(catalog.seed_folder("s1"))
    catalog.upsert(CatalogEntry("s1", desc.content_hash, Explanation({"expert": 0.5}, 0.2), "test", 123))
    catalog.save()
    back = load_catalog(tmp_path)
    assert back.explanations() == {"s1": Explanation({"expert": 0.5}, 0.2)}
    assert back.words == ("concise", "expert") and back.probes == ["What is rain?"]
    assert materialize(back.seed_source("s1")).content_hash == desc.content_hash
    with pytest.raises(KeyError, match="has: s1"):
        back.seed_source("s2")


def test_a_missing_or_damaged_catalog_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="bouquet seeds build"):
        load_catalog(tmp_path)
    (tmp_path / "catalog.json").write_text("{}")
    with pytest.raises(ValueError, match="not a bouquet seed catalog"):
        load_catalog(tmp_path)
