"""Oracle-based evaluation metrics on hand-made cases: HPIR agreement, aesthetic@K differences,
teacher diagnostics, and the small WorldEval additions they rely on."""

import numpy as np
import pytest

from aligner.evaluation.oracle_metrics import (
    BY_CONSTRUCTION,
    RowPairs,
    aesthetic_at_k,
    draw_row_pairs,
    hpir_agreement,
    pair_agreement,
    paired_difference,
    preference_agreement,
    row_utility,
    teacher_diagnostics,
)
from aligner.evaluation.stats import ci_dict, weighted_bootstrap_ci
from aligner.world import WorldSpec, generate_world

# ----------------------------------------------------------------------------- HPIR


def test_row_utility_counts_irrelevant_images_as_zero():
    # mean(match * b') = (1*0.5 + 0*1.0 + 1*0.1) / 3 = 0.2
    assert row_utility(np.array([1, 0, 1]), np.array([0.5, 1.0, 0.1])) == pytest.approx(0.2)


def test_hpir_oracle_scorer_gets_all_reversed_gets_none():
    rng = np.random.default_rng(0)
    util = rng.random((12, 20)) * (rng.random((12, 20)) < 0.6)  # match * b'
    pairs = draw_row_pairs(util, pairs_per_query=4, row_size=5, tie=0.02, seed=0)
    assert len(pairs.query) > 20
    assert hpir_agreement(pairs, util)["mean"] == 1.0
    assert hpir_agreement(pairs, -util)["mean"] == 0.0
    assert hpir_agreement(pairs, np.zeros_like(util))["mean"] == 0.5  # no preference: 1/2
    # rows of a pair share no image; utilities are the rows' means
    for q, a, b, ua in zip(pairs.query, pairs.a, pairs.b, pairs.util_a, strict=True):
        assert not set(a) & set(b)
        assert ua == pytest.approx(util[q, a].mean())


def test_hpir_ties_are_dropped():
    # every image of query 0 has the same utility: all its pairs tie; query 1 never ties
    util = np.zeros((2, 10))
    util[0] = 0.5
    util[1] = np.arange(10) / 10.0 * (np.arange(10) % 2)  # 0 and 0.1 .. 0.9 alternately
    pairs = draw_row_pairs(util, pairs_per_query=6, row_size=2, tie=0.02, seed=3)
    assert pairs.drawn == 12
    assert 0 not in pairs.query.tolist()
    assert np.all(np.abs(pairs.util_a - pairs.util_b) >= 0.02)
    res = hpir_agreement(pairs, util)
    assert res["ties_dropped"] == 12 - len(pairs.query) >= 6


def test_pair_agreement_hand_case():
    """Rows {0, 1} vs {2, 3}, the oracle prefers the first. Scores [0.9, 0.1, 0.3, 0.3]:
    row means 0.5 vs 0.3 -> agrees; [0.1, 0.1, 0.3, 0.3] -> disagrees; equal means -> 1/2."""
    pairs = RowPairs(np.array([0]), np.array([[0, 1]]), np.array([[2, 3]]), np.array([0.8]),
                     np.array([0.2]), 1)
    assert pair_agreement(pairs, np.array([[0.9, 0.1, 0.3, 0.3]])).tolist() == [1.0]
    assert pair_agreement(pairs, np.array([[0.1, 0.1, 0.3, 0.3]])).tolist() == [0.0]
    assert pair_agreement(pairs, np.array([[0.5, 0.0, 0.25, 0.25]])).tolist() == [0.5]


def test_same_seed_same_rows():
    util = np.random.default_rng(1).random((5, 50))
    a, b = draw_row_pairs(util, seed=4), draw_row_pairs(util, seed=4)
    assert np.array_equal(a.a, b.a) and np.array_equal(a.b, b.b)
    assert not np.array_equal(a.a, draw_row_pairs(util, seed=5).a)


# ----------------------------------------------------------------------------- aesthetic@K


def test_aesthetic_at_k_and_paired_differences_on_a_tiny_gallery():
    beauty = np.array([0.1, 0.5, 0.9, 0.3, np.nan])
    base = np.array([[0, 3, 1], [1, 0, 2]])     # @2: (0.1+0.3)/2 = 0.2, (0.5+0.1)/2 = 0.3
    aligned = np.array([[2, 1, 0], [2, 4, 3]])  # @2: (0.9+0.5)/2 = 0.7, 0.9 (NaN left out)
    a_base, a_al = aesthetic_at_k(beauty, base, 2), aesthetic_at_k(beauty, aligned, 2)
    np.testing.assert_allclose(a_base, [0.2, 0.3])
    np.testing.assert_allclose(a_al, [0.7, 0.9])
    np.testing.assert_allclose(aesthetic_at_k(beauty, aligned, 3), [0.5, 0.6])
    d = paired_difference(a_al, a_base)  # per query 0.5 and 0.6
    assert d["mean"] == pytest.approx(0.55) and d["n"] == 2
    assert 0.5 - 1e-9 <= d["ci_low"] <= d["ci_high"] <= 0.6 + 1e-9
    # a query with no known score is NaN and dropped from the paired difference
    assert np.isnan(aesthetic_at_k(beauty, np.array([[4]]), 1)[0])
    assert paired_difference(np.array([1.0, np.nan]), np.array([0.5, 0.2]))["n"] == 1


