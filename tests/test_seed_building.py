"""Building the seed catalog: seeds from labeled groups and from pool clusters, explained, resumable, shown."""

from __future__ import annotations

import json
import shutil
import zlib

import numpy as np
import pytest
import torch
from conftest import REAL_STYLEQA, needs_real_styleqa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from catalog_build import (ExplainSettings, build_catalog_from_labels, build_catalog_from_pool, explaining, labeled,
                           read_as_another_label, retraining)
from coordinator.explain_seed import explain_seed
from coordinator.pool import PiecePool
from coordinator.pool_merging import mean_delta
from coordinator.validation import RegisteredSeed, seed_shapes
from participants.adapters import load_peft_adapter
from participants.evaluation import generate
from participants.lora_training import LoraSettings
from participants.seed_loading import load_seed
from protocols.attribute_words import EXEMPLARS, text_basis
from protocols.catalog import CatalogEntry, load_catalog
from protocols.explanations import Explanation, decompose, difference_direction
from protocols.pieces import Piece
from protocols.records import PersonalRecord, save_records
from protocols.seeds import TINY, materialize, weights_hash
from simulation.cli import main
from simulation.styleqa import styleqa_groups, styleqa_probes

LORA = LoraSettings(rank=4, alpha=8.0, steps=20, lr=0.02, batch_size=2, max_len=32)
WORDS = ("concise", "friendly", "expert")
PROBES = ["What is rain?", "Name a color."]
Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"


def hashed_embed(texts: list[str]) -> np.ndarray:
    """A stand-in for MiniLM: unit-length hashed character-bigram counts (fast, deterministic)."""
    out = np.zeros((len(texts), 48))
    for i, text in enumerate(texts):
        for a, b in zip(text, text[1:], strict=False):
            out[i, zlib.crc32((a + b).encode()) % 48] += 1.0
        out[i] /= max(np.linalg.norm(out[i]), 1e-12)
    return out


def groups() -> dict[str, list[PersonalRecord]]:
    return {"buzz": [PersonalRecord("u1", f"tell me about thing {i}", "zzz zzz zzz zzz") for i in range(6)],
            "abab": [PersonalRecord("u2", f"tell me about thing {i}", "ab ab ab ab") for i in range(6)]}


