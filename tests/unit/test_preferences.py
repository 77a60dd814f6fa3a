"""Preference construction: grid, partial order, teacher scores, tables, and the job end to end.

Expected values are worked out by hand in each test's docstring. The job test
(:func:`test_job_end_to_end`) runs ``jobs.build_preferences.main`` in-process on 40 rendered
world images embedded with the built-in model (untrained image tower, real text tower; loaded
once per module, about 10 s) - no Ray: the job does not use it.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aligner.data import preferences as T
from aligner.preferences import candidates as Cand
from aligner.preferences import clean as C
from aligner.preferences import grid as G
from aligner.preferences import pairs as P
from aligner.preferences import teacher as Te
from aligner.preferences.degrade import parse_degraded_id

# ----------------------------------------------------------------------------- partial order


def test_dominance_pairs_2x2_by_hand():
    """(0,0) beats the three others; (0,1) and (1,0) beat (1,1); (0,1) vs (1,0) incomparable."""
    got = G.dominance_pairs(2, 2)
    want = [((0, 0), (0, 1)), ((0, 0), (1, 0)), ((0, 0), (1, 1)), ((0, 1), (1, 1)),
            ((1, 0), (1, 1))]
    assert sorted(got) == sorted(want) and len(got) == 5


@pytest.mark.parametrize("u,v", [(1, 3), (3, 1), (2, 3), (4, 4)])
def test_dominance_pair_count(u, v):
    """sum_{i,j} (u - i)(v - j) - uv = u(u+1)/2 * v(v+1)/2 - uv (84 for 4x4)."""
    pairs = G.dominance_pairs(u, v)
    assert len(pairs) == u * (u + 1) // 2 * v * (v + 1) // 2 - u * v
    assert all(a[0] <= b[0] and a[1] <= b[1] and a != b for a, b in pairs)
    assert len(set(pairs)) == len(pairs)


def test_pair_weights():
    """2x2 distances: 1, 1, 2, 1, 1 (mean 6/5) -> margin weights 5/6, 5/6, 10/6, 5/6, 5/6."""
    pairs = G.dominance_pairs(2, 2)
    np.testing.assert_allclose(G.pair_weights(pairs, "uniform"), np.ones(5))
    w = G.pair_weights(pairs, "margin")
    d = np.array([(b[0] - a[0]) + (b[1] - a[1]) for a, b in pairs])
    np.testing.assert_allclose(w, d / 1.2, rtol=1e-6)
    assert w.mean() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        G.pair_weights(pairs, "rank")


# ----------------------------------------------------------------------------- grid


def test_fit_grid_shrinks_gracefully():
    """4x4 stride 2 needs 32; 20 -> stride 1 (16 fit); 12 -> v=3 (4x3); 6 -> 4x3, 3x3, 3x2;
    2 -> ... 2x2, 2x1; 1 -> None (fewer than 2 cells)."""
    assert G.fit_grid(64, 4, 4, 2) == (4, 4, 2)
    assert G.fit_grid(32, 4, 4, 2) == (4, 4, 2)
    assert G.fit_grid(20, 4, 4, 2) == (4, 4, 1)
    assert G.fit_grid(12, 4, 4, 2) == (4, 3, 1)
    assert G.fit_grid(6, 4, 4, 2) == (3, 2, 1)
    assert G.fit_grid(2, 4, 4, 2) == (2, 1, 1)
    assert G.fit_grid(1, 4, 4, 2) is None
    with pytest.raises(ValueError):
        G.fit_grid(10, 0, 4, 2)


def test_sample_grid_by_hand():
    """8 candidates, u=2, v=2, stride=2. Semantic order is 0..7, so row 0 = {0,1,2,3} and
    row 1 = {4,5,6,7}. Aesthetic order in row 0: 2 (.9), 0 (.5), 3 (.1), 1 (-.3) -> picks
    positions 0 and 2: [2, 3]; in row 1: 7 (.8), 5 (.7), 4 (.0), 6 (-.5) -> [7, 4]."""
    sem = np.array([.9, .8, .7, .6, .5, .4, .3, .2])
    aes = np.array([.5, -.3, .9, .1, .0, .7, -.5, .8])
    perm = np.array([5, 2, 7, 0, 3, 6, 1, 4])  # pool order must not matter
    cells = G.sample_grid(sem[perm], aes[perm], G.GridShape(2, 2, 2))
    np.testing.assert_array_equal(perm[cells], [[2, 3], [7, 4]])
    with pytest.raises(ValueError, match="too small"):
        G.sample_grid(sem[:7], aes[:7], G.GridShape(2, 2, 2))


# ----------------------------------------------------------------------------- teacher


def test_zscore():
    np.testing.assert_allclose(Te.zscore(np.array([1.0, 2.0, 3.0])), [-1.2247449, 0, 1.2247449],
                               rtol=1e-6)
    np.testing.assert_array_equal(Te.zscore(np.array([4.0, 4.0])), [0, 0])
    z = Te.zscore(np.array([1.0, np.nan, 3.0]))
    np.testing.assert_allclose(z, [-1, 0, 1])


def test_teacher_components_by_hand():
    """Unit vectors: cand0 = e0, cand1 = e1; q_orig = e0, q_reph = e1, q_bad = (e0+e1)/sqrt2.
    sem = [1, 0]; rephrase = cos(reph) - sem = [0-1, 1-0] = [-1, 1];
    contrast = cos(reph) - cos(bad) = [0 - .7071, 1 - .7071]."""
    e = np.eye(3, dtype=np.float32)
    cand = e[:2]
    bad = (e[0] + e[1]) / np.sqrt(2)
    c = Te.teacher_components(cand, e[0], e[1], bad, np.array([0.5, np.nan]))
    np.testing.assert_allclose(c["sem"], [1, 0])
    np.testing.assert_allclose(c["rephrase"], [-1, 1])
    np.testing.assert_allclose(c["contrast"], [-0.70710677, 0.29289323], rtol=1e-6)
    assert np.isnan(c["scorer"][1])
    no_reph = Te.teacher_components(cand, e[0], None, bad)
    assert set(no_reph) == {"sem", "contrast"}
    np.testing.assert_allclose(no_reph["contrast"], [1 - 0.70710677, -0.70710677], rtol=1e-6)


def test_aesthetic_score_combines_z_scores():
    """z([0, 1, 2]) = [-1.22, 0, 1.22], z([3, 2, 1]) = -that; 2*z1 + 1*z2 = z1."""
    comps = {"scorer": np.array([0.0, 1, 2]), "contrast": np.array([3.0, 2, 1])}
    got = Te.aesthetic_score(comps, ["scorer", "contrast"], [2.0, 1.0])
    np.testing.assert_allclose(got, Te.zscore(comps["scorer"]), rtol=1e-6)
    with pytest.raises(ValueError, match="not available"):
        Te.aesthetic_score(comps, ["rephrase"], [1.0])
    with pytest.raises(ValueError, match="weights"):
        Te.aesthetic_score(comps, ["scorer"], [1.0, 2.0])
    assert Te.teacher_name(["scorer", "contrast"], [1, 0.5]) == "scorer*1+contrast*0.5"


def test_template_rephraser():
    bad = Te.template_rephraser()
    assert bad(["two red circles. "]) == [
        "a low-quality, unfocused, grain-ridden, poorly exposed, colourless, clumsily framed "
        "photo of two red circles with compression artefacts"]
    assert Te.template_rephraser(Te.ORACLE_AWARE_BAD_TEMPLATE)(["two red circles"]) == [
        "a blurry, grainy, dark, dull, off-centre photo of two red circles with a sickly "
        "green tint"]
    with pytest.raises(ValueError):
        Te.template_rephraser("no placeholder")


ORACLE_WORDS = ("green", "tint", "sickly")


def test_default_negatives_are_generic():
    """The default bad prompt and degraded copies name no colour cast of the built-in world;
    the former, oracle-aware ones are kept, but only for the named ablation preset."""
    from aligner.preferences.build import BuildPreferencesConfig
    from aligner.preferences.degrade import DEFAULT_DEGRADE_KINDS, ORACLE_AWARE_DEGRADE_KINDS

    assert not any(w in Te.DEFAULT_BAD_TEMPLATE.lower() for w in ORACLE_WORDS)
    assert all(w in Te.ORACLE_AWARE_BAD_TEMPLATE for w in ORACLE_WORDS)
    assert BuildPreferencesConfig().bad_template == Te.DEFAULT_BAD_TEMPLATE
    # the default template and the template rephraser's bad reorg style say the same (the
    # builder's two antonym sources agree; test_job_with_a_faiss_index_matches_exact_search)
    from aligner.rephrase.template import TemplateRephraser

    qs = ["two red circles on grass", "a cat on a sofa"]
    assert Te.template_rephraser()(qs) == TemplateRephraser("reorg", "bad").rephrase_batch(qs)
    assert Te.template_rephraser(Te.ORACLE_AWARE_BAD_TEMPLATE)(qs) == TemplateRephraser(
        "reorg", "bad_oracle_aware").rephrase_batch(qs)
    s = P.PairSettings()
    assert s.degrade_kinds == list(DEFAULT_DEGRADE_KINDS) and "tint" not in s.degrade_kinds
    assert "hue" in s.degrade_kinds and "tint" in ORACLE_AWARE_DEGRADE_KINDS


def test_teacher_presets_use_generic_negatives_except_the_named_ablation():
    from aligner.preferences.build import BuildPreferencesConfig
    from aligner.preferences.degrade import DEFAULT_DEGRADE_KINDS, ORACLE_AWARE_DEGRADE_KINDS

    presets = Te.TEACHER_PRESETS
    assert {"rephrase", "scorer", "both", "both+degraded"} <= set(presets)
    assert Te.ABLATION_PRESETS == ("both+degraded:oracle_aware",)
    assert set(Te.ABLATION_PRESETS) <= set(presets)
    for name, preset in presets.items():
        if name in Te.ABLATION_PRESETS:
            assert "oracle_aware" in name
            assert preset["bad_template"] == Te.ORACLE_AWARE_BAD_TEMPLATE
            assert preset["degrade_kinds"] == list(ORACLE_AWARE_DEGRADE_KINDS)
        else:
            assert preset["bad_template"] == Te.DEFAULT_BAD_TEMPLATE, name
            assert preset["degrade_kinds"] == list(DEFAULT_DEGRADE_KINDS), name
            assert not any(w in str(preset).lower() for w in ORACLE_WORDS), name
        # every key is a builder field: BuildPreferencesConfig(**preset) builds it
        cfg = BuildPreferencesConfig(**preset)
        assert cfg.bad_template == preset["bad_template"]
        assert cfg.degrade_kinds == preset["degrade_kinds"]
    ablation = presets["both+degraded:oracle_aware"]
    assert {k: v for k, v in ablation.items() if k not in ("bad_template", "degrade_kinds")} == {
        k: v for k, v in presets["both+degraded"].items()
        if k not in ("bad_template", "degrade_kinds")}


def test_settings_checks():
    with pytest.raises(ValueError, match="retrieve_with"):
        P.PairSettings(retrieve_with="both")
    with pytest.raises(ValueError, match="components"):
        P.PairSettings(aesthetic=["iap"], aesthetic_weights=[1])
    with pytest.raises(ValueError, match="aesthetic_weights"):
        P.PairSettings(aesthetic=["scorer"], aesthetic_weights=[1, 2])
    with pytest.raises(ValueError, match="degrade_kinds"):
        P.PairSettings(degrade_kinds=["sepia"])
    s = P.PairSettings(retrieve_with="original", aesthetic=["scorer"], aesthetic_weights=[1])
    assert not s.needs_rephrase and s.degrade_strengths["blur"] == 0.6


# ----------------------------------------------------------------------------- pools and pairs


def _toy_world(n: int = 40, dim: int = 8, seed: int = 0):
    """Random unit image vectors; a text encoder that maps each text to a fixed random unit
    vector, except that a query and its rephrase share most of their direction."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, dim)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    cache: dict[str, np.ndarray] = {}

    def vec(text: str) -> np.ndarray:
        if text not in cache:
            r = np.random.default_rng(abs(hash(text)) % 2**32)
            cache[text] = r.normal(size=dim).astype(np.float32)
        return cache[text]

    def encode(texts):
        out = np.stack([vec(t.split(",")[0]) + 0.3 * vec(t) for t in texts])
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    ids = [f"img-{i:02d}" for i in range(n)]
    return Cand.MatrixCandidates(ids, m, np.linspace(-1, 1, n).astype(np.float32)), encode


