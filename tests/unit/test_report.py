"""The evaluation report (HTML + PNG, verdict sentences) and the evaluate job end to end on a
tiny generated world with two tiny checkpoints."""

import io
import json
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from aligner.evaluation.report import summary_table, verdict_sentences, write_report


def ci(mean, lo=None, hi=None, n=10):
    return {"mean": mean, "ci_low": mean - 0.01 if lo is None else lo,
            "ci_high": mean + 0.01 if hi is None else hi, "n": n}


def fake_metrics() -> dict:
    def system(kind, r10, a10, hp):
        return {"kind": kind, "recall": {"r@1": ci(r10 / 3), "r@5": ci(r10 / 2), "r@10": ci(r10),
                                         "transform": "same"},
                "ndcg@10": ci(a10), "ndcg@5": ci(a10), "beauty_relevant@10": ci(a10 / 2),
                "aesthetic@10": ci(a10 / 3), "precision@10": ci(0.5),
                "scorer_aesthetic@10": ci(0.1),
                "hpir_aesthetics": {"oracle": ci(hp), "raters": ci(hp - 0.05),
                                    "raters_weighted": ci(hp - 0.04)},
                "hpir_accuracy": {"oracle": ci(0.9), "raters": ci(0.7), "raters_weighted": ci(0.8)},
                "timing": {"ms_per_query": 1.5}}
    return {
        "k": 10, "also_ks": [5], "primary": "ndcg@10", "base_name": "base",
        "aligned_name": "aligned", "oracle": True, "setup": "tiny fake",
        "gallery": {"held_out": {"split": "test", "images": 40, "relevant_per_query": {
            "queries": 5, "min": 20, "p10": 20, "median": 21, "mean": 22.5, "max": 30,
            "under_10": 0}}, "selection": {"split": "val", "images": 20}},
        "hpir": {"pool": "base top 50", "row_size": 5, "aspects": {
            "aesthetics": {"pairs": 12, "ties_dropped": 1, "skipped_queries": 0,
                           "rater_agreement": 0.65, "ceiling": ci(0.8)},
            "accuracy": {"pairs": 16, "ties_dropped": 0, "skipped_queries": 0,
                         "rater_agreement": 0.65, "ceiling": ci(0.8)}}},
        "systems": {"base": system("model", 0.70, 0.10, 0.60),
                    "cascade": system("cascade", 0.60, 0.30, 0.61),
                    "rephrase": system("rephrase", 0.70, 0.14, 0.60),
                    "aligned": system("model", 0.66, 0.20, 0.65)},
        "comparisons": {
            "base": {"ndcg@10_diff": ci(0.10, 0.05, 0.15), "recall@10_diff": ci(-0.04, -0.06, -0.02),
                     "precision@10_diff": ci(-0.02, -0.05, 0.01),
                     "hpir_aesthetics_diff": ci(0.05), "hpir_accuracy_diff": ci(-0.01)},
            "cascade": {"ndcg@10_diff": ci(-0.10, -0.15, -0.05), "recall@10_diff": ci(0.06)},
            "rephrase": {"ndcg@10_diff": ci(0.06, -0.01, 0.12), "recall@10_diff": ci(-0.04)},
        },
        "teacher": {"grid": {"all": {"pairs": 10, "oracle_pairs": 8, "degraded_pairs": 2,
                                     "degraded_agreement": "by construction", "unknown_ids": 0,
                                     "ties": 0, "agreement": ci(0.6), "agreement_weighted": ci(0.62),
                                     "beauty_margin": ci(0.05)}, "by_source": {}},
                    "broken": {"error": "no such file"}},
        "premise": {"ndcg@10_gain": ci(0.2)},
        "skipped": ["nothing really"], "notes": ["a note"],
    }


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