def build(out, lora=LORA, data=None, **kw):
    return build_catalog_from_labels(out, data or groups(), TINY, lora, PROBES, ExplainSettings(WORDS),
                                     max_new_tokens=8,
                                     built_from={"buzz": "test buzz", "abab": "test abab"}, embed=hashed_embed, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog")
    return out, build(out)


@pytest.fixture
def copy(built, tmp_path):
    """A private copy of the built catalog, for tests that change it."""
    shutil.copytree(built[0], tmp_path / "catalog")
    return tmp_path / "catalog"


def no_training(*args, **kwargs):
    raise AssertionError("a seed was trained again")


def test_a_two_seed_catalog_is_written_hashed_and_explained(built):
    out, catalog = built
    assert [e.name for e in catalog.entries] == ["abab", "buzz"]
    back = load_catalog(out)
    assert back.base == TINY and back.base_hash == materialize(TINY).content_hash
    assert back.words == WORDS and back.probes == PROBES and back.max_new_tokens == 8
    assert json.loads((out / "build.json").read_text())["lora"]["steps"] == LORA.steps
    base = load_seed(TINY)
    base_answers = generate(base, [PersonalRecord("p", p, "") for p in PROBES], max_new_tokens=8)
    for entry in back.entries:
        folder = back.seed_folder(entry.name)
        assert {f.name for f in folder.iterdir()} == {"seed.json", "delta", "probe_answers.json"}
        assert not list(folder.parent.glob("*.tmp*")), "nothing half-written is left behind"
        desc = materialize(back.seed_source(entry.name))
        assert desc.content_hash == entry.content_hash and desc.path == base.descriptor.path
        assert entry.delta_bytes == (folder / "delta" / "adapter_model.safetensors").stat().st_size
        assert entry.built_from == f"test {entry.name}"
        # the explanation is the seed's own answers against the base's, in the catalog's basis
        answers = generate(load_seed(back.seed_source(entry.name)), [PersonalRecord("p", p, "") for p in PROBES],
                           max_new_tokens=8)
        assert answers != base_answers, "the seed answers differently from the base"
        assert entry.explanation == explain_seed(answers, base_answers, back.basis, hashed_embed)
        assert entry.explanation != Explanation({}, 0.0)
    assert back.entry("abab").content_hash != back.entry("buzz").content_hash


def test_the_basis_is_the_text_basis_of_the_words(built):
    _, catalog = built
    np.testing.assert_allclose(catalog.basis.vectors, text_basis(WORDS, hashed_embed).vectors)
    with pytest.raises(ValueError, match="no hand-written exemplars for 'snarky'"):
        text_basis(("snarky",), hashed_embed)
    assert set(EXEMPLARS) >= set(WORDS)


def no_generation(*args, **kwargs):
    raise AssertionError("probe answers were generated again")


def test_a_rerun_skips_built_seeds_and_a_stopped_one_is_only_answered(copy, monkeypatch):
    monkeypatch.setattr(labeled, "train_private_lora", no_training)
    stamp = {f: f.stat().st_mtime_ns for f in copy.rglob("*.safetensors")}
    before = load_catalog(copy)
    with monkeypatch.context() as m:
        m.setattr("catalog_build.answers.generate", no_generation)
        again = build(copy)
    assert again.entries == before.entries
    assert {f: f.stat().st_mtime_ns for f in copy.rglob("*.safetensors")} == stamp
    # stopped after writing a seed's folder but before its probe answers: the delta is reused, not retrained
    (copy / "seeds" / "buzz" / "probe_answers.json").unlink()
    resumed = build(copy)
    assert resumed.entries == before.entries


def test_other_explanation_settings_re_explain_without_training_or_answering(copy, monkeypatch):
    monkeypatch.setattr(labeled, "train_private_lora", no_training)
    monkeypatch.setattr("catalog_build.answers.generate", no_generation)
    before = load_catalog(copy)
    fewer = build_catalog_from_labels(copy, groups(), TINY, LORA, PROBES, ExplainSettings(("friendly", "expert")),
                                      max_new_tokens=8, embed=hashed_embed)
    assert fewer.words == ("friendly", "expert") and load_catalog(copy).words == ("friendly", "expert")
    assert [e.content_hash for e in fewer.entries] == [e.content_hash for e in before.entries]
    assert json.loads((copy / "build.json").read_text())["explain"]["words"] == ["friendly", "expert"]
    unscaled = build_catalog_from_labels(copy, groups(), TINY, LORA, PROBES, ExplainSettings(WORDS, scaled=False),
                                         max_new_tokens=8, embed=hashed_embed)
    assert unscaled.basis.scale is None and before.basis.scale is not None
    with pytest.raises(ValueError, match="--basis model"):
        build_catalog_from_labels(copy, groups(), TINY, LORA, PROBES, ExplainSettings(WORDS, propose_words=4),
                                  max_new_tokens=8, embed=hashed_embed)


def test_corpus_words_are_embedded_from_each_groups_real_answers_against_the_base(copy, monkeypatch):
    monkeypatch.setattr(labeled, "train_private_lora", no_training)
    labels = {"buzz": "buzzy", "abab": "alternating"}
    before = load_catalog(copy)
    catalog = build_catalog_from_labels(copy, groups(), TINY, LORA, PROBES, ExplainSettings(WORDS, corpus=True),
                                        max_new_tokens=8, embed=hashed_embed, labels=labels)
    assert catalog.words == WORDS + ("buzzy", "alternating")
    cached = json.loads((copy / "corpus_answers.json").read_text())["answers"]
    assert sorted(cached) == sorted({r.input for r in groups()["buzz"]}), "shared inputs are answered once"
    base = load_seed(TINY)
    assert cached["tell me about thing 0"] == generate(base, [PersonalRecord("p", "tell me about thing 0", "")],
                                                       max_new_tokens=8)[0]
    tok = base.tokenizer
    real = [tok.decode(tok(r.output, add_special_tokens=False)["input_ids"][:8]).strip() for r in groups()["buzz"]]
    expected = difference_direction(real, [cached[r.input] for r in groups()["buzz"]], hashed_embed)
    np.testing.assert_allclose(catalog.basis.vectors[WORDS.__len__()], expected)
    # the seed that learned its group's answers ("zzz…") reads most as that group's label, and far better than
    # the hand-written words alone explain it
    coefficients = catalog.entry("buzz").explanation.coefficients
    assert max(coefficients, key=coefficients.get) == "buzzy"
    assert catalog.entry("buzz").explanation.residual < 0.5 < before.entry("buzz").explanation.residual
    with pytest.raises(ValueError, match="share a label"):
        build_catalog_from_labels(copy, groups(), TINY, LORA, PROBES, ExplainSettings(WORDS, corpus=True),
                                  max_new_tokens=8, embed=hashed_embed, labels={"buzz": "x", "abab": "x"})


def test_a_seed_that_reads_as_another_seeds_label_is_named():
    def entry(name, coefficients):
        return CatalogEntry(name, "h", Explanation(coefficients, 0.5), "test", 1)

    labels = {"s1": "calm", "s2": "loud", "s3": "dry"}
    entries = [entry("s1", {"calm": 0.5, "formal": 0.9}),  # a hand word ranks first: not a label mix-up
               entry("s2", {"calm": 0.3, "loud": 0.1}),
               entry("s3", {})]
    assert read_as_another_label(entries, labels) == {"s2": ("loud", "calm")}


@pytest.mark.parametrize("retrained_reads_better", [True, False])
def test_a_misread_seed_is_trained_again_on_every_projection_and_the_better_reading_kept(
        tmp_path, monkeypatch, retrained_reads_better):
    labels = {"buzz": "buzzy", "abab": "alternating"}
    corpus = ExplainSettings(WORDS, corpus=True)
    real_check = retraining.read_as_another_label
    # whatever the tiny seeds read as, let "abab" be read as buzz's label: the retraining is what is tested
    monkeypatch.setattr(retraining, "read_as_another_label",
                        lambda entries, names: real_check(entries, names) | {"abab": ("alternating", "buzzy")})
    monkeypatch.setattr(retraining, "reads_more_as_its_label", lambda *args: retrained_reads_better)
    catalog = build_catalog_from_labels(tmp_path / "c", groups(), TINY, LORA, PROBES, corpus, max_new_tokens=8,
                                        embed=hashed_embed, labels=labels)
    folder = tmp_path / "c" / "seeds" / "abab"
    outcome = json.loads((folder / "retrained.json").read_text())
    assert outcome["kept"] == ("retrained" if retrained_reads_better else "first")
    assert outcome["recipe"] == f"trained again: LoRA on all 7 projections, {2 * LORA.steps} steps"
    assert set(outcome["own_label_share"]) == {"first", "retrained"}
    positions = load_peft_adapter(folder / "delta")[0]
    assert any("mlp.gate_proj" in p for p in positions) == retrained_reads_better
    assert ("trained again" in catalog.entry("abab").built_from) == retrained_reads_better
    assert "trained again" not in catalog.entry("buzz").built_from  # only the misread seed
    assert catalog.entry("abab").content_hash == materialize(str(folder.resolve())).content_hash
    assert not (tmp_path / "c" / "retraining").exists()
    if not retrained_reads_better:  # a build stopped while the seed was trained again: its first version is kept
        (tmp_path / "c" / "retraining").mkdir()
        folder.rename(tmp_path / "c" / "retraining" / "abab")
        (tmp_path / "c" / "retraining" / "abab" / "retrained.json").unlink()
        real_train = labeled.train_private_lora

        def only_the_stronger_recipe(seed, records, settings, *args, **kwargs):
            assert settings != LORA, "the stopped seed's first version was trained again"
            return real_train(seed, records, settings, *args, **kwargs)

        monkeypatch.setattr(labeled, "train_private_lora", only_the_stronger_recipe)
        resumed = build_catalog_from_labels(tmp_path / "c", groups(), TINY, LORA, PROBES, corpus, max_new_tokens=8,
                                            embed=hashed_embed, labels=labels)
        assert resumed.entry("abab").content_hash == catalog.entry("abab").content_hash
        assert json.loads((folder / "retrained.json").read_text())["kept"] == "first"
    # a rerun trains nothing: the seed was trained again once already
    monkeypatch.setattr(labeled, "train_private_lora", no_training)
    again = build_catalog_from_labels(tmp_path / "c", groups(), TINY, LORA, PROBES, corpus, max_new_tokens=8,
                                      embed=hashed_embed, labels=labels)
    assert again.entry("abab").content_hash == catalog.entry("abab").content_hash


def test_short_answer_probes_can_be_left_out_of_the_explanations(copy, monkeypatch):
    assert explaining.prose_probes(["a b c", "a", "a b c d", ""], 3) == [0, 2]
    assert explaining.prose_probes(["a", ""], 0) == [0, 1]
    with pytest.raises(ValueError, match="none of the 2 probes"):
        explaining.prose_probes(["a", ""], 2)
    monkeypatch.setattr(labeled, "train_private_lora", no_training)
    base_words = [len(a.split()) for a in json.loads((copy / "seeds" / "buzz" / "probe_answers.json").read_text())["base"]]
    with pytest.raises(ValueError, match="lower --min-probe-words"):
        build_catalog_from_labels(copy, groups(), TINY, LORA, PROBES, ExplainSettings(WORDS, min_probe_words=99),
                                  max_new_tokens=8, embed=hashed_embed)
    kept = build_catalog_from_labels(copy, groups(), TINY, LORA, PROBES,
                                     ExplainSettings(WORDS, min_probe_words=min(base_words)), max_new_tokens=8,
                                     embed=hashed_embed)
    assert kept.probes == PROBES  # every base answer is long enough: nothing left out
    # a floor that leaves the second probe only: the catalog lists it, and every seed is explained from it alone
    monkeypatch.setattr(explaining, "prose_probes", lambda answers, floor: [1])
    second = build_catalog_from_labels(copy, groups(), TINY, LORA, PROBES, ExplainSettings(WORDS, min_probe_words=1),
                                       max_new_tokens=8, embed=hashed_embed)
    assert second.probes == PROBES[1:]
    stored = json.loads((copy / "seeds" / "buzz" / "probe_answers.json").read_text())
    direction = difference_direction(stored["seed"][1:], stored["base"][1:], hashed_embed)
    assert second.entry("buzz").explanation == decompose(direction, second.basis)


def test_other_probes_or_answer_length_re_answer_only_what_is_new_without_training(copy, monkeypatch):
    monkeypatch.setattr(labeled, "train_private_lora", no_training)
    asked = []

    def recording(seed, records, **kwargs):
        asked.append([r.input for r in records])
        return generate(seed, records, **kwargs)

    monkeypatch.setattr("catalog_build.answers.generate", recording)
    before = {name: json.loads((copy / "seeds" / name / "probe_answers.json").read_text())
              for name in ("abab", "buzz")}
    more = PROBES + ["Why is the sky blue?"]
    catalog = build_catalog_from_labels(copy, groups(), TINY, LORA, more, ExplainSettings(WORDS), max_new_tokens=8,
                                        embed=hashed_embed)
    assert asked == [["Why is the sky blue?"]] * 3  # the base once, then each seed: only the new probe
    assert catalog.probes == more and json.loads((copy / "build.json").read_text())["probes"] == more
    for name, old in before.items():
        now = json.loads((copy / "seeds" / name / "probe_answers.json").read_text())
        assert now["probes"] == more and now["seed"][:2] == old["seed"] and now["base"][:2] == old["base"]
        assert len(now["seed"]) == len(now["base"]) == 3
    asked.clear()
    longer = build_catalog_from_labels(copy, groups(), TINY, LORA, more, ExplainSettings(WORDS), max_new_tokens=9,
                                       embed=hashed_embed)
    assert asked == [more] * 3 and longer.max_new_tokens == 9  # another length: every probe answered again


def test_a_damaged_seed_folder_is_rebuilt(copy):
    (copy / "seeds" / "buzz" / "delta" / "adapter_config.json").unlink()
    resumed = build(copy)
    assert [e.name for e in resumed.entries] == ["abab", "buzz"]
    assert materialize(resumed.seed_source("buzz")).content_hash == resumed.entry("buzz").content_hash


def test_other_settings_or_other_data_are_refused_with_the_reason(copy):
    with pytest.raises(ValueError, match=r"other settings \(lora differ.*another --out"):
        build(copy, lora=LoraSettings(rank=4, alpha=8.0, steps=21, lr=0.02, batch_size=2, max_len=32))
    data = groups()
    data["buzz"] = data["buzz"][:5]
    with pytest.raises(ValueError, match="seed 'buzz' .* was built from other data"):
        build(copy, data=data)
    (copy / "build.json").unlink()
    with pytest.raises(ValueError, match="without the build.json"):
        build(copy)


def test_probes_that_a_seed_trains_on_and_bad_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="probe prompt.*training inputs"):
        build_catalog_from_labels(tmp_path, groups(), TINY, LORA, ["tell me about thing 3"], ExplainSettings(WORDS),
                                  embed=hashed_embed)
    with pytest.raises(ValueError, match="folder names"):
        build(tmp_path, data={"a/b": groups()["buzz"]})
    with pytest.raises(ValueError, match="no hand-written exemplars"):
        build_catalog_from_labels(tmp_path, groups(), TINY, LORA, PROBES, ExplainSettings(("snarky",)),
                                  embed=hashed_embed)
    assert not (tmp_path / "catalog.json").exists()
    # a build that failed before its first catalog.json does not hold the folder to its settings
    quick = LoraSettings(rank=2, alpha=4.0, steps=1, batch_size=2, max_len=16)
    assert [e.name for e in build(tmp_path, lora=quick, data={"buzz": groups()["buzz"][:2]}).entries] == ["buzz"]