def test_matrix_candidates_exact_topk():
    cands, encode = _toy_world()
    q = encode(["a red circle"])
    got = cands.search(q, 5)
    want = np.argsort(-(cands.matrix @ q[0]))[:5]
    assert got.ids[0] == [cands.ids[i] for i in want]
    np.testing.assert_array_equal(got.embeddings[0], cands.matrix[want])
    np.testing.assert_array_equal(got.aesthetic[0], cands.aesthetic[want])


def test_pools_and_pairs():
    """3 queries, K=16, 2x2 grid at stride 2: 5 grid pairs each; 3 degraded pairs each, kinds
    cycling across queries (offset 3 per query): q0 blur,noise,dark; q1 blur,noise,dark ..."""
    cands, encode = _toy_world()
    queries = [P.QueryText(f"q{i}", f"query {i}", f"query {i}, crisp and vivid") for i in range(3)]
    s = P.PairSettings(k=16, u=2, v=2, stride=2, degraded_per_query=3, retrieve_with="rephrased",
                       degrade_kinds=["blur", "noise", "dark", "crop"])
    pools = P.build_pools(queries, encode, cands, s)
    assert [len(p.ids) for p in pools] == [16, 16, 16]
    reph = cands.search(encode(["query 0, crisp and vivid"]), 16).ids[0]
    assert pools[0].ids == reph  # retrieved with the rephrase
    np.testing.assert_allclose(pools[0].sem, cands.matrix[[cands.ids.index(i) for i in reph]]
                               @ encode(["query 0"])[0], rtol=1e-5)
    rows, stats = P.build_pairs(pools, s)
    grid = [r for r in rows if r["source"] == "grid"]
    deg = [r for r in rows if r["source"] == "degraded"]
    assert len(grid) == 15 and len(deg) == 9 and stats["reduced_grids"] == 0
    for r in grid:  # the chosen cell dominates the rejected one
        ci, cj = divmod(r["chosen_cell"], 2)
        ri, rj = divmod(r["rejected_cell"], 2)
        assert ci <= ri and cj <= rj and (ci, cj) != (ri, rj)
        if ci == ri:
            assert r["chosen_aes"] > r["rejected_aes"]
        assert r["teacher"] == "scorer*1+contrast*1"
    assert [r["kind"] for r in deg] == ["blur", "noise", "dark", "crop", "blur", "noise",
                                         "dark", "crop", "blur"]
    for r in deg:
        ref = parse_degraded_id(r["rejected_id"])
        assert ref.id == r["chosen_id"] and ref.kind == r["kind"]
    top = pools[0].ids[int(np.argmax(pools[0].sem))]
    assert deg[0]["chosen_id"] == top


