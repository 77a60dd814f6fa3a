"""Baseline sweeps and the comparison at equal relevance, on hand-made numbers."""

import math

import numpy as np
import pytest

from aligner.evaluation.sweeps import Point, best_at_equal_relevance, frontier_rows, qualifies
from aligner.evaluation.systems import EncoderSystem, RephraseSystem
from aligner.retrieval.metrics import normalise


def _pt(fam, w, aes, prec, rec=None):
    return Point(fam, w, {"aesthetic@10": np.array(aes, float),
                          "precision@10": np.array(prec, float)},
                 None if rec is None else np.array(rec, float))


def test_point_means_and_labels():
    p = _pt("cascade", 0.25, [0.1, 0.3, np.nan], [1.0, 0.5, 0.0], [1, 0, 1, 1])
    assert p.mean("aesthetic@10") == pytest.approx(0.2)  # NaN left out
    assert p.mean("precision@10") == pytest.approx(0.5)
    assert p.mean("recall@10") == pytest.approx(0.75)
    assert p.label == "cascade w=0.25"
    assert _pt("rephrase", 0.5, [0], [0]).label == "rephrase mix=0.5"
    assert _pt("cascade", math.inf, [0], [0]).label == "cascade w=inf"
    assert math.isnan(_pt("rephrase", 1, [0], [0]).mean("recall@10"))


def test_best_setting_at_equal_or_better_relevance():
    # more weight: more aesthetics, less relevance (precision 0.9 -> 0.5, recall .8 -> .6)
    pts = [_pt("cascade", 0.1, [0.10], [0.9], [1, 1, 1, 1, 0]),
           _pt("cascade", 0.5, [0.20], [0.7], [1, 1, 1, 0, 0]),
           _pt("cascade", 2.0, [0.40], [0.5], [1, 1, 1, 0, 0])]
    best = best_at_equal_relevance(pts, "aesthetic@10", "precision@10", precision=0.7,
                                   recall=0.6)
    assert best.param == 0.5  # w=2 is less precise, w=0.1 qualifies but is plainer
    best = best_at_equal_relevance(pts, "aesthetic@10", "precision@10", precision=0.7,
                                   recall=0.7)
    assert best.param == 0.1  # w=0.5's recall .6 < .7
    assert best_at_equal_relevance(pts, "aesthetic@10", "precision@10", 0.95) is None
    # a setting within the slack of the target counts as equally relevant
    assert best_at_equal_relevance(pts, "aesthetic@10", "precision@10", precision=0.75,
                                   recall=0.65, slack=0.05).param == 0.5
    # precision only (recall None)
    assert best_at_equal_relevance(pts, "aesthetic@10", "precision@10", 0.5).param == 2.0


def test_a_setting_without_its_own_recall_uses_the_inner_models():
    p = _pt("rephrase", 1.0, [0.3], [0.8])
    assert qualifies(p, 0.8, 0.7, "precision@10", inner_recall=0.75)
    assert not qualifies(p, 0.8, 0.7, "precision@10", inner_recall=0.65)
    assert qualifies(p, 0.8, 0.7, "precision@10", inner_recall=None)
    assert not qualifies(p, 0.81, None, "precision@10")


def test_frontier_rows():
    rows = frontier_rows([_pt("query_shift", 0.2, [0.1, 0.3], [1, 0], [1, 0])],
                         "aesthetic@10", "precision@10")
    assert rows == [{"setting": "query_shift w=0.2", "param": 0.2,
                     "aesthetic@10": {"mean": pytest.approx(0.2)}, "precision@10": 0.5,
                     "recall@10": 0.5}]


def test_rephrase_mix_interpolates_the_query():
    vec = {"plain": np.array([1.0, 0.0]), "nice": np.array([0.0, 1.0])}
    inner = EncoderSystem("base", lambda ts: np.stack([vec[t] for t in ts]),
                          np.eye(2, dtype=np.float32))
    full = RephraseSystem("r", inner, {"q1": "nice"})
    half = RephraseSystem("r", inner, {"q1": "nice"}, mix=0.5)
    none = RephraseSystem("r", inner, {"q1": "nice"}, mix=0.0)
    np.testing.assert_allclose(full.encode(["plain"], ["q1"]), [[0, 1]])
    np.testing.assert_allclose(half.encode(["plain"], ["q1"]), normalise(np.array([[1, 1.0]])))
    np.testing.assert_allclose(none.encode(["plain"], ["q1"]), [[1, 0]])
    with pytest.raises(ValueError, match="mix"):
        RephraseSystem("r", inner, {}, mix=1.5)
