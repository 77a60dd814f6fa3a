"""HPIR per aspect on hand-made pools: the rows each aspect draws, the labels of the oracle and
of the simulated raters, the systems' agreement and the CIs."""

import json

import numpy as np
import pytest

from aligner.evaluation.hpir import (
    AspectPairs,
    RaterLabels,
    draw_aspect_pairs,
    hpir_aspects,
    hpir_summary,
    paired_aspect_difference,
    rater_labels,
    system_agreement,
)
from aligner.world.raters import RaterPanel, expected_agreement, make_panel


def _random_pools(q: int = 40, p: int = 50, rel: float = 0.3, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.random((q, p)) < rel, rng.uniform(-1, 1, (q, p))


def _relevant_counts(pairs: AspectPairs, match: np.ndarray):
    q = pairs.query[:, None]
    return match[q, pairs.a].sum(1), match[q, pairs.b].sum(1)


# ----------------------------------------------------------------------------- the draw


def test_aesthetics_rows_are_disjoint_hold_equal_relevant_counts_and_mean_beauty():
    match, beauty = _random_pools()
    pairs = draw_aspect_pairs(match, beauty, "aesthetics", pairs_per_query=6, seed=3)
    assert pairs.aspect == "aesthetics" and len(pairs.query) > 150
    assert pairs.a.shape == pairs.b.shape == (len(pairs.query), 5)
    na, nb = _relevant_counts(pairs, match)
    assert (na == nb).all() and (na >= 1).all()
    for i, (qi, a, b) in enumerate(zip(pairs.query, pairs.a, pairs.b, strict=True)):
        assert not set(a) & set(b) and len(set(a)) == len(set(b)) == 5
        assert pairs.value_a[i] == pytest.approx(beauty[qi, a].mean())  # the whole row's looks
        assert pairs.value_b[i] == pytest.approx(beauty[qi, b].mean())
    assert (np.abs(pairs.value_a - pairs.value_b) >= 0.02).all()
    assert len(set(na.tolist())) > 1  # r drawn per pair, not fixed


def test_accuracy_rows_hold_different_relevant_counts_and_drop_nothing():
    match, beauty = _random_pools()
    pairs = draw_aspect_pairs(match, beauty, "accuracy", pairs_per_query=6, seed=3)
    na, nb = _relevant_counts(pairs, match)
    assert (na != nb).all()
    np.testing.assert_array_equal(pairs.value_a, na)
    np.testing.assert_array_equal(pairs.value_b, nb)
    assert pairs.drawn == len(pairs.query) == 40 * 6 and pairs.skipped_queries == 0
    for a, b in zip(pairs.a, pairs.b, strict=True):
        assert not set(a) & set(b)
    assert pairs.oracle_prefers_a.mean() == pytest.approx(0.5, abs=0.1)  # "a" is random


def test_relevant_counts_are_drawn_from_what_the_pool_allows():
    # rows of 2; 3 relevant + 7 irrelevant: aesthetics can only show r = 1 (r = 2 needs 4);
    # accuracy can show (0, 1), (0, 2), (1, 2), each about a third of the time
    match = np.array([[1, 1, 1, 0, 0, 0, 0, 0, 0, 0]], bool)
    beauty = np.array([[0.9, 0.1, -0.7, 0, 0, 0, 0, 0, 0, 0]])
    aes = draw_aspect_pairs(match, beauty, "aesthetics", pairs_per_query=60, row_size=2)
    na, nb = _relevant_counts(aes, match)
    assert (na == 1).all() and (nb == 1).all()
    acc = draw_aspect_pairs(match, beauty, "accuracy", pairs_per_query=600, row_size=2)
    counts = {k: 0 for k in [(0, 1), (0, 2), (1, 2)]}
    for x, y in zip(*_relevant_counts(acc, match), strict=True):
        counts[(min(x, y), max(x, y))] += 1
    assert all(150 < c < 250 for c in counts.values()), counts


def test_ties_are_dropped_and_counted():
    # rows of 1 relevant image: the pair {0.50, 0.51} is a tie (closer than 0.02), the others
    # (0.50 vs 0.80, 0.51 vs 0.80) are not
    match = np.array([[1, 1, 1, 0]], bool)
    beauty = np.array([[0.50, 0.51, 0.80, 0.0]])
    pairs = draw_aspect_pairs(match, beauty, "aesthetics", pairs_per_query=90, row_size=1)
    assert pairs.drawn == 90 and 0 < len(pairs.query) < 90
    kept = {frozenset((int(a[0]), int(b[0]))) for a, b in zip(pairs.a, pairs.b, strict=True)}
    assert kept == {frozenset((0, 2)), frozenset((1, 2))}
    res = hpir_aspects(match, beauty, {}, pairs_per_query=90, row_size=1)["aesthetics"]
    assert res["ties_dropped"] == 90 - res["pairs"] > 0 and res["pairs_drawn"] == 90


def test_pools_that_cannot_hold_a_pair_are_skipped_and_counted():
    match = np.zeros((3, 20), bool)
    match[0, :6] = True   # room for both aspects
    match[1, 0] = True    # 1 relevant: no aesthetics pair (needs 2), accuracy (0 vs 1) fine
    beauty = np.linspace(-1, 1, 60).reshape(3, 20)  # query 2: nothing relevant at all
    aes = draw_aspect_pairs(match, beauty, "aesthetics")
    acc = draw_aspect_pairs(match, beauty, "accuracy")
    assert aes.skipped_queries == 2 and set(aes.query.tolist()) == {0}
    assert acc.skipped_queries == 1 and set(acc.query.tolist()) == {0, 1}
    res = hpir_aspects(match, beauty, {})
    assert res["aesthetics"]["skipped_queries"] == 2 and res["accuracy"]["skipped_queries"] == 1
    # all relevant, no room for a wrong-content image: accuracy cannot differ
    full = draw_aspect_pairs(np.ones((1, 4), bool), beauty[:1, :4], "accuracy", row_size=2)
    assert full.skipped_queries == 1 and len(full.query) == 0


def test_the_draw_depends_only_on_the_pool_and_the_seed():
    match, beauty = _random_pools(q=10)
    for aspect in ("aesthetics", "accuracy"):
        p1 = draw_aspect_pairs(match, beauty, aspect, seed=5)
        p2 = draw_aspect_pairs(match, beauty, aspect, seed=5)
        p3 = draw_aspect_pairs(match, beauty, aspect, seed=6)
        for x, y in zip(p1, p2, strict=True):
            np.testing.assert_array_equal(x, y)
        assert not np.array_equal(p1.a, p3.a)
    rng = np.random.default_rng(0)
    r1 = hpir_aspects(match, beauty, {"s": rng.random(match.shape)}, seed=2)
    r2 = hpir_aspects(match, beauty, {"t": -beauty, "u": rng.random(match.shape)}, seed=2)
    for aspect in ("aesthetics", "accuracy"):
        np.testing.assert_array_equal(r1[aspect]["draw"].a, r2[aspect]["draw"].a)
        np.testing.assert_array_equal(r1[aspect]["labels"].prefers_a,
                                      r2[aspect]["labels"].prefers_a)


def test_unknown_aspect_is_refused():
    with pytest.raises(ValueError, match="aspect"):
        draw_aspect_pairs(np.ones((1, 4), bool), np.zeros((1, 4)), "beauty")


# ----------------------------------------------------------------------------- agreement


def test_beauty_scorer_agrees_on_aesthetics_reversed_one_never():
    match, beauty = _random_pools()
    pairs = draw_aspect_pairs(match, beauty, "aesthetics")
    assert system_agreement(pairs, beauty).tolist() == [1.0] * len(pairs.query)
    assert system_agreement(pairs, -beauty).tolist() == [0.0] * len(pairs.query)
    # a system that sees beauty only among relevant images agrees less, but above chance
    part = system_agreement(pairs, match * beauty).mean()
    assert 0.5 < part < 1.0


def test_match_scorer_agrees_on_accuracy_and_ties_on_aesthetics():
    match, beauty = _random_pools()
    acc = draw_aspect_pairs(match, beauty, "accuracy")
    assert (system_agreement(acc, match.astype(float)) == 1.0).all()
    assert (system_agreement(acc, -match.astype(float)) == 0.0).all()
    aes = draw_aspect_pairs(match, beauty, "aesthetics")
    assert (system_agreement(aes, match.astype(float)) == 0.5).all()  # equal counts: a tie


def test_agreement_by_hand_with_oracle_and_rater_labels():
    # two pairs of query 0: rows {0, 1} vs {2, 3} (oracle prefers b), {0, 2} vs {1, 3} (a)
    pairs = AspectPairs(np.array([0, 0]), np.array([[0, 1], [0, 2]]), np.array([[2, 3], [1, 3]]),
                        np.array([0.1, 0.6]), np.array([0.4, 0.2]), "aesthetics", 2, 0)
    scores = np.array([[1.0, 2.0, 3.0, 0.0]])  # pair 0: 1.5 vs 1.5 (tie); pair 1: 2.0 vs 1.0 (a)
    np.testing.assert_array_equal(system_agreement(pairs, scores), [0.5, 1.0])
    labels = RaterLabels(np.array([True, False]), np.array([0.2, 0.6]), np.array([0, 1]),
                         1.0, 0.65)
    np.testing.assert_array_equal(system_agreement(pairs, scores, labels), [0.5, 0.0])


# ----------------------------------------------------------------------------- raters


@pytest.mark.parametrize("target", [0.65, 0.8])
def test_calibrated_temperature_gives_the_target_agreement_per_aspect(target):
    match, beauty = _random_pools()
    temps = []
    for aspect in ("aesthetics", "accuracy"):
        pairs = draw_aspect_pairs(match, beauty, aspect)
        labels = rater_labels(pairs, target_agreement=target, seed=4)
        assert labels.expected_agreement == pytest.approx(target, abs=0.01)
        panel = RaterPanel(labels.temperature, make_panel(40, 0.25, 1.0, 4).multipliers)
        du = pairs.value_a - pairs.value_b
        assert expected_agreement(du, panel) == pytest.approx(target, abs=0.01)
        temps.append(labels.temperature)
    assert temps[0] != pytest.approx(temps[1], rel=0.1)  # each aspect has its own scale


def test_confidence_is_how_clear_the_difference_was_to_the_rater():
    match, beauty = _random_pools()
    pairs = draw_aspect_pairs(match, beauty, "aesthetics")
    labels = rater_labels(pairs, seed=2)
    du = pairs.value_a - pairs.value_b
    panel = RaterPanel(labels.temperature, make_panel(40, 0.25, 1.0, 2).multipliers)
    p_a = panel.p_first(du, labels.rater)
    p_choice = np.where(labels.prefers_a, p_a, 1 - p_a)
    np.testing.assert_allclose(labels.confidence, np.abs(2 * p_choice - 1))
    assert ((labels.confidence >= 0) & (labels.confidence <= 1)).all()
    big = np.abs(du) > np.median(np.abs(du))
    assert labels.confidence[big].mean() > labels.confidence[~big].mean() + 0.1
    assert 0.55 < (labels.prefers_a == pairs.oracle_prefers_a).mean() < 0.95  # noisy choices


def test_no_pairs_give_empty_labels():
    pairs = draw_aspect_pairs(np.zeros((2, 10), bool), np.zeros((2, 10)), "aesthetics")
    labels = rater_labels(pairs)
    assert len(labels.prefers_a) == 0 and np.isnan(labels.temperature)
    res = hpir_aspects(np.zeros((2, 10), bool), np.zeros((2, 10)), {"s": np.zeros((2, 10))})
    assert res["aesthetics"]["pairs"] == 0
    assert np.isnan(res["aesthetics"]["systems"]["s"]["oracle"]["mean"])


# ----------------------------------------------------------------------------- hpir_aspects


def test_hpir_aspects_reports_oracle_rater_and_weighted_agreement():
    match, beauty = _random_pools(q=60)
    flat = np.where(match, beauty, 0.0)
    rng = np.random.default_rng(9)
    systems = {"beauty": flat, "ugly": -flat, "random": rng.random(match.shape)}
    res = hpir_aspects(match, flat, systems)
    aes = res["aesthetics"]
    assert aes["systems"]["beauty"]["oracle"]["mean"] == 1.0
    assert aes["systems"]["ugly"]["oracle"]["mean"] == 0.0
    assert aes["systems"]["beauty"]["oracle"]["clusters"] == len(np.unique(aes["draw"].query))
    assert aes["rater_agreement"] == pytest.approx(0.65, abs=0.01)
    labels, pairs = aes["labels"], aes["draw"]
    for name, scores in systems.items():
        agree = system_agreement(pairs, scores, labels)
        w = labels.confidence
        got = aes["systems"][name]
        assert got["raters"]["mean"] == pytest.approx(agree.mean())
        assert got["raters_weighted"]["mean"] == pytest.approx((w * agree).sum() / w.sum())
        np.testing.assert_array_equal(aes["per_pair"][name], system_agreement(pairs, scores))
    # the oracle's own agreement with the raters is the ceiling: above chance, below 1
    ceiling = aes["ceiling"]
    assert 0.5 < ceiling["ci_low"] <= ceiling["mean"] <= ceiling["ci_high"] < 1.0
    assert ceiling["mean"] == pytest.approx(aes["systems"]["beauty"]["raters"]["mean"])
    assert aes["ceiling_weighted"]["mean"] > ceiling["mean"]  # clear pairs are called right
    acc = res["accuracy"]
    assert acc["ties_dropped"] == 0 and 0.5 < acc["ceiling"]["mean"] < 1.0


def test_paired_difference_resamples_queries_over_the_same_pairs():
    match, beauty = _random_pools(q=30)
    rng = np.random.default_rng(3)
    systems = {"good": match * beauty, "random": rng.random(match.shape)}
    res = hpir_aspects(match, beauty, systems)
    d = paired_aspect_difference(res, "aesthetics", "good", "random")
    per = res["aesthetics"]["per_pair"]
    assert d["mean"] == pytest.approx((per["good"] - per["random"]).mean())
    assert d["ci_low"] > 0 and d["clusters"] == len(np.unique(res["aesthetics"]["draw"].query))
    same = paired_aspect_difference(res, "accuracy", "good", "good")
    assert same["mean"] == same["ci_low"] == same["ci_high"] == 0.0


def test_summary_is_json_ready():
    match, beauty = _random_pools(q=8)
    res = hpir_aspects(match, beauty, {"s": beauty})
    out = json.loads(json.dumps(hpir_summary(res)))
    assert set(out) == {"aesthetics", "accuracy"}
    assert {"draw", "labels", "per_pair"}.isdisjoint(out["aesthetics"])
    assert set(out["accuracy"]["systems"]["s"]) == {"oracle", "raters", "raters_weighted"}
