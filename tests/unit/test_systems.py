"""Query-time systems on hand-made vectors: cascade, query shift, rephrase, recall, caching."""

import numpy as np
import pytest

from aligner.evaluation.systems import (
    CachedEncoder,
    CascadeSystem,
    EncoderSystem,
    QueryShiftSystem,
    RephraseSystem,
    cascade_scores,
    rephrase_texts,
    system_recall_hits,
)
from aligner.retrieval.metrics import aesthetic_direction, caption_recall_hits, normalise


def lookup_encoder(table: dict[str, np.ndarray], calls: list | None = None):
    """texts -> the preset vector of each text (records the texts it was asked for)."""
    def encode(texts):
        if calls is not None:
            calls.append(list(texts))
        return np.stack([table[t] for t in texts]).astype(np.float32)
    return encode


def one_query_system(sims: list[float]) -> EncoderSystem:
    """A gallery whose cosine similarities to the query "q" are exactly ``sims``.

    Image i is ``s_i e_0 + sqrt(1 - s_i^2) e_{i+1}`` and the query is ``e_0``.
    """
    n = len(sims)
    g = np.zeros((n, n + 1), np.float32)
    for i, s in enumerate(sims):
        g[i, 0], g[i, i + 1] = s, np.sqrt(1 - s * s)
    q = np.zeros(n + 1, np.float32)
    q[0] = 1
    return EncoderSystem("base", lookup_encoder({"q": q}), g)


def test_encoder_system_search_and_subset():
    s = one_query_system([0.2, 0.9, 0.5, 0.7])
    sc, idx = s.search(["q"], 3)
    assert idx.tolist() == [[1, 3, 2]]
    np.testing.assert_allclose(sc[0], [0.9, 0.7, 0.5], atol=1e-6)
    _, idx = s.search(["q"], 2, subset=np.array([0, 2, 3]))
    assert idx.tolist() == [[3, 2]]  # indices into the whole gallery


def test_cascade_scores_hand_case():
    """Top-3 sims [0.9, 0.8, 0.7] -> z = [1.2247, 0, -1.2247]; aesthetic [0, 1, 3] ->
    mean 4/3, sd sqrt(42/27) = 1.2472, z = [-1.069, -0.267, 1.336]."""
    sim = np.array([[0.9, 0.8, 0.7]])
    aes = np.array([[0.0, 1.0, 3.0]])
    zs = np.array([1.224745, 0.0, -1.224745])
    za = (aes[0] - 4 / 3) / np.sqrt(42 / 27)
    np.testing.assert_allclose(cascade_scores(sim, aes, 1.0)[0], zs + za, atol=1e-5)
    np.testing.assert_allclose(cascade_scores(sim, aes, 0.0)[0], zs, atol=1e-5)
    inf = cascade_scores(sim, aes, float("inf"))[0]
    assert np.argsort(-inf).tolist() == [2, 1, 0]  # pure aesthetic order
    # a missing aesthetic counts as the mean: z = 0
    nan = cascade_scores(sim, np.array([[0.0, np.nan, 2.0]]), 1.0)[0]
    assert nan[1] == pytest.approx(zs[1])


def test_cascade_reranks_only_the_top_n():
    # sims 0.9 > 0.8 > 0.7 > 0.1; image 3 is the most beautiful but outside the top 3
    base = one_query_system([0.9, 0.8, 0.7, 0.1])
    aes = np.array([0.0, 1.0, 3.0, 10.0])
    # final (w=1) = [1.2247-1.069, 0-0.267, -1.2247+1.336] = [0.156, -0.267, 0.111]
    _, idx = CascadeSystem("c", base, aes, n=3, weight=1.0).search(["q"], 3)
    assert idx.tolist() == [[0, 2, 1]]
    _, idx = CascadeSystem("c", base, aes, n=3, weight=float("inf")).search(["q"], 3)
    assert idx.tolist() == [[2, 1, 0]]
    _, idx = CascadeSystem("c", base, aes, n=4, weight=float("inf")).search(["q"], 2)
    assert idx.tolist() == [[3, 2]]
    _, idx = CascadeSystem("c", base, aes, n=3, weight=0.0).search(["q"], 3)
    assert idx.tolist() == [[0, 1, 2]]


def test_cascade_score_ranks_like_its_search():
    rng = np.random.default_rng(0)
    g = normalise(rng.normal(size=(40, 8)))
    qs = normalise(rng.normal(size=(3, 8)))
    base = EncoderSystem("base", lookup_encoder({f"q{i}": q for i, q in enumerate(qs)}), g)
    c = CascadeSystem("c", base, rng.normal(size=40), n=10, weight=1.0)
    texts = ["q0", "q1", "q2"]
    scores, idx = c.search(texts, 10)
    np.testing.assert_allclose(c.score(c.encode(texts), idx), scores, atol=1e-5)