class Sections(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.imgs, self.stack, self.errors = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        elif tag not in ("meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_verdict_says_where_aligned_does_not_win():
    v = verdict_sentences(fake_metrics(), recall_tolerance=0.02)
    assert v[0].startswith("aligned wins on ndcg@10 against 1 of 3 systems (base)")
    assert "does NOT win against cascade, rephrase" in v[0]
    text = "\n".join(v)
    assert "aligned beats base on ndcg@10 by +0.100 [0.050, 0.150] at recall@10 -4.0 points" in text
    assert "HPIR-aesthetics +5.0 points" in text and "HPIR-accuracy -1.0 points" in text
    assert "aligned is WORSE than cascade" in text
    assert "aligned does NOT beat rephrase on ndcg@10: +0.060 [-0.010, 0.120], the CI includes 0" in text
    assert "aligned loses recall@10 against base" in text  # -4 points, CI below 0
    assert "loses recall@10 against rephrase" in text and "against cascade: +" not in text
    no = verdict_sentences({**fake_metrics(), "comparisons": {}})
    assert no == ["No system named 'aligned' was evaluated: nothing to compare."]


def test_report_writes_html_and_png(tmp_path):
    m = fake_metrics()
    m["verdict"] = verdict_sentences(m)
    grids = [("two red circles", [("base", [{"image": png("red"), "label": "#1 beauty +0.1\nmatch",
                                             "match": True}]),
                                  ("aligned", [{"image": png("blue"), "label": "#1\nOFF-content",
                                                "match": False}, {"image": None, "label": "x"}])])]
    paths = write_report(tmp_path, m, np.array([0.1, -0.05, 0.2, np.nan]), grids)
    page = paths["html"].read_text()
    p = Sections()
    p.feed(page)
    assert not p.errors and not p.stack[1:], (p.errors, p.stack)
    for section in ("verdict", "systems", "gallery", "hpir", "comparisons", "plots", "teacher",
                    "grids", "skipped"):
        assert section in p.ids
    assert all(src.startswith("data:image/png;base64,") for src in p.imgs) and len(p.imgs) >= 3
    assert "aligned is WORSE than cascade" in page and "by construction" in page
    assert "no such file" in page and "two red circles" in page
    with Image.open(paths["png"]) as im:
        assert im.format == "PNG" and im.height > 400
    assert "Beauty among relevant results can only show" in page and "<td>21</td>" in page
    assert "two simulated raters agree on 0.65" in page
    table = summary_table(m)
    assert "aligned" in table.splitlines()[-len(m["verdict"]) - 3]
    assert "0.200 [0.190, 0.210]" in table and "HPIR-aes" in table
    assert "wrong content included" in table


def test_report_without_gains_or_grids(tmp_path):
    m = fake_metrics()
    m["systems"]["base"]["ndcg@10"] = {"mean": None}
    paths = write_report(tmp_path, m)
    assert paths["png"].is_file() and "n/a" in paths["html"].read_text()


# ----------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 300-image world, an untrained built-in checkpoint (base) and a perturbed one (aligned),
    a rephrase table missing one test query, a preference table, the base's embeddings."""
    from aligner.evaluation.oracle import with_good_looks
    from aligner.world import World, WorldSpec, generate_world
    from tests.helpers.models import base_and_perturbed

    d = tmp_path_factory.mktemp("eval")
    generate_world(WorldSpec(n_images=300, n_queries=60, n_paraphrases=6, rows_per_file=100),
                   d / "world", workers=1, progress=False)
    world = World(d / "world")
    base_and_perturbed(d, seed=1)
    q = world.queries(split="test", kind="content")
    rows = [{"query_id": i, "query": t, "rephrased": with_good_looks(t)}
            for i, t in zip(q["query_id"].to_pylist(), q["query"].to_pylist(), strict=True)]
    (d / "rephrase").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[1:]), d / "rephrase" / "queries.parquet")
    ids = world.corpus(["id"], split="train")["id"].to_pylist()
    prefs = [{"query_id": "q", "query": "q", "chosen_id": ids[i], "rejected_id": ids[i + 1],
              "source": "grid", "weight": 1.0} for i in range(0, 40, 2)]
    prefs += [{"query_id": "q", "query": "q", "chosen_id": ids[i], "rejected_id": ids[i] + "~blur",
               "source": "degraded", "weight": 0.5} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(prefs), d / "prefs.parquet")
    _write_embeddings(d, world)
    return d, world


def _write_embeddings(d, world):
    """A jobs.embed-like output of the base (right hash) and one with a stale hash."""
    from aligner.evaluation.gallery import Gallery, embed_gallery
    from aligner.retrieval.models import load_checkpoint

    t = world.corpus(["id", "image", "caption", "split"])
    gal = Gallery(t["id"].to_pylist(), t["image"].to_pylist(), None, None, "test")
    r = load_checkpoint(d / "base", device="cpu")
    emb = embed_gallery(r, gal)
    table = pa.table({"id": gal.ids, "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(emb.reshape(-1)), emb.shape[1]), "aesthetic": pa.array(
        np.linspace(-1, 1, len(gal.ids)), pa.float32()), "caption": t["caption"],
        "source": gal.ids})
    for name, chash in (("emb_base", r.checkpoint_hash), ("emb_stale", "0000")):
        (d / name / "embeddings").mkdir(parents=True)
        pq.write_table(table, d / name / "embeddings" / "part-0.parquet")
        (d / name / "manifest.json").write_text(json.dumps(
            {"model": {"checkpoint_hash": chash}, "scorer": {"name": "lowlevel"}}))