def test_small_pool_shrinks_grid_and_original_retrieval():
    cands, encode = _toy_world(n=6)
    s = P.PairSettings(k=64, u=4, v=4, retrieve_with="original", aesthetic=["scorer"],
                       aesthetic_weights=[1.0], degraded=False)
    pools = P.build_pools([P.QueryText("q", "query", None)], encode, cands, s)
    assert pools[0].ids == cands.search(encode(["query"]), 6).ids[0]
    rows, stats = P.build_pairs(pools, s)
    assert stats["reduced_grids"] == 1 and len(rows) == len(G.dominance_pairs(3, 2))


# ----------------------------------------------------------------------------- tables


def _row(q, c, r, source="grid", w=1.0):
    return {"query_id": q, "query": f"text {q}", "chosen_id": c, "rejected_id": r,
            "source": source, "weight": w}


def test_rows_to_table_schema_and_fill():
    t = T.rows_to_table([_row("q", "a", "b")])
    assert t.schema == T.preference_schema()
    r = t.to_pylist()[0]
    assert r["kind"] == "" and r["chosen_cell"] == -1 and np.isnan(r["chosen_sem"])


def test_dedupe_keeps_the_largest_weight():
    t = T.rows_to_table([_row("q", "a", "b", "grid", 1.0), _row("q", "a", "b", "human", 3.0),
                         _row("q", "a", "c"), _row("p", "a", "b")])
    out, n = C.dedupe(t)
    assert n == 1 and out.num_rows == 3
    kept = [r for r in out.to_pylist() if r["query_id"] == "q" and r["rejected_id"] == "b"]
    assert kept[0]["source"] == "human" and kept[0]["weight"] == 3.0


