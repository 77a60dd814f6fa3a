"""Metrics on hand-computed cases."""

import numpy as np
import pytest

from aligner.evaluation.stats import bootstrap_ci, spearman
from aligner.retrieval.metrics import caption_recall_hits, topk


def test_topk_orders_best_first():
    g = np.eye(4, dtype=np.float32)
    q = np.array([[0.1, 0.9, 0.3, 0.0]], np.float32)
    s, i = topk(q, g, 3)
    assert i.tolist() == [[1, 2, 0]] and s[0].tolist() == pytest.approx([0.9, 0.3, 0.1])


def test_recall_hand_case():
    g = np.eye(3, dtype=np.float32)
    # query 0 ranks its target first; query 1 second; query 2 third
    q = np.array([[1, 0, 0], [0.9, 0.5, 0], [0.5, 0.4, 0.1]], np.float32)
    hits = caption_recall_hits(q, g, np.array([0, 1, 2]), ks=(1, 2, 3))
    assert hits["r@1"].tolist() == [True, False, False]
    assert hits["r@2"].tolist() == [True, True, False]
    assert hits["r@3"].all()


def test_bootstrap_ci_covers_mean_and_shrinks():
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 1.0, 30)
    big = rng.normal(1.0, 1.0, 3000)
    m, lo, hi = bootstrap_ci(small)
    M, LO, HI = bootstrap_ci(big)
    assert lo < m < hi and LO < M < HI
    assert (HI - LO) < (hi - lo) / 5
    assert LO < 1.0 < HI


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(0.894427, abs=1e-5)
