import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may come from a hub

import pytest
from styleqa_fixture import real_styleqa, write_styleqa

from protocols.records import PersonalRecord

REAL_STYLEQA = real_styleqa()
needs_real_styleqa = pytest.mark.skipif(
    REAL_STYLEQA is None, reason="checks the real styleqa data, shared/data/styleqa next to the checkout, which a "
                                 "clone of bouquet alone does not have")


@pytest.fixture(scope="session")
def tiny_seed():
    from participants.seed_loading import load_seed

    return load_seed("tiny-random")


@pytest.fixture(scope="session")
def styleqa_folder(tmp_path_factory):
    """A small styleqa-shaped folder (tests/styleqa_fixture.py), at <tmp>/shared/data/styleqa."""
    return write_styleqa(tmp_path_factory.mktemp("styleqa") / "shared" / "data" / "styleqa")


@pytest.fixture(scope="module")
def styleqa_found(styleqa_folder):
    """Run from above `styleqa_folder`, so that code asking for "styleqa" by name (find_styleqa, which looks
    for shared/data/styleqa above the current directory first) reads it and not the real data."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(styleqa_folder.parents[2])
        yield styleqa_folder


def styled_records(user: str, style: str, n: int, start: int = 0) -> list[PersonalRecord]:
    """Records whose answers carry a recognisable style marker, for learning tests."""
    return [PersonalRecord(user, f"describe thing {i}", f"{style} thing {i} {style}") for i in range(start, start + n)]


@pytest.fixture
def make_records():
    return styled_records


def tiny_catalog(folder):
    """Two tiny seeds (base + a small delta each) explained over two marker words, built by hand."""
    import numpy as np

    from participants.adapters import save_peft_adapter
    from participants.profile import embed_texts
    from protocols.catalog import Catalog, CatalogEntry
    from protocols.explanations import AttributeBasis, Explanation
    from protocols.seeds import TINY, materialize, write_seed_folder

    base = materialize(TINY)
    plain = ["item 1 is fine", "item 2 is fine"]
    vectors = [embed_texts([f"{m} {t} {m}" for t in plain]).mean(0) - embed_texts(plain).mean(0)
               for m in ("ZAP!", "Dear sir,")]
    catalog = Catalog(folder, TINY, base.content_hash, AttributeBasis(("zap", "formal"), np.stack(vectors)),
                      ["tell me about item 99"], 8)
    rng = np.random.default_rng(1)
    for name, word in (("zappy", "zap"), ("formal", "formal")):
        delta = {"model.layers.0.self_attn.q_proj": (rng.normal(size=(4, 64)).astype(np.float32),
                                                     0.01 * rng.normal(size=(64, 4)).astype(np.float32))}
        desc = write_seed_folder(catalog.seed_folder(name), name, base,
                                 lambda path, d=delta: save_peft_adapter(path, d, 4, 8.0, TINY))
        catalog.upsert(CatalogEntry(name, desc.content_hash, Explanation({word: 1.0}, 0.5), "by hand", 0))
    catalog.save()
    return catalog