def test_contradictions_are_dropped_and_counted():
    t = T.rows_to_table([_row("q", "a", "b"), _row("q", "b", "a", "human"), _row("q", "a", "c"),
                         _row("p", "b", "a")])
    out, n = C.drop_contradictions(t)
    assert n == 1
    assert [(r["query_id"], r["chosen_id"], r["rejected_id"]) for r in out.to_pylist()] == [
        ("q", "a", "c"), ("p", "b", "a")]


def test_source_weights_and_caps():
    rows = [_row(f"q{i % 3}", f"a{i}", f"b{i}", "grid" if i % 2 else "degraded")
            for i in range(30)]
    t = T.rows_to_table(rows)
    w = C.parse_source_weights("grid=2, degraded=0")
    assert w == {"grid": 2.0, "degraded": 0.0}
    out, dropped = C.apply_source_weights(t, w)
    assert dropped == 15 and set(out.column("weight").to_pylist()) == {2.0}
    capped, n = C.cap_pairs(t, "query_id", 4, seed=1)
    assert n == 18 and set(C.count_by(capped, "query_id").values()) == {4}
    again, _ = C.cap_pairs(t, "query_id", 4, seed=1)
    assert capped.column("chosen_id").to_pylist() == again.column("chosen_id").to_pylist()
    per_src, n = C.cap_pairs(t, "source", 5, seed=0)
    assert n == 20 and C.count_by(per_src, "source") == {"degraded": 5, "grid": 5}
    assert C.cap_pairs(t, "source", 0)[1] == 0
    cleaned, counts = C.clean_pairs(t, {"degraded": 0.5}, 0, 4, seed=0)
    assert counts["rows_out"] == 12 and counts["capped_per_query"] == 18
    with pytest.raises(ValueError):
        C.parse_source_weights("grid")
    with pytest.raises(ValueError):
        C.parse_source_weights("grid=-1")


