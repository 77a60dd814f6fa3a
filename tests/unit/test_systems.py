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


# ----------------------------------------------------------------------------- teacher re-rank

def teacher_world(n_images: int = 30, dim: int = 8, seed: int = 3):
    """A random gallery, three queries with a rephrasing each, their bad rephrases (the
    builder's default template), every text's vector, and a scorer column with a NaN."""
    from aligner.preferences.teacher import template_rephraser

    rng = np.random.default_rng(seed)
    g = normalise(rng.normal(size=(n_images, dim)))
    texts, ids = ["q0", "q1", "q2"], ["id0", "id1", "id2"]
    table = {i: f"nice {t}" for i, t in zip(ids, texts, strict=True)}
    bad = template_rephraser()(texts)
    vecs = {t: normalise(rng.normal(size=dim)) for t in texts + list(table.values()) + bad}
    aes = rng.normal(size=n_images)
    aes[int(np.argmax(g @ vecs["q0"]))] = np.nan  # an unscored image in q0's pool
    return g, texts, ids, table, bad, vecs, aes


def test_teacher_rerank_with_zero_weight_is_the_base_order():
    from aligner.evaluation.systems import TeacherRerankSystem

    g, texts, ids, table, _, vecs, aes = teacher_world()
    base = EncoderSystem("base", lookup_encoder(vecs), g)
    t = TeacherRerankSystem("t", base, aes, table, ["scorer", "contrast"], [1.0, 1.0], n=10,
                            weight=0.0)
    _, got = t.search(texts, 10, ids=ids)
    _, want = base.search(texts, 10)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("components,weights", [
    (["scorer", "contrast"], [1.0, 1.0]), (["contrast"], [1.0]),
    (["scorer", "rephrase", "contrast"], [0.5, 2.0, 1.0])])
def test_teacher_rerank_with_a_large_weight_sorts_by_the_builders_teacher(components, weights):
    """The top n re-sorted by aligner.preferences.teacher's score of that pool, computed the
    way build_pools computes it (original, rephrased and bad query vectors; scorer column)."""
    from aligner.evaluation.systems import TeacherRerankSystem
    from aligner.preferences.teacher import aesthetic_score, teacher_components

    g, texts, ids, table, bad, vecs, aes = teacher_world()
    base = EncoderSystem("base", lookup_encoder(vecs), g)
    n = 12
    _, pool = base.search(texts, n)
    for w in (1e6, float("inf")):
        t = TeacherRerankSystem("t", base, aes, table, components, weights, n=n, weight=w)
        _, got = t.search(texts, n, ids=ids)
        for b, text in enumerate(texts):
            comps = teacher_components(g[pool[b]], vecs[text], vecs[table[ids[b]]],
                                       vecs[bad[b]], aes[pool[b]])
            teacher = aesthetic_score(comps, components, weights)
            want = pool[b][np.argsort(-teacher, kind="stable")]
            assert got[b].tolist() == want.tolist(), (w, b)
            assert set(got[b]) == set(pool[b])  # only the base's top n are re-ranked


def test_teacher_rerank_score_ranks_like_its_search():
    from aligner.evaluation.systems import TeacherRerankSystem

    g, texts, ids, table, _, vecs, aes = teacher_world()
    base = EncoderSystem("base", lookup_encoder(vecs), g)
    t = TeacherRerankSystem("t", base, aes, table, ["scorer", "contrast"], [1.0, 1.0], n=10,
                            weight=1.0)
    scores, idx = t.search(texts, 10, ids=ids)
    q = t.encode(texts, ids)
    assert q.shape == (3, 3 * g.shape[1])
    np.testing.assert_allclose(t.score(q, idx), scores, atol=1e-5)
    # any candidates (outside the top n too) get a finite score on the same scale
    _, far = base.search(texts, 30)
    s = t.score(q, far[:, 20:])
    assert s.shape == (3, 10) and np.isfinite(s).all()