def test_bouquet_catalog_shows_base_words_and_each_seed(built, capsys, tmp_path):
    out, catalog = built
    assert main(["catalog", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"base: {TINY} ({catalog.base_hash[:12]})" in text
    assert "attribute words (3): concise, friendly, expert" in text
    for e in catalog.entries:
        line = next(line for line in text.splitlines() if line.strip().startswith(e.name))
        assert e.built_from in line and e.content_hash[:12] in line and "residual" in line
    assert main(["catalog", str(tmp_path / "nothing")]) == 2
    assert "no seed catalog at" in capsys.readouterr().err


def test_bouquet_seeds_build_from_a_jsonl_file_one_seed_per_user(tmp_path, capsys):
    records = [PersonalRecord("ann@x", f"question {i}", "zzz zzz zzz") for i in range(4)]
    records += [PersonalRecord("bob", f"question {i}", "ab ab ab") for i in range(4)]
    save_records(records, tmp_path / "users.jsonl")
    args = ["seeds", "build", "--data", str(tmp_path / "users.jsonl"), "--out", str(tmp_path / "cat"),
            "--seed-model", TINY, "--rows", "3", "--lora-steps", "2", "--probes", "5", "--words", "2",
            "--basis", "model", "--propose-words", "2", "--max-new-tokens", "4", "--batch-size", "2",
            "--max-len", "32"]
    assert main(args) == 0
    catalog = load_catalog(tmp_path / "cat")
    assert [e.name for e in catalog.entries] == ["ann-x", "bob"]
    assert catalog.probes == ["question 3"], "only inputs no seed trains on are probes"
    assert catalog.words[:2] == ("expert", "elementary") and len(catalog.words) <= 4
    assert catalog.basis.dim == 384 and catalog.basis.scale is None  # MiniLM; one probe shows no spread
    assert json.loads((tmp_path / "cat" / "build.json").read_text())["explain"]["basis"] == "model"
    # one styled answer set per word; the plain side is the base's stored probe answers, not generated again
    basis_cache = json.loads((tmp_path / "cat" / "basis_answers.json").read_text())
    assert set(basis_cache) == {"key", "styled"} and set(basis_cache["styled"]) == set(catalog.words)
    for name in ("ann-x", "bob"):
        proposed = json.loads((catalog.seed_folder(name) / "proposed_words.json").read_text())["words"]
        assert set(catalog.words[2:]) <= set(proposed) | {w for other in ("ann-x", "bob") for w in json.loads(
            (catalog.seed_folder(other) / "proposed_words.json").read_text())["words"]}
    assert "user ann@x of users.jsonl, 3 rows" in capsys.readouterr().out
    assert main(args[:-2] + ["--max-len", "48"]) == 2
    assert "other settings (lora differ" in capsys.readouterr().err


# --- from the pool ---------------------------------------------------------------------------------


def piece(position, rank, alpha, A, B, key) -> Piece:
    base = materialize(TINY)
    return Piece(seed_id=TINY, seed_hash=base.content_hash, position=position, rank=rank, alpha=alpha,
                 A=A.astype(np.float32), B=B.astype(np.float32),
                 gate=np.zeros(A.shape[1], np.float32)).signed(key)


def update(p: Piece) -> np.ndarray:
    return p.scaling * (p.B.astype(np.float64) @ p.A.astype(np.float64))


def members(rng) -> list[list[Piece]]:
    """Three contributors: different ranks and alphas, one shares only q, one has two pieces at q."""
    keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    A1, B1 = rng.normal(size=(4, 64)), 0.05 * rng.normal(size=(64, 4))
    M = rng.normal(size=(4, 4)) + 3 * np.eye(4)
    c1 = [piece(Q, 4, 8.0, A1, B1, keys[0]),
          piece(K, 4, 8.0, rng.normal(size=(4, 64)), 0.05 * rng.normal(size=(32, 4)), keys[0])]
    # c2's update at q is 3 × c1's, written with another factorization: the same direction
    c2 = [piece(Q, 4, 8.0, M @ A1, 3 * B1 @ np.linalg.inv(M), keys[1])]
    c3 = [piece(Q, 2, 16.0, rng.normal(size=(2, 64)), 0.05 * rng.normal(size=(64, 2)), keys[2]),
          piece(Q, 8, 8.0, rng.normal(size=(8, 64)), 0.05 * rng.normal(size=(64, 8)), keys[2]),
          piece(K, 2, 4.0, rng.normal(size=(2, 64)), 0.05 * rng.normal(size=(32, 2)), keys[2])]
    return [c1, c2, c3]


def expected_mean(group: list[list[Piece]], position: str) -> np.ndarray:
    own = [np.mean([update(p) for p in m if p.position == position], axis=0)
           for m in group if any(p.position == position for p in m)]
    return np.mean(own, axis=0)


def test_the_merged_lora_is_exactly_the_mean_update_of_its_members():
    group = members(np.random.default_rng(0))
    weights, rank, alpha = mean_delta(group)
    assert rank == 4 + 4 + (2 + 8) and alpha == rank  # q: all three members' ranks stacked
    for position in (Q, K):
        A, B = weights[position]
        assert A.shape == (rank, 64) and B.shape[1] == rank  # k has fewer members: zero padding
        np.testing.assert_allclose((alpha / rank) * B.astype(np.float64) @ A, expected_mean(group, position),
                                   rtol=1e-5, atol=1e-7)


def test_pool_clusters_become_seeds_whose_merged_weights_are_the_mean(tmp_path):
    group = members(np.random.default_rng(1))
    base = materialize(TINY)
    with PiecePool(tmp_path / "run" / "pool") as pool:
        pool.register_seed(RegisteredSeed(TINY, base.content_hash, seed_shapes(base.path)))
        accepted, refused = pool.add_many(p for m in group for p in m)
        assert not refused
    # three contributors make seeds only when the operator lowers the floor (default: 5 per seed)
    with pytest.raises(ValueError, match=r"--min-contributors 5 .*cluster1 has .*only 3 contributor"):
        build_catalog_from_pool(tmp_path / "cat", tmp_path / "run", None, 1, probes=PROBES,
                                explain=ExplainSettings(WORDS), max_new_tokens=4, embed=hashed_embed)
    with pytest.raises(ValueError, match=r"--min-contributors 2 .*has 1; choose --clusters 1 or fewer"):
        build_catalog_from_pool(tmp_path / "cat", tmp_path / "run", None, 2, probes=PROBES,
                                explain=ExplainSettings(WORDS), max_new_tokens=4, embed=hashed_embed,
                                min_contributors=2)
    catalog = build_catalog_from_pool(tmp_path / "cat", tmp_path / "run", None, 2, probes=PROBES,
                                      explain=ExplainSettings(WORDS),
                                      max_new_tokens=4, embed=hashed_embed, min_contributors=1)
    contributors = [m[0].contributor for m in group]
    same = sorted(contributors[:2])
    assert [e.name for e in catalog.entries] == ["cluster1", "cluster2"]
    pair = next(e for e in catalog.entries if "2 contributor(s)" in e.built_from)
    assert all(c in pair.built_from for c in same), "the two contributors with one update direction cluster"
    # each seed records its contributors, so a withdrawal names the seeds it touches (coordinator.service)
    assert json.loads((catalog.seed_folder(pair.name) / "contributors.json").read_text()) == same
    weights, rank, alpha = load_peft_adapter(catalog.seed_folder(pair.name) / "delta")
    np.testing.assert_allclose((alpha / rank) * weights[Q][1].astype(np.float64) @ weights[Q][0],
                               expected_mean(group[:2], Q), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose((alpha / rank) * weights[K][1].astype(np.float64) @ weights[K][0],
                               expected_mean(group[:1], K), rtol=1e-5, atol=1e-7)
    # and PEFT merges it into the base as exactly that update
    merged = load_seed(catalog.seed_source(pair.name)).model.get_submodule(Q).weight.double()
    bare = load_seed(TINY).model.get_submodule(Q).weight.double()
    torch.testing.assert_close(merged - bare, torch.from_numpy(expected_mean(group[:2], Q)), rtol=1e-4, atol=1e-6)
    assert weights_hash(catalog.seed_folder(pair.name) / "delta")
    with pytest.raises(ValueError, match="between 1 and 3"):
        build_catalog_from_pool(tmp_path / "other", tmp_path / "run", None, 4, probes=PROBES,
                                explain=ExplainSettings(WORDS),
                                embed=hashed_embed, min_contributors=1)
    with pytest.raises(ValueError, match="labeled groups"):
        build_catalog_from_pool(tmp_path / "cat", tmp_path / "run", None, 2, probes=PROBES, max_new_tokens=4,
                                explain=ExplainSettings(WORDS, corpus=True), embed=hashed_embed, min_contributors=1)
    with pytest.raises(FileNotFoundError, match="neither a piece pool"):
        build_catalog_from_pool(tmp_path / "other", tmp_path, None, 1, probes=PROBES, embed=hashed_embed)


# --- styleqa ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["own", pytest.param("real", marks=needs_real_styleqa)])
def test_styleqa_probes_never_overlap_the_rows_seeds_train_on(which, styleqa_folder):
    folder = styleqa_folder if which == "own" else REAL_STYLEQA  # own: tests/styleqa_fixture.py
    groups_ = styleqa_groups(5, [1, 3], folder=folder)
    assert list(groups_) == ["style1", "style3"] and all(len(g) == 5 for g in groups_.values())
    assert [r.input for r in groups_["style1"]] == [r.input for r in groups_["style3"]]
    assert groups_["style1"][0].output != groups_["style3"][0].output
    probes = styleqa_probes(8, folder=folder)
    every_row = len((folder / "1_train.jsonl").read_text(encoding="utf-8").splitlines())
    trained = {r.input for g in styleqa_groups(every_row, folder=folder).values() for r in g}
    assert len(probes) == 8 and not set(probes) & trained
    assert styleqa_probes(3, folder=folder, avoid=probes[:2]) == probes[2:5]