def test_read_preferences_checks_the_schema(tmp_path):
    good = pa.table({"query_id": ["q"], "query": ["x"], "chosen_id": ["a"], "rejected_id": ["b"],
                     "source": ["human"], "weight": [2], "rationale": ["nicer light"]})
    pq.write_table(good, tmp_path / "good.parquet")
    t = T.read_preferences(tmp_path / "good.parquet")
    assert t.schema == T.preference_schema()
    assert t.to_pylist()[0]["source"] == "human" and t.to_pylist()[0]["weight"] == 2.0

    def bad(name, **change):
        cols = {k: good.column(k) for k in good.column_names}
        for k, v in change.items():
            if v is None:
                cols.pop(k)
            else:
                cols[k] = v
        pq.write_table(pa.table(cols), tmp_path / f"{name}.parquet")
        return tmp_path / f"{name}.parquet"

    with pytest.raises(ValueError, match="lacks columns"):
        T.read_preferences(bad("nosource", source=None))
    with pytest.raises(ValueError, match="expected a number"):
        T.read_preferences(bad("strweight", weight=pa.array(["1"])))
    with pytest.raises(ValueError, match="empty or null"):
        T.read_preferences(bad("emptyid", chosen_id=pa.array([""])))
    with pytest.raises(ValueError, match=">= 0"):
        T.read_preferences(bad("neg", weight=pa.array([-1.0])))
    with pytest.raises(ValueError, match="over itself"):
        T.read_preferences(bad("self", rejected_id=pa.array(["a"])))
    with pytest.raises(FileNotFoundError):
        T.read_preferences(tmp_path / "missing.parquet")


# ----------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory):
    """40 rendered world images -> corpus, embeddings (built-in model) + manifest, queries."""
    from PIL import Image

    from aligner.aesthetics.scorer import LowLevelScorer
    from aligner.data.embeddings import embeddings_schema
    from aligner.retrieval.models import ModelSpec, load_retriever
    from aligner.runtime.manifest import write_manifest
    from aligner.world.render import encode_png, render, sample_factors

    root = tmp_path_factory.mktemp("prefs")
    imgs = []
    for i in range(40):
        rng = np.random.default_rng([3, 1, i])
        imgs.append(render(sample_factors(rng), 64, rng))
    ids = [f"img-{i:03d}" for i in range(40)]
    (root / "corpus").mkdir()
    pq.write_table(pa.table({"id": ids, "image": [encode_png(x) for x in imgs],
                             "caption": ["shapes"] * 40}), root / "corpus" / "part-0.parquet")
    r = load_retriever(ModelSpec(), device="cpu")
    emb = r.encode_pil([Image.fromarray(x) for x in imgs])
    out = root / "emb"
    (out / "embeddings").mkdir(parents=True)
    pq.write_table(pa.table({
        "id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 256),
        "aesthetic": LowLevelScorer().score(np.stack(imgs)), "caption": ["shapes"] * 40,
        "source": ["x"] * 40}, schema=embeddings_schema(256)), out / "embeddings" / "p0.parquet")
    write_manifest(out, "embed", input=str(root / "corpus"), model=r.describe())
    qs = ["two red circles on grass", "a blue star", "three yellow squares", "a green ring"]
    pq.write_table(pa.table({
        "query_id": ["q0", "q1", "q2", "q3"], "query": qs,
        "split": ["train", "train", "train", "test"],
        "kind": ["content"] * 4,
        "rephrased": [q + ", crisp, clean, well-lit, vivid, centred, with warm golden tones"
                      for q in qs]}), root / "queries.parquet")
    pq.write_table(pa.table({"query_id": ["q0"], "query": qs[:1]}), root / "noreph.parquet")
    extra = pa.table({"query_id": ["q1", "q1", "q1", "q3"], "query": [qs[1]] * 3 + [qs[3]],
                      "chosen_id": ["img-000", "img-001", "img-005", "img-002"],
                      "rejected_id": ["img-001", "img-000", "img-006", "img-003"],
                      "source": ["human"] * 4, "weight": [1.0, 1.0, 2.0, 1.0]})
    pq.write_table(extra, root / "votes.parquet")
    return root