def test_weighted_bootstrap_ci():
    v = np.array([1.0, 0.0, 1.0, 1.0])
    same = weighted_bootstrap_ci(v, np.ones(4))
    assert same["mean"] == pytest.approx(ci_dict(v)["mean"])
    w = weighted_bootstrap_ci(v, np.array([0.0, 3.0, 1.0, 0.0]))  # (0*3 + 1*1) / 4
    assert w["mean"] == pytest.approx(0.25) and w["ci_low"] <= 0.25 <= w["ci_high"]
    assert np.isnan(weighted_bootstrap_ci(v, np.zeros(4))["mean"])


# ----------------------------------------------------------------------------- teacher


BEAUTY = {"a": 1.0, "b": 0.5, "c": 0.0, "d": 0.5}


def beauty_of(ids):
    return np.array([BEAUTY.get(i, np.nan) for i in ids])


def test_preference_agreement_hand_case():
    chosen = ["a", "c", "b", "a", "a", "x"]
    rejected = ["b", "a", "d", "a~blur", "c~jpeg", "a"]
    w = np.array([2.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    d = preference_agreement(chosen, rejected, w, beauty_of)
    # oracle pairs: a>b agrees (w 2), c>a disagrees (w 1), b=d tie (w 1, does not agree)
    assert d["pairs"] == 6 and d["oracle_pairs"] == 3
    assert d["degraded_pairs"] == 2 and d["degraded_agreement"] == BY_CONSTRUCTION
    assert d["unknown_ids"] == 1 and d["ties"] == 1
    assert d["agreement"]["mean"] == pytest.approx(1 / 3)
    assert d["agreement_weighted"]["mean"] == pytest.approx(2 / 4)
    assert d["beauty_margin"]["mean"] == pytest.approx((0.5 - 1.0 + 0.0) / 3)


def test_teacher_diagnostics_by_source():
    d = teacher_diagnostics(["a", "a", "c"], ["b", "a~noise", "b"], np.ones(3),
                            ["grid", "degraded", "grid"], beauty_of)
    assert set(d["by_source"]) == {"grid", "degraded"}
    assert d["by_source"]["grid"]["agreement"]["mean"] == pytest.approx(0.5)
    assert d["by_source"]["degraded"]["oracle_pairs"] == 0
    assert d["all"]["pairs"] == 3


# ----------------------------------------------------------------------------- WorldEval additions


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from aligner.world import World

    d = tmp_path_factory.mktemp("world")
    generate_world(WorldSpec(n_images=120, n_queries=40, n_paraphrases=4, rows_per_file=60), d,
                   workers=1, progress=False)
    return World(d)


def test_world_eval_additions(world):
    from aligner.evaluation.oracle import WorldEval

    ids = world.corpus(["id"])["id"].to_pylist()
    emb = np.random.default_rng(0).normal(size=(len(ids), 4)).astype(np.float32)
    ev = WorldEval(world, emb, ids)
    u = ev.utility_beauty()
    assert u.min() == pytest.approx(0.1) and u.max() == pytest.approx(1.0)
    assert np.argsort(u).tolist() == np.argsort(ev.beauty).tolist()
    b = ev.beauty_of([ids[3], "nope", ids[3] + "~blur"])
    assert b[0] == pytest.approx(ev.beauty[3]) and np.isnan(b[1:]).all()
    q = world.queries(split="test", kind="content")["query_id"].to_pylist()[:5]
    top = np.random.default_rng(1).integers(0, len(ids), (5, 10))
    m = ev.content_matches(q, top)
    assert m.shape == (5, 10) and m.dtype == bool
    np.testing.assert_allclose(m.mean(1), ev.relevance(q, top))
    other = ev.with_embeddings(emb * 2)
    assert other.emb is not ev.emb and other.ids is ev.ids and ev.emb is emb
    with pytest.raises(ValueError):
        ev.with_embeddings(emb[:3])


def test_cluster_ci_resamples_queries_and_is_wider_for_correlated_rows():
    from aligner.evaluation.oracle_metrics import paired_difference
    from aligner.evaluation.stats import ci_dict, cluster_ci_dict

    rng = np.random.default_rng(0)
    q_effect = rng.normal(0, 1, 40)
    groups = np.repeat(np.arange(40), 25)  # 25 strongly correlated rows per query
    v = q_effect[groups] + rng.normal(0, 0.1, groups.size)
    rows, clus = ci_dict(v), cluster_ci_dict(v, groups)
    assert clus["mean"] == pytest.approx(rows["mean"]) and clus["clusters"] == 40
    assert (clus["ci_high"] - clus["ci_low"]) > 3 * (rows["ci_high"] - rows["ci_low"])
    w = np.where(groups < 20, 2.0, 1.0)
    assert cluster_ci_dict(v, groups, w)["mean"] == pytest.approx(np.average(v, weights=w))
    d = paired_difference(v, np.zeros_like(v), groups)
    assert d["resampled"] == "clusters" and d["ci_low"] == clus["ci_low"]
    with pytest.raises(ValueError):
        cluster_ci_dict(v, groups[:-1])
    assert np.isnan(cluster_ci_dict(np.zeros(0), np.zeros(0))["mean"])