def test_query_shift_renormalises_and_moves_toward_e():
    rng = np.random.default_rng(1)
    g = normalise(rng.normal(size=(200, 16)))
    aes = rng.normal(size=200)
    e = aesthetic_direction(g, aes, 0.1)
    top = aes >= np.quantile(aes, 0.9)
    np.testing.assert_allclose(e, normalise(g[top].mean(0)), atol=1e-6)
    q = normalise(rng.normal(size=16))
    base = EncoderSystem("base", lookup_encoder({"q": q}), g)
    cos = []
    for w in (0.0, 0.25, 0.5, 1.0, 2.0, 8.0):
        shifted = QueryShiftSystem("s", base, aes, 0.1, w).encode(["q"])[0]
        assert np.linalg.norm(shifted) == pytest.approx(1.0, abs=1e-5)
        cos.append(float(shifted @ e))
    np.testing.assert_allclose(QueryShiftSystem("s", base, aes, 0.1, 0.0).encode(["q"])[0], q,
                               atol=1e-6)
    assert all(b > a for a, b in zip(cos, cos[1:], strict=False)), cos
    assert cos[-1] > 0.95


def test_query_shift_needs_scores():
    g = normalise(np.ones((3, 2)))
    base = EncoderSystem("base", lookup_encoder({}), g)
    with pytest.raises(ValueError, match="no aesthetic scores"):
        QueryShiftSystem("s", base, np.full(3, np.nan))


def test_rephrase_texts_maps_ids_and_counts_missing():
    table = {"q1": "q1 rephrased", "q3": "", "other": "unused"}
    texts, missing = rephrase_texts(["q1", "q2", "q3"], ["one", "two", "three"], table)
    assert texts == ["q1 rephrased", "two", "three"]
    assert missing == ["q2", "q3"]  # an empty rephrasing counts as missing
    with pytest.raises(KeyError, match="2 queries have no rephrasing"):
        rephrase_texts(["q1", "q2", "q3"], ["one", "two", "three"], table, on_missing="error")


def test_rephrase_system_encodes_the_rephrasing():
    vecs = {t: normalise(np.eye(3)[i]) for i, t in enumerate(["plain b", "A!", "B?"])}
    calls: list = []
    base = EncoderSystem("base", lookup_encoder(vecs, calls), np.eye(3, dtype=np.float32))
    r = RephraseSystem("rephrase", base, {"a": "A!"})
    _, idx = r.search(["plain a", "plain b"], 1, ids=["a", "b"])
    assert calls[-1] == ["A!", "plain b"]
    assert idx.tolist() == [[1], [0]]
    assert r.missing == {"b"}
    with pytest.raises(ValueError, match="needs query ids"):
        r.encode(["plain a"])


def test_recall_hits_matches_recall_at_k():
    rng = np.random.default_rng(2)
    g = normalise(rng.normal(size=(30, 6)))
    caps = {f"c{i}": normalise(g[i] + 0.6 * rng.normal(size=6)) for i in range(30)}
    s = EncoderSystem("base", lookup_encoder(caps), g)
    texts = [f"c{i}" for i in range(30)]
    got = system_recall_hits(s, texts, np.arange(30), ks=(1, 5, 10))
    want = caption_recall_hits(np.stack([caps[t] for t in texts]), g, np.arange(30), (1, 5, 10))
    for k in want:
        assert got[k].tolist() == want[k].tolist()
    sub = np.arange(10, 20)  # recall within a subset: targets are gallery indices
    got = system_recall_hits(s, texts[10:20], sub, subset=sub, ks=(1,))
    want = caption_recall_hits(np.stack([caps[t] for t in texts[10:20]]), g[sub], np.arange(10), (1,))
    assert got["r@1"].tolist() == want["r@1"].tolist()


def test_cached_encoder_encodes_each_text_once():
    calls: list = []
    enc = CachedEncoder(lookup_encoder({"a": np.ones(2), "b": np.zeros(2)}, calls))
    enc(["a", "b", "a"])
    out = enc(["b", "a"])
    assert calls == [["a", "b"]] and enc.encoded == 2
    np.testing.assert_allclose(out, [[0, 0], [1, 1]])
    enc.clear()
    enc(["a"])
    assert calls[-1] == ["a"]