def test_job_end_to_end(job_inputs, tmp_path):
    """3 train queries x (5 grid + 2 degraded) = 21 pairs, plus 3 human rows for q1 of which
    two contradict each other (dropped, 1 contradiction) and one is kept with its weight x 2
    (source_weights); the test query q3's vote is dropped."""
    from jobs.build_preferences import main

    root = job_inputs
    out = tmp_path / "prefs"
    rc = main(["--config", "jobs/configs/build_preferences.yaml", f"embeddings={root / 'emb'}",
               f"queries={root / 'queries.parquet'}", f"output={out}", "k=16", "u=2", "v=2",
               "stride=2", "degraded_per_query=2", "weighting=margin", "retrieve_with=rephrased",
               f"extra_tables=[{root / 'votes.parquet'}]", "source_weights=human=2",
               "examples=1"])
    assert rc == 0
    t = pq.read_table(out / "preferences.parquet")
    assert t.schema == T.preference_schema()
    by = C.count_by(t, "source")
    assert by == {"degraded": 6, "grid": 15, "human": 1}
    assert set(t.column("query_id").to_pylist()) == {"q0", "q1", "q2"}
    human = [r for r in t.to_pylist() if r["source"] == "human"][0]
    assert (human["chosen_id"], human["weight"]) == ("img-005", 4.0)
    grid_w = np.array([r["weight"] for r in t.to_pylist() if r["source"] == "grid"])
    assert grid_w.mean() == pytest.approx(1.0)  # margin weights, mean 1
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["clean"]["contradictions"] == 1
    assert m["counts"]["pairs_per_query"]["queries_with_pairs"] == 3
    assert m["inputs"]["extra_tables"][str(root / "votes.parquet")]["dropped_other_split"] == 1
    assert m["grid"] == {"k": 16, "u": 2, "v": 2, "stride": 2, "retrieve_with": "rephrased",
                         "weighting": "margin"}
    assert (out / "config.yaml").is_file()
    assert (out / "grids.png").stat().st_size > 1000 and (out / "degraded.png").is_file()


def test_job_input_errors(job_inputs, tmp_path, capsys):
    from jobs.build_preferences import main

    root = job_inputs
    common = [f"embeddings={root / 'emb'}", f"output={tmp_path / 'o'}", "splits=[]"]
    assert main([f"queries={root / 'noreph.parquet'}", *common]) == 2
    assert "no 'rephrased' column" in capsys.readouterr().err
    assert main([f"queries={root / 'missing.parquet'}", *common]) == 2
    assert main([f"queries={root / 'queries.parquet'}", f"embeddings={root / 'nothing'}",
                 f"output={tmp_path / 'o'}"]) == 2
    assert not (tmp_path / "o" / "preferences.parquet").exists()


def test_job_reads_uris_as_paths_and_publishes_to_a_uri(job_inputs, tmp_path):
    """Every input as a ``file://`` URI (the object-store branch of the readers, on the local
    disk) and the output as one: the same preferences table and manifest counts as the run on
    plain paths; the manifest is the last file written."""
    from jobs.build_preferences import main

    root = job_inputs
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "queries.parquet").write_bytes((root / "queries.parquet").read_bytes())
    common = ["k=16", "u=2", "v=2", "stride=2", "degraded_per_query=2", "examples=1",
              "source_weights=human=2"]

    def args(base: str, out: str) -> list[str]:
        return [f"embeddings={base}{root / 'emb'}", f"queries={base}{tmp_path / 'q'}",
                f"corpus={base}{root / 'corpus'}", f"extra_tables=[{base}{root / 'votes.parquet'}]",
                f"output={out}", *common]

    assert main(args("", str(tmp_path / "local"))) == 0
    dest = tmp_path / "pub"
    assert main(args("file://", f"file://{dest}")) == 0
    want = pq.read_table(tmp_path / "local" / "preferences.parquet")
    got = pq.read_table(dest / "preferences.parquet")
    assert got.schema == want.schema and want.num_rows == 22
    assert repr(got.to_pylist()) == repr(want.to_pylist())  # every value (NaN != NaN)
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "local", dest))
    assert a["counts"] == b["counts"] and a["held_out"] == b["held_out"]
    assert b["inputs"]["embeddings"] == f"file://{root / 'emb'}"
    assert list(b["inputs"]["extra_tables"].values()) == list(a["inputs"]["extra_tables"].values())
    assert {"grids.png", "degraded.png", "config.yaml"} <= {p.name for p in dest.iterdir()}
    assert max(dest.iterdir(), key=lambda p: p.stat().st_mtime_ns).name == "manifest.json"