def _strict_json(path):
    def bad(c):
        raise ValueError(f"non-JSON constant {c}")
    return json.loads(path.read_text(), parse_constant=bad)


def test_evaluate_job_end_to_end(tiny, capsys):
    from aligner.evaluation.oracle import WorldEval
    from jobs.evaluate import main

    d, world = tiny
    out = d / "out"
    rc = main(["world=" + str(d / "world"), f"base_checkpoint={d / 'base'}",
               f"models=aligned={d / 'aligned'}", f"base_embeddings={d / 'emb_base'}",
               f"embeddings=aligned={d / 'emb_stale'}", f"rephrased={d / 'rephrase'}",
               f"preferences=mix={d / 'prefs.parquet'},gone={d / 'missing'}",
               "hpir.pool=20", "baseline.cascade_n=20", "gallery=all",
               "baseline.teacher_aesthetic=[scorer,contrast]", f"output={out}"])
    assert rc == 0
    for f in ("metrics.json", "report.html", "report.png", "manifest.json", "config.yaml",
              "per_query.parquet"):
        assert (out / f).is_file(), f
    m = _strict_json(out / "metrics.json")
    assert list(m["systems"]) == ["base", "cascade", "query_shift", "rephrase",
                                  "teacher_rerank", "aligned"]
    assert set(m["comparisons"]) == {"base", "cascade", "query_shift", "rephrase",
                                     "teacher_rerank"}
    assert set(m["pairwise"]["ndcg@10"]["aligned"]) == set(m["comparisons"])
    assert m["primary"] == "ndcg@10"
    s = m["systems"]
    for name in s:
        for key in ("ndcg@10", "ndcg@5", "aesthetic@10", "aesthetic@5", "precision@10",
                    "scorer_aesthetic@10"):
            assert s[name][key]["n"] > 0, (name, key)
        for aspect in ("hpir_aesthetics", "hpir_accuracy"):
            assert s[name][aspect]["oracle"]["n"] > 0 and s[name][aspect]["raters"]["n"] > 0
    assert {"hpir_aesthetics_diff", "hpir_accuracy_diff", "ndcg@10_diff",
            "beauty_relevant@10_diff"} <= set(m["comparisons"]["base"])
    assert s["rephrase"]["recall"]["r@10"] == s["base"]["recall"]["r@10"]
    assert s["rephrase"]["recall"]["transform"].startswith("n/a")
    assert s["cascade"]["recall"]["transform"] == "rerank"
    # the training teacher at query time: from the config here (the checkpoint has no align
    # manifest), timed with its extra encodings
    assert s["teacher_rerank"]["recall"]["transform"] == "rerank"
    assert m["teacher_rerank"]["teacher"] == "scorer*1+contrast*1"
    assert m["teacher_rerank"]["source"].startswith("config")
    assert "its rephrasing and its bad rephrase" in s["teacher_rerank"]["timing"]["note"]
    assert all(s[n]["timing"]["ms_per_query"] > 0 for n in s)
    # the base's recall is WorldEval.caption_recall's (same gallery, same captions)
    t = world.corpus(["id", "caption"])
    emb_t = pq.read_table(d / "emb_base" / "embeddings")
    from aligner.data.embeddings import embedding_matrix
    from aligner.retrieval.models import load_checkpoint

    r = load_checkpoint(d / "base", device="cpu")
    want = WorldEval(world, embedding_matrix(emb_t), t["id"].to_pylist()).caption_recall(
        r.encode_texts, t["caption"].to_pylist())
    assert s["base"]["recall"]["r@10"]["mean"] == pytest.approx(want["r@10"]["mean"])
    # precomputed embeddings: the base's reused, the stale ones refused
    man = json.loads((out / "manifest.json").read_text())
    assert "embeddings" in man["timings"]["models"]["base"]
    assert "embed_s" in man["timings"]["models"]["aligned"]
    assert man["timings"]["models"]["rephrase"]["missing"] == 1
    assert any("1 queries had no rephrasing" in n for n in m["notes"])
    # teacher diagnostics
    mix = m["teacher"]["mix"]
    assert mix["all"]["pairs"] == 25 and mix["all"]["degraded_pairs"] == 5
    assert mix["by_source"]["degraded"]["degraded_agreement"] == "by construction"
    assert "error" in m["teacher"]["gone"]
    assert 0 < m["premise"]["ndcg@10_gain"]["n"] <= m["queries"]["n"]
    assert m["verdict"][0].startswith("aligned wins on ndcg@10 against")
    printed = capsys.readouterr().out
    assert "report:" in printed and "HPIR" in printed
    per = pq.read_table(out / "per_query.parquet")
    assert per.num_rows == m["queries"]["n"] and "aligned/ndcg@10" in per.column_names
    html = (out / "report.html").read_text()
    assert "Teacher diagnostics" in html and html.count("data:image/png;base64,") > 10
    # every baseline swept over its knob; the aligned model compared at equal relevance
    from aligner.evaluation.sweeps import DEFAULT_SWEEPS

    assert {f: len(v) for f, v in m["frontier"].items()} == {f: len(v) for f, v in
                                                              DEFAULT_SWEEPS.items()}
    assert all(r["recall@10"] is None for r in m["frontier"]["rephrase"])
    eq = m["equal_relevance"]
    fams = eq["families"]
    assert set(fams) == {"cascade", "query_shift", "rephrase", "teacher_rerank"}
    # chosen on the validation queries, reported on the test queries
    assert (eq["chosen_on"], eq["reported_on"], eq["fallback"]) == ("val", "test", None)
    assert m["queries"]["selection"]["split"] == "val" and m["queries"]["selection"]["n"] > 0
    for fam, r in fams.items():
        if r["setting"] is None:
            assert "no " + fam in r["note"]
        else:
            sel = r["selection"]
            assert sel["precision@10"] >= eq["aligned_selection"]["precision@10"] - eq["slack"]
            assert 0 < r["ndcg@10_diff"]["n"] <= m["queries"]["n"]
    assert sum("At equal or better relevance on the val queries" in v
               for v in m["verdict"]) == 4
    assert any(v.startswith("Latency") for v in m["verdict"])
    assert (out / "frontier.png").is_file() and "knobs swept" in html


