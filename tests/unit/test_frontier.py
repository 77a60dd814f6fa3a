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


# ------------------------------------------------- chosen on validation, reported on test

def test_choose_and_report_takes_the_selection_split_pick():
    """Validation picks w=0.5 (w=2 is not relevant enough there); on test, w=2 would have
    been picked and w=0.5 is less precise. The test results of w=0.5 are reported."""
    from aligner.evaluation.sweeps import choose_and_report

    val = [_pt("cascade", 0.1, [0.1], [0.9]), _pt("cascade", 0.5, [0.3], [0.85]),
           _pt("cascade", 2.0, [0.6], [0.5])]
    test = [_pt("cascade", 0.1, [0.1], [0.9]), _pt("cascade", 0.5, [0.3], [0.6]),
            _pt("cascade", 2.0, [0.6], [0.82])]
    assert best_at_equal_relevance(test, "aesthetic@10", "precision@10", 0.8).param == 2.0
    chosen, reported = choose_and_report(val, test, "aesthetic@10", "precision@10", 0.8)
    assert chosen is val[1] and reported is test[1]
    assert choose_and_report(val, test, "aesthetic@10", "precision@10", 0.95) is None
    with pytest.raises(ValueError, match="same settings"):
        choose_and_report(val, test[::-1], "aesthetic@10", "precision@10", 0.8)


class _FakeEval:
    """An oracle over a gallery of 'outcome' indices: nDCG and precision per index."""

    def __init__(self, ndcg, precision):
        self.ndcg = np.asarray(ndcg, float)
        self.prec = np.asarray(precision, float)
        self.splits = []

    def graded(self, qids, top, k, split):
        self.splits.append(split)
        first = np.asarray(top)[:, 0]
        return {f"ndcg@{k}": self.ndcg[first], f"precision@{k}": self.prec[first]}


def _sweep_state(monkeypatch, sel_same: bool = False):
    """An EvalState whose systems return one 'outcome' index per split: setting i gives
    outcome 2i on validation queries and 2i + 1 on test queries; the aligned model gives 6 / 7.

    validation: precision [.9, .85, .5], nDCG [.1, .3, .6]; aligned precision .8
    test:       precision [.9, .6, .82], nDCG [.1, .3, .6]; aligned precision .8
    Validation queries must search the val gallery (indices 100, 101), test queries the test
    gallery (200, 201): a search of any other subset raises.
    """
    from aligner.evaluation import equal_relevance
    from aligner.evaluation.build import BuiltSystems
    from aligner.evaluation.config import EvaluateConfig
    from aligner.evaluation.phases import EvalState
    from aligner.evaluation.systems import System

    class Outcome(System):
        caption_transform = "n/a"

        def __init__(self, name, i):
            super().__init__(name, np.zeros((8, 2), np.float32))
            self.i = i

        def search(self, texts, k, ids=None, subset=None):
            test = ids[0].startswith("t")
            if not sel_same:
                want = [200, 201] if test else [100, 101]
                assert subset is not None and subset.tolist() == want, (ids, subset)
            out = np.array([2 * self.i + (q.startswith("t")) for q in ids])[:, None]
            return np.zeros((len(ids), k)), np.repeat(out, k, 1)

    ev = _FakeEval(ndcg=[.1, .1, .3, .3, .6, .6, .2, .2],
                   precision=[.9, .9, .85, .6, .5, .82, .8, .8])
    cfg = EvaluateConfig(baselines=["cascade"])
    st = EvalState(cfg)
    st.qids = st.texts = ["t1", "t2", "t3"]
    st.sel_qids = st.sel_texts = st.qids if sel_same else ["v1", "v2"]
    st.sel_split = "test" if sel_same else "val"
    st.sel_fallback = "no val queries: chosen on test" if sel_same else None
    st.held_split, st.held = "test", np.array([200, 201])
    st.sel_gallery = "test" if sel_same else "val"
    st.sel_subset = st.held if sel_same else np.array([100, 101])
    st.built = BuiltSystems({"base": Outcome("base", 0), "aligned": Outcome("aligned", 3)}, [],
                            np.zeros(8), {}, [])
    st.ev = ev
    st.per = {"aligned": {"ndcg@10": np.full(3, 0.2), "precision@10": np.full(3, 0.8)}}
    weights = [0.1, 1.0, 2.0]
    monkeypatch.setattr(equal_relevance, "baseline_makers", lambda _: {
        "cascade": (weights, lambda w: Outcome(f"cascade w={w}", weights.index(w)))})
    return st


def test_sweep_chooses_on_validation_and_reports_on_test(monkeypatch):
    from aligner.evaluation.equal_relevance import sweep_baselines

    st = _sweep_state(monkeypatch)
    sweep_baselines(st)
    eq = st.equal_relevance
    assert (eq["chosen_on"], eq["reported_on"], eq["fallback"]) == ("val", "test", None)
    assert eq["aligned_selection"]["precision@10"] == pytest.approx(0.8)
    r = eq["families"]["cascade"]
    assert r["setting"] == "cascade w=1"  # test alone would have picked w=2
    assert r["precision@10"] == pytest.approx(0.6)  # reported: its test results
    assert r["ndcg@10"]["mean"] == pytest.approx(0.3)
    assert r["selection"]["precision@10"] == pytest.approx(0.85)
    assert r["ndcg@10_diff"]["mean"] == pytest.approx(0.2 - 0.3)
    assert set(st.ev.splits) == {"val", "test"}  # each measured over its own gallery
    rows = st.frontier["cascade"]
    assert [row["precision@10"] for row in rows] == pytest.approx([.9, .6, .82])
    assert [row["selection"]["precision@10"] for row in rows] == pytest.approx([.9, .85, .5])


def test_sweep_without_selection_queries_says_so(monkeypatch):
    from aligner.evaluation.equal_relevance import sweep_baselines
    from aligner.evaluation.report import equal_relevance_sentences

    st = _sweep_state(monkeypatch, sel_same=True)
    sweep_baselines(st)
    eq = st.equal_relevance
    assert (eq["chosen_on"], eq["reported_on"]) == ("test", "test") and eq["fallback"]
    assert eq["families"]["cascade"]["setting"] == "cascade w=2"
    text = equal_relevance_sentences({"equal_relevance": eq, "aligned_name": "aligned",
                                      "primary": "ndcg@10", "k": 10})
    assert any(t.startswith("Caution: no val queries") for t in text)


def test_selection_queries_from_a_queries_table(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aligner.evaluation.config import EvaluateConfig
    from aligner.evaluation.phases import EvalState, selection_queries

    pq.write_table(pa.table({"query_id": ["a", "b", "c"], "query": ["x", "y", "z"],
                             "split": ["test", "val", "train"]}), tmp_path / "q.parquet")
    pq.write_table(pa.table({"query_id": ["a", "b"], "query": ["x", "y"]}),
                   tmp_path / "nosplit.parquet")
    st = EvalState(EvaluateConfig(corpus="c", queries=str(tmp_path / "q.parquet")))
    st.qids, st.texts = ["a"], ["x"]
    selection_queries(st)
    assert (st.sel_qids, st.sel_texts, st.sel_split, st.sel_fallback) == (["b"], ["y"], "val",
                                                                           None)
    st = EvalState(EvaluateConfig(corpus="c", queries=str(tmp_path / "nosplit.parquet")))
    st.qids, st.texts = ["a", "b"], ["x", "y"]
    selection_queries(st)
    assert st.sel_qids is st.qids and st.sel_split == "test"
    assert "no split column" in st.sel_fallback and st.sel_fallback in st.notes