def test_job_names_a_missing_uri_input(job_inputs, tmp_path, capsys):
    from jobs.build_preferences import main

    root = job_inputs
    ok = {"embeddings": f"file://{root / 'emb'}", "queries": f"{root / 'queries.parquet'}",
          "output": str(tmp_path / "o")}
    for key, value, message in [
        ("embeddings", f"file://{tmp_path}/no-emb", f"embeddings file://{tmp_path}/no-emb "
                                                    "does not exist"),
        ("queries", f"file://{tmp_path}/no-q", f"queries: file://{tmp_path}/no-q does not exist"),
        ("corpus", f"file://{tmp_path}/no-c", f"corpus file://{tmp_path}/no-c does not exist"),
        ("extra_tables", f"[file://{tmp_path}/no-v]", f"extra table file://{tmp_path}/no-v "
                                                     "does not exist"),
        ("embeddings", "ftp://host/emb", "unsupported URI scheme"),
    ]:
        assert main([f"{k}={v}" for k, v in {**ok, key: value}.items()]) == 2, key
        assert message in capsys.readouterr().err, key
    assert not (tmp_path / "o").exists()


def test_job_falls_back_to_original_queries(job_inputs, tmp_path):
    from jobs.build_preferences import main

    root = job_inputs
    out = tmp_path / "fb"
    assert main([f"embeddings={root / 'emb'}", f"queries={root / 'noreph.parquet'}",
                 f"output={out}", "splits=[]", "fallback_to_original=true", "k=8", "u=2",
                 "v=2", "stride=2", "degraded=false", "examples=0"]) == 0
    t = pq.read_table(out / "preferences.parquet")
    assert C.count_by(t, "source") == {"grid": 5}
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["queries_without_rephrase"] == 1 and m["outputs"]["png"] == []


def test_job_with_a_faiss_index_matches_exact_search(job_inputs, tmp_path):
    """A Flat index returns the exact top-k, so the pairs equal those of the in-memory path;
    the antonym comes from aligner.rephrase's TemplateRephraser (reorg style = the default
    template's wording, so the contrast scores and pairs are the same too)."""
    from aligner.retrieval.index_build import build_index
    from jobs.build_preferences import main

    root = job_inputs
    build_index(root / "emb", tmp_path / "index", "Flat")
    args = [f"embeddings={root / 'emb'}", f"queries={root / 'queries.parquet'}", "k=16", "u=2",
            "v=2", "stride=2", "degraded_per_query=4", "examples=0"]
    assert main([*args, f"output={tmp_path / 'exact'}"]) == 0
    assert main([*args, f"output={tmp_path / 'faiss'}", f"index={tmp_path / 'index'}",
                 "bad_rephraser=template:reorg"]) == 0
    cols = ["query_id", "chosen_id", "rejected_id", "source"]
    a = pq.read_table(tmp_path / "exact" / "preferences.parquet", columns=cols).to_pylist()
    b = pq.read_table(tmp_path / "faiss" / "preferences.parquet", columns=cols).to_pylist()
    assert a == b and len(a) == 3 * (5 + 4)