def test_evaluate_job_on_a_corpus_without_oracle(tiny, monkeypatch):
    from aligner.world import generate as gen
    from jobs.evaluate import main

    d, _ = tiny

    def no_oracle(self):
        raise AssertionError("the oracle was read")
    monkeypatch.setattr(gen.World, "oracle", no_oracle)
    monkeypatch.setattr(gen.World, "query_truth", no_oracle)
    out = d / "out_corpus"
    rc = main([f"corpus={d / 'world' / 'corpus'}",
               f"queries={d / 'world' / 'queries' / 'queries.parquet'}",
               f"base_checkpoint={d / 'base'}", f"models=aligned={d / 'aligned'}",
               "baselines=[cascade,query_shift]", "baseline.cascade_n=20", "grid_queries=1",
               f"preferences=mix={d / 'prefs.parquet'}", f"output={out}"])
    assert rc == 0
    m = _strict_json(out / "metrics.json")
    assert m["oracle"] is False and m["primary"] == "scorer_aesthetic@10"
    assert len(m["skipped"]) >= 4 and any("HPIR" in s for s in m["skipped"])
    base = m["systems"]["base"]
    assert "aesthetic@10" not in base and base["scorer_aesthetic@10"]["n"] > 0
    assert base["recall"]["r@10"]["n"] > 0
    assert any("No oracle" in v for v in m["verdict"])
    assert (out / "report.html").is_file()


def test_config_errors():
    from aligner.evaluation.config import EvaluateConfig
    from aligner.runtime.config import ConfigError, build_config

    for bad in (["models=aligned"], ["models=base=x"], ["gallery=train"],
                ["baselines=[magic]"], ["embeddings=nobody=x"], ["baseline.shift_quantile=1.5"],
                ["hpir.pool=3"], ["sweep.rephrase_mixes=[2]"], ["shift_quantile=0.2"],
                ["baseline.teacher_aesthetic=[oracle]"], ["sweep.teacher_weights=[-1]"],
                ["baseline.teacher_aesthetic=[scorer]", "baseline.teacher_aesthetic_weights=[1,2]"],
                ["baseline.teacher_bad_template=no placeholder"]):
        with pytest.raises(ConfigError):
            build_config(EvaluateConfig, None, bad)
    c = build_config(EvaluateConfig, None, ["models=control=a/b,aligned=c/d",
                                            "baseline.cascade_weight=inf", "sweep.enabled=false"])
    assert c.models == ["control=a/b", "aligned=c/d"] and np.isinf(c.baseline.cascade_weight)
    assert c.sweep.enabled is False and c.baseline.cascade_n == 50 and c.hpir.pool == 50
