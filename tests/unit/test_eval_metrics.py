"""Oracle-based evaluation metrics on hand-made cases: nDCG@K with gain match x beauty, beauty
among relevant results, aesthetic@K differences, teacher diagnostics, and the WorldEval
additions they rely on (HPIR per aspect: tests/unit/test_hpir.py)."""

import numpy as np
import pytest

from aligner.evaluation.oracle_metrics import (
    BY_CONSTRUCTION,
    aesthetic_at_k,
    beauty_among_relevant,
    dcg,
    ideal_dcg,
    minmax01,
    ndcg_at_k,
    paired_difference,
    preference_agreement,
    teacher_diagnostics,
)
from aligner.evaluation.stats import ci_dict, weighted_bootstrap_ci
from aligner.world import WorldSpec, generate_world

# ----------------------------------------------------------------------------- nDCG


def test_dcg_and_ndcg_by_hand():
    """Gains [1, 0, 0.5] at ranks 1..3: DCG = 1/log2(2) + 0 + 0.5/log2(4) = 1.25. The ideal
    ranking of the relevant gains {1, 0.5, 0.8} is [1, 0.8, 0.5]: 1 + 0.8/log2(3) + 0.25."""
    g = np.array([[1.0, 0.0, 0.5]])
    assert dcg(g, 3)[0] == pytest.approx(1.25)
    assert dcg(g, 1)[0] == pytest.approx(1.0)
    idcg = ideal_dcg([np.array([0.5, 1.0, 0.8])], 3)
    assert idcg[0] == pytest.approx(1 + 0.8 / np.log2(3) + 0.25)
    assert ndcg_at_k(g, idcg, 3)[0] == pytest.approx(1.25 / idcg[0])
    ideal = np.array([[1.0, 0.8, 0.5]])
    assert ndcg_at_k(ideal, idcg, 3)[0] == pytest.approx(1.0)
    # no relevant image in the gallery: undefined, not 0
    assert np.isnan(ndcg_at_k(np.zeros((1, 3)), ideal_dcg([np.zeros(0)], 3), 3)[0])
    # fewer relevant images than k: the ideal stops there
    assert ideal_dcg([np.array([0.6])], 10)[0] == pytest.approx(0.6)


def test_wrong_content_gains_nothing_and_beauty_counts_among_relevant():
    """Two rankings with the same relevant images: the one with the more beautiful relevant
    images on top wins; a beautiful wrong-content image adds nothing."""
    b01 = minmax01(np.array([-1.0, 0.0, 1.0, 0.9]), -1.0, 1.0)  # [0, .5, 1, .95]
    match = np.array([True, True, True, False])
    idcg = ideal_dcg([b01[match]], 2)
    top_good, top_bad, top_wrong = [2, 1], [1, 2], [3, 1]
    n = [ndcg_at_k((match * b01)[None, t], idcg, 2)[0] for t in (top_good, top_bad, top_wrong)]
    assert n[0] == pytest.approx(1.0) and n[0] > n[1] > n[2]
    assert n[2] == pytest.approx(0.5 / np.log2(3) / idcg[0])
    br = beauty_among_relevant(np.array([[1.0, 0.9, 0.0], [0.9, 0.8, 0.1]]),
                               np.array([[True, False, True], [False, False, False]]))
    assert br[0] == pytest.approx(0.5) and np.isnan(br[1])


def test_minmax01():
    np.testing.assert_allclose(minmax01(np.array([2.0, 3.0, 4.0]), 2.0, 4.0), [0, 0.5, 1])
    assert (minmax01(np.array([1.0, 1.0]), 1.0, 1.0) == 0).all()


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


def test_world_eval_graded_equals_a_brute_force_count(world):
    """nDCG@10, beauty among relevant, precision@10 and aesthetic@10 of random rankings over
    the test gallery, against a direct loop over the oracle table."""
    from aligner.evaluation.oracle import WorldEval

    ids = world.corpus(["id"])["id"].to_pylist()
    ev = WorldEval(world, np.zeros((len(ids), 4), np.float32), ids)
    oracle = {r["id"]: r for r in world.oracle().to_pylist()}
    truth = {r["query_id"]: r for r in world.query_truth().to_pylist()}
    test = [i for i, x in enumerate(ids) if oracle[x]["split"] == "test"]
    qids = world.queries(split="test", kind="content")["query_id"].to_pylist()
    rng = np.random.default_rng(2)

    def match(q, i):
        t, o = truth[q], oracle[ids[i]]
        return (o["shape"] == t["shape"] and o["colour"] == t["colour"]
                and (not t["count"] or o["count"] == t["count"])
                and (not t["background"] or o["background"] == t["background"]))

    top = []  # some relevant images (shuffled in), the rest random test images
    for q in qids:
        rel = [i for i in test if match(q, i)][:4]
        rest = rng.choice([i for i in test if i not in rel], 10 - len(rel), replace=False)
        top.append(rng.permutation(np.concatenate([rel, rest]).astype(int)))
    top = np.array(top)
    g = ev.graded(qids, top, 10, "test")
    assert np.isfinite(g["beauty_relevant@10"]).sum() >= 3  # the relevant branch is exercised
    beauty = np.array([oracle[ids[i]]["beauty"] for i in test])
    lo, hi = beauty.min(), beauty.max()

    for qi, q in enumerate(qids):
        b01 = {i: (oracle[ids[i]]["beauty"] - lo) / (hi - lo) for i in test}
        gains = [b01[i] * match(q, i) for i in top[qi]]
        ideal = sorted((b01[i] for i in test if match(q, i)), reverse=True)[:10]
        idcg = sum(x / np.log2(r + 2) for r, x in enumerate(ideal))
        d = sum(x / np.log2(r + 2) for r, x in enumerate(gains))
        if idcg > 0:
            assert g["ndcg@10"][qi] == pytest.approx(d / idcg)
        else:
            assert np.isnan(g["ndcg@10"][qi])
        rel = [oracle[ids[i]]["beauty"] for i in top[qi] if match(q, i)]
        if rel:
            assert g["beauty_relevant@10"][qi] == pytest.approx(np.mean(rel))
        else:
            assert np.isnan(g["beauty_relevant@10"][qi])
        assert g["precision@10"][qi] == pytest.approx(len(rel) / 10)
        assert g["aesthetic@10"][qi] == pytest.approx(
            np.mean([oracle[ids[i]]["beauty"] for i in top[qi]]))
    counts = ev.relevant_counts(qids, "test")
    assert counts.tolist() == [sum(match(q, i) for i in test) for q in qids]