def test_held_out_images_never_reach_a_preferences_table(job_inputs, tmp_path):
    """With a split column in the corpus, test- and val-split images are never candidates,
    never degraded, and an extra table's rows naming them are dropped; with pool_splits=[]
    the same build does use them (so the check can fail)."""
    from aligner.preferences.degrade import original_id
    from jobs.build_preferences import main

    root = job_inputs
    t = pq.read_table(root / "corpus" / "part-0.parquet")
    split = ["test" if i % 4 == 0 else "val" if i % 4 == 1 else "train" for i in range(40)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(t.append_column("split", pa.array(split)), corpus / "part-0.parquet")
    held = {i for i, s in zip(t.column("id").to_pylist(), split, strict=True) if s != "train"}
    votes = pa.table({"query_id": ["q0", "q1"], "query": ["a", "b"],
                      "chosen_id": ["img-002", "img-000"], "rejected_id": ["img-006", "img-002"],
                      "source": ["human"] * 2, "weight": [1.0, 1.0]})
    pq.write_table(votes, tmp_path / "votes.parquet")
    common = ["--config", "jobs/configs/build_preferences.yaml", f"embeddings={root / 'emb'}",
              f"queries={root / 'queries.parquet'}", f"corpus={corpus}", "k=12", "u=2", "v=2",
              "stride=1", "degraded_per_query=3", "examples=0",
              f"extra_tables=[{tmp_path / 'votes.parquet'}]"]

    def ids_in(out):
        t = pq.read_table(out / "preferences.parquet")
        return {original_id(i) for c in ("chosen_id", "rejected_id")
                for i in t.column(c).to_pylist()}

    assert main(common + [f"output={tmp_path / 'held'}"]) == 0
    used = ids_in(tmp_path / "held")
    assert used and not used & held
    m = json.loads((tmp_path / "held" / "manifest.json").read_text())
    assert m["held_out"] == {"pool_splits": ["train"], "candidates": 20,
                             "held_out": {"test": 10, "val": 10}}
    assert m["inputs"]["extra_tables"][str(tmp_path / "votes.parquet")][
        "dropped_held_out_images"] == 1  # img-000 is a test image; img-002/006 are train
    assert main(common + [f"output={tmp_path / 'all'}", "pool_splits=[]"]) == 0
    assert ids_in(tmp_path / "all") & held


def test_index_candidates_search_only_allowed_ids_widening_as_needed():
    from types import SimpleNamespace

    from aligner.preferences.candidates import IndexCandidates, MatrixCandidates

    rng = np.random.default_rng(0)
    m = rng.normal(size=(200, 8)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    ids = [f"i{j}" for j in range(200)]
    calls = []

    class Exact:  # a stand-in for SearchIndex: exact top-n ids
        ntotal = 200

        def search(self, q, n):
            calls.append(n)
            order = np.argsort(-(q @ m.T), axis=1)[:, :n]
            return SimpleNamespace(ids=[[ids[j] for j in row] for row in order])

    allowed = {ids[j] for j in range(200) if j % 10 == 0}  # 20 of 200
    q = m[:3] + 0.01
    got = IndexCandidates(Exact(), ".", allowed)._search_ids(q, 8)
    keep = [j for j in range(200) if j % 10 == 0]
    want = MatrixCandidates([ids[j] for j in keep], m[keep]).search(q, 8).ids
    assert got == want and all(len(r) == 8 for r in got)
    assert all(i in allowed for r in got for i in r)
    assert IndexCandidates(Exact(), ".")._search_ids(q, 5) == \
        MatrixCandidates(ids, m).search(q, 5).ids


def test_job_with_a_reward_teacher(job_inputs, tmp_path):
    """aesthetic=[reward]: pools are ordered by a reward model's score of (query, image); a grid
    pair in one row prefers the image the reward model scores higher for that query."""
    import torch

    from aligner.retrieval.models import ModelSpec, load_retriever, save_checkpoint
    from aligner.reward.model import (
        HeadSpec,
        Normalisation,
        RewardHead,
        RewardModel,
        save_reward_parts,
    )
    from jobs.build_preferences import main

    root = job_inputs
    ckpt = tmp_path / "rm"
    r = load_retriever(ModelSpec(), device="cpu")
    save_checkpoint(r, ckpt)
    torch.manual_seed(1)
    spec = HeadSpec(3 * r.embed_dim)
    save_reward_parts(ckpt, RewardHead(spec), spec, Normalisation(0.0, 1.0, 2))
    out = tmp_path / "prefs"
    common = [f"embeddings={root / 'emb'}", f"queries={root / 'queries.parquet'}", "k=16",
              "u=2", "v=2", "stride=2", "degraded=false", "examples=0"]
    assert main(common + [f"output={out}", "aesthetic=[reward]", "aesthetic_weights=[1.0]",
                          f"reward_model={ckpt}"]) == 0
    t = pq.read_table(out / "preferences.parquet").to_pylist()
    assert t and {r["teacher"] for r in t} == {"reward*1"}
    m = json.loads((out / "manifest.json").read_text())
    assert m["teacher_spec"]["reward_model"] == str(ckpt)
    assert m["reward"]["images_encoded"] > 0
    rm = RewardModel.load(ckpt)
    corpus = pq.read_table(root / "corpus" / "part-0.parquet").to_pylist()
    png = {c["id"]: c["image"] for c in corpus}
    same_row = [x for x in t if x["chosen_cell"] // 2 == x["rejected_cell"] // 2]
    assert same_row
    for x in same_row:
        a, b = rm.score(x["query"], [png[x["chosen_id"]], png[x["rejected_id"]]])
        assert a > b
    # the component needs its model, and a model needs the component
    assert main(common + [f"output={tmp_path / 'x'}", "aesthetic=[reward]",
                          "aesthetic_weights=[1.0]"]) == 2
    assert main(common + [f"output={tmp_path / 'y'}", f"reward_model={ckpt}"]) == 2
