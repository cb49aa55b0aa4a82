"""Explained styles: the decomposition, the distances, seed selection, and both sides computing the same numbers."""

import math

import numpy as np
import pytest

from participants.style_direction import Selection, attribute_basis, own_style, select_seed
from protocols.explanations import (STYLE_WORDS, AttributeBasis, Explanation, decompose, describe,
                                    difference_direction, l1_distance, mix_distance, noise_scale,
                                    paired_differences)
from protocols.records import PersonalRecord


def correlated_basis(dim: int = 64) -> AttributeBasis:
    """Four unit attribute directions; the first two share most of their length (cosine 0.8)."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(dim, 4)))
    shared, own_a, own_b, other = q.T
    vectors = np.stack([0.8 * shared + 0.6 * own_a, 0.8 * shared + 0.6 * own_b, other, (shared + other) / math.sqrt(2)])
    return AttributeBasis(("expert", "technical", "friendly", "formal"), vectors)


def test_nnls_recovers_correlated_coefficients_where_scalar_projections_do_not():
    basis = correlated_basis()
    truth = {"expert": 0.7, "technical": 0.3, "friendly": 0.2}
    d = sum(z * basis.vectors[basis.words.index(w)] for w, z in truth.items())

    naive = {w: float(d @ e / np.linalg.norm(e)) for w, e in zip(basis.words, basis.vectors)}
    assert abs(naive["expert"] - 0.7) > 0.1 and naive["formal"] > 0.1  # the authors' projections double-count

    expl = decompose(d, basis, tol=1e-9)
    assert set(expl.coefficients) == set(truth)
    for word, z in truth.items():
        assert expl.coefficients[word] == pytest.approx(z, abs=1e-6)
    assert expl.residual < 1e-6
    assert list(expl.coefficients) == ["expert", "technical", "friendly"]  # largest first
    assert decompose(d, basis, tol=1e-9) == expl


def test_residual_is_relative_and_the_fit_stops_at_tol_or_max_terms():
    basis = correlated_basis()
    d = 0.9 * basis.vectors[2] + 0.1 * basis.vectors[0]
    one = decompose(d, basis, max_terms=1)
    assert list(one.coefficients) == ["friendly"]
    fitted = one.coefficients["friendly"] * basis.vectors[2]
    assert one.residual == pytest.approx(np.linalg.norm(d - fitted) / np.linalg.norm(d))
    assert decompose(d, basis, tol=0.5).coefficients == one.coefficients  # already below 0.5 after one term
    assert len(decompose(d, basis, tol=1e-9).coefficients) == 2


def test_negative_directions_and_zero_are_explained_by_nothing():
    basis = correlated_basis()
    assert decompose(np.zeros(basis.dim), basis) == Explanation({}, 0.0)
    opposite = decompose(-basis.vectors[2], basis)  # no attribute can be subtracted
    assert opposite.coefficients == {} and opposite.residual == pytest.approx(1.0)
    with pytest.raises(ValueError, match="dimension"):
        decompose(np.ones(3), basis)


def test_basis_and_explanation_survive_json_and_bad_bases_are_refused():
    basis = correlated_basis()
    again = AttributeBasis.from_dict(basis.to_dict())
    assert again.words == basis.words and np.array_equal(again.vectors, basis.vectors)
    expl = Explanation({"expert": 0.5}, 0.25)
    assert Explanation.from_dict(expl.to_dict()) == expl
    with pytest.raises(ValueError, match="one vector per word"):
        AttributeBasis(("a", "b"), np.ones((3, 4)))
    with pytest.raises(ValueError, match="distinct"):
        AttributeBasis(("a", "a"), np.ones((2, 4)))


def test_the_noise_scale_is_the_spread_within_each_style_pooled_and_floored():
    rng = np.random.default_rng(0)
    spread = np.array([0.5, 1.0, 2.0, 1e-6])
    # two styles far apart: their distance must not count as noise, only each one's spread around its mean
    groups = [rng.normal(0.0, spread, size=(4000, 4)), 50.0 + rng.normal(0.0, spread, size=(4000, 4))]
    scale = noise_scale(groups, floor=0.25)
    np.testing.assert_allclose(scale[:3], spread[:3], rtol=0.05)
    assert scale[3] == pytest.approx(0.25 * np.median(scale[:3].tolist() + [1e-6]), rel=0.05)
    with pytest.raises(ValueError, match="two or more"):
        noise_scale([np.ones((1, 4))])


def test_a_scaled_basis_fits_in_units_of_the_noise_and_survives_json():
    # one word, [1, 1]; the direction [1, 0] lies half on it in raw units. When dimension 1 is ten times
    # noisier, the fit trusts dimension 0 and reads almost all of the word.
    raw = AttributeBasis(("w",), np.array([[1.0, 1.0]]))
    scaled = AttributeBasis(("w",), np.array([[1.0, 1.0]]), scale=np.array([1.0, 10.0]))
    d = np.array([1.0, 0.0])
    assert decompose(d, raw).coefficients["w"] == pytest.approx(0.5)
    assert decompose(d, scaled).coefficients["w"] == pytest.approx(1.0 / 1.01)
    again = AttributeBasis.from_dict(scaled.to_dict())
    np.testing.assert_array_equal(again.scale, scaled.scale)
    assert AttributeBasis.from_dict(raw.to_dict()).scale is None
    with pytest.raises(ValueError, match="one positive number per dimension"):
        AttributeBasis(("w",), np.ones((1, 2)), scale=np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="one positive number per dimension"):
        AttributeBasis(("w",), np.ones((1, 2)), scale=np.ones(3))


def test_paired_differences_are_one_row_per_input():
    def embed(texts):
        return np.array([[len(t), 1.0] for t in texts])
    rows = paired_differences(["aaa", "b"], ["a", "bb"], embed)
    np.testing.assert_array_equal(rows, [[2.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_array_equal(difference_direction(["aaa", "b"], ["a", "bb"], embed), [0.5, 0.0])


def test_l1_distance_counts_missing_words_as_zero():
    a = Explanation({"expert": 0.5, "concise": 0.25}, 0.1)
    b = Explanation({"expert": 0.25, "friendly": 0.5}, 0.2)
    assert l1_distance(a, b, STYLE_WORDS) == pytest.approx(0.25 + 0.25 + 0.5)
    assert l1_distance(a, b, ("expert",)) == pytest.approx(0.25)


def test_select_seed_takes_the_nearest_mix_and_falls_back_to_the_base_when_none_is_near():
    own = Explanation({"expert": 0.6, "concise": 0.3}, 0.2)
    catalog = {"style6": Explanation({"expert": 0.5, "concise": 0.3}, 0.3),
               "style1": Explanation({"friendly": 0.7, "elementary": 0.2}, 0.4)}
    chosen = select_seed(own, catalog, STYLE_WORDS, max_distance=0.5)
    assert isinstance(chosen, Selection)
    assert chosen.seed_id == "style6" and chosen.distance == pytest.approx(2 * (2 / 3 - 0.5 / 0.8))
    assert chosen.distances["style1"] == pytest.approx(2.0)  # no attribute in common: the largest distance
    assert chosen.reason == ("your data reads as: expert 0.60, concise 0.30 (residual 0.20); nearest seed: style6, "
                             "which reads as: expert 0.50, concise 0.30 (residual 0.30); mix L1 0.08")

    far = select_seed(own, {"style1": catalog["style1"]}, STYLE_WORDS, max_distance=0.5)
    assert far.seed_id is None and "no seed is near" in far.reason and "falling back to the base" in far.reason
    assert select_seed(own, {}, STYLE_WORDS, max_distance=0.5).seed_id is None


def test_the_mix_not_the_strength_decides_which_seed_is_nearest():
    """A seed that shows the user's style at half its strength is nearer than a stronger seed of another mix,
    although raw L1 would prefer the stronger one."""
    own = Explanation({"expert": 0.8, "concise": 0.4}, 0.5)
    same_but_weak = Explanation({"expert": 0.4, "concise": 0.2}, 0.5)
    other_but_strong = Explanation({"expert": 0.8, "concise": 0.1, "friendly": 0.1}, 0.5)
    assert l1_distance(own, other_but_strong, STYLE_WORDS) < l1_distance(own, same_but_weak, STYLE_WORDS)
    assert mix_distance(own, same_but_weak, STYLE_WORDS) == pytest.approx(0.0)
    assert select_seed(own, {"a": other_but_strong, "b": same_but_weak}, STYLE_WORDS).seed_id == "b"
    assert same_but_weak.strength == pytest.approx(0.6) and own.mix().coefficients == pytest.approx(
        {"expert": 2 / 3, "concise": 1 / 3})
    empty = Explanation({}, 1.0)
    assert empty.mix().coefficients == {} and mix_distance(empty, own, STYLE_WORDS) == pytest.approx(1.0)


def test_describe_names_the_largest_attributes():
    expl = Explanation({"expert": 0.61, "concise": 0.32, "friendly": 0.1, "formal": 0.05, "poetic": 0.01}, 0.21)
    assert describe(expl) == "expert 0.61, concise 0.32, friendly 0.10, formal 0.05 (residual 0.21)"
    assert describe(expl, top=1) == "expert 0.61 (residual 0.21)"
    assert describe(Explanation({}, 1.0)) == "no attribute (residual 1.00)"


PLAIN = ["The meeting starts at nine.", "The report is finished.", "It will rain tomorrow."]
WORD_TEXTS = {
    "enthusiastic": ["The meeting starts at nine!!! Can't wait! 🎉🎉", "The report is finished!!! Woohoo! 🥳🙌",
                     "Rain tomorrow!!! Puddle jumping time! ☔😍"],
    "formal": ["Please be advised that the meeting shall commence at nine o'clock.",
               "We hereby confirm that the report has been completed.",
               "Precipitation is anticipated for tomorrow."],
    "concise": ["Meeting: nine.", "Report done.", "Rain tomorrow."],
}


def test_exclamatory_emoji_texts_read_as_enthusiastic_in_minilm_space_on_both_sides():
    from coordinator.explain_seed import explain_seed, minilm_embed
    from participants.profile import embed_texts
    from participants.style_direction import difference_direction as device_direction

    basis = AttributeBasis(tuple(WORD_TEXTS), np.stack([device_direction(t, PLAIN) for t in WORD_TEXTS.values()]))
    lively = ["Lunch is ready!!! Come and get it! 😋🍕", "We won the game!!! Best day ever! 🏆🎉",
              "The package arrived!!! So happy! 📦😍"]
    neutral = ["Lunch is ready.", "We won the game.", "The package arrived."]
    own = decompose(device_direction(lively, neutral), basis)
    assert max(own.coefficients, key=own.coefficients.get) == "enthusiastic"
    assert np.allclose(minilm_embed(neutral), embed_texts(neutral), atol=1e-6)
    coordinator_side = explain_seed(lively, neutral, basis)
    assert l1_distance(coordinator_side, own, basis.words) < 1e-5


def test_difference_direction_needs_paired_texts():
    with pytest.raises(ValueError, match="paired"):
        difference_direction(["a"], ["b", "c"], lambda texts: np.ones((len(texts), 2)))


def test_attribute_basis_and_own_style_on_the_tiny_seed(tiny_seed):
    probes = ["Name a colour.", "Count to three."]
    basis = attribute_basis(tiny_seed, probes, ("concise", "friendly"), max_new_tokens=4)
    assert basis.words == ("concise", "friendly") and basis.vectors.shape == (2, 384)
    assert np.isfinite(basis.vectors).all()
    assert np.array_equal(attribute_basis(tiny_seed, probes, ("concise", "friendly"), max_new_tokens=4).vectors,
                          basis.vectors)
    records = [PersonalRecord("u", "Name a colour.", "Blue, obviously!"), PersonalRecord("u", "Say hi.", "Hi there!")]
    expl = own_style(tiny_seed, records, basis, max_new_tokens=4)
    assert set(expl.coefficients) <= set(basis.words) and all(z >= 0 for z in expl.coefficients.values())
    assert 0.0 <= expl.residual <= 1.0 + 1e-9 and math.isfinite(expl.residual)
    assert own_style(tiny_seed, records, basis, max_new_tokens=4) == expl