def test_teacher_rerank_latency_includes_the_teachers_encodings():
    """Timed with cleared caches, the teacher pays for encoding the query, its rephrasing and
    its bad rephrase (3 texts per query); the base for the query only."""
    import time as _time

    from aligner.evaluation.systems import TeacherRerankSystem, timed_search

    g, texts, ids, table, _, vecs, aes = teacher_world()
    delay = 0.01

    def slow(batch):
        _time.sleep(delay * len(batch))
        return lookup_encoder(vecs)(batch)

    enc = CachedEncoder(slow)
    base = EncoderSystem("base", enc, g)
    t = TeacherRerankSystem("t", base, aes, table, ["scorer", "contrast"], [1.0, 1.0], n=10)
    enc.clear()
    _, t_base = timed_search(base, texts, 10, ids=ids)
    assert enc.encoded == 3
    enc.clear()
    before = enc.encoded
    _, t_teacher = timed_search(t, texts, 10, ids=ids)
    assert enc.encoded - before == 9  # query + rephrasing + bad rephrase, per query
    assert t_base >= 3 * delay and t_teacher >= 9 * delay  # the encoder's sleep is timed
    # a warm cache would hide the cost (nothing encoded): the evaluation clears it first
    before = enc.encoded
    timed_search(t, texts, 10, ids=ids)
    assert enc.encoded == before
    # a scorer-only teacher needs no extra text
    enc.clear()
    before = enc.encoded
    timed_search(TeacherRerankSystem("s", base, aes, table, ["scorer"], [1.0], n=10), texts,
                 10, ids=ids)
    assert enc.encoded - before == 3


def test_teacher_rerank_missing_rephrasings_and_captions():
    from aligner.evaluation.systems import TeacherRerankSystem

    g, texts, ids, table, _, vecs, aes = teacher_world()
    calls: list = []
    base = EncoderSystem("base", lookup_encoder(vecs, calls), g)
    t = TeacherRerankSystem("t", base, aes, {"id0": table["id0"]}, ["rephrase", "contrast"],
                            [1.0, 1.0], n=10)
    q = t.encode(texts, ids)
    assert calls[1] == ["nice q0", "q1", "q2"] and t.missing == {"id1", "id2"}
    d = g.shape[1]
    np.testing.assert_allclose(q[1, d:2 * d], q[1, :d])  # no rephrasing: the query itself
    calls.clear()
    t.encode(["q1"])  # a caption query has no id: it is its own rephrasing, not encoded twice
    assert len(calls) == 2 and calls[0] == ["q1"]
    strict = TeacherRerankSystem("t", base, aes, {}, ["contrast"], [1.0], on_missing="error")
    with pytest.raises(KeyError, match="no rephrasing"):
        strict.encode(texts, ids)
    with pytest.raises(ValueError, match="teacher components"):
        TeacherRerankSystem("t", base, aes, {}, ["oracle"], [1.0])
    with pytest.raises(ValueError, match="weights"):
        TeacherRerankSystem("t", base, aes, {}, ["scorer", "contrast"], [1.0])
    r = t.reweighted(2.0, name="t w=2")
    assert (r.weight, r.name, r.components, r.table) == (2.0, "t w=2", t.components, t.table)
    assert t.describe()["teacher"] == "rephrase*1+contrast*1"


def test_teacher_rerank_with_a_reward_component_sorts_by_the_reward_model():
    """A teacher with a ``reward`` component: the top n re-sorted (at a huge weight) by the
    reward model's score of (query text, image), its text vector carried after the other
    three; score() agrees with search()."""
    import torch

    from aligner.evaluation.systems import TeacherRerankSystem
    from aligner.retrieval.models import ModelSpec, load_retriever
    from aligner.reward.model import HeadSpec, Normalisation, RewardHead, RewardModel

    g, texts, ids, table, _, vecs, aes = teacher_world()
    base = EncoderSystem("base", lookup_encoder(vecs), g)
    r = load_retriever(ModelSpec(), device="cpu")
    torch.manual_seed(0)
    rm = RewardModel(r, RewardHead(HeadSpec(3 * r.embed_dim)), HeadSpec(3 * r.embed_dim),
                     Normalisation(0.0, 1.0, 2))
    rng = np.random.default_rng(0)
    reward_gallery = rm.encode_pixels(rng.integers(0, 255, (len(g), 64, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="reward"):
        TeacherRerankSystem("t", base, aes, table, ["reward"], [1.0])
    n = 12
    t = TeacherRerankSystem("t", base, aes, table, ["reward"], [1.0], n=n, weight=float("inf"),
                            reward=rm, reward_gallery=reward_gallery)
    q = t.encode(texts, ids)
    assert q.shape == (len(texts), 3 * g.shape[1] + r.embed_dim)
    _, pool = base.search(texts, n)
    _, got = t.search(texts, n, ids=ids)
    txt = rm.encode_texts(texts)
    for b in range(len(texts)):
        rewards = rm.rewards_from_features(np.repeat(txt[b:b + 1], n, 0), reward_gallery[pool[b]])
        assert got[b].tolist() == pool[b][np.argsort(-rewards, kind="stable")].tolist()
    t1 = t.reweighted(1.0)
    scores, idx = t1.search(texts, 10, ids=ids)
    np.testing.assert_allclose(t1.score(t1.encode(texts, ids), idx), scores, atol=1e-5)
