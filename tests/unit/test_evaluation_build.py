"""Building the evaluation's retrieval systems from library code alone (what a search service
does): the gallery and query loaders and the system builders, without the evaluation config
and without ``jobs``."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from aligner.evaluation.build import (
    Rephrasings,
    build_systems,
    cascade_system,
    load_model_system,
    load_rephrasings,
    query_shift_system,
    rephrase_system,
)
from aligner.evaluation.config import BASELINES, BaselineSettings
from aligner.evaluation.gallery import Gallery, load_gallery, load_queries
from aligner.evaluation.systems import (
    CascadeSystem,
    EncoderSystem,
    QueryShiftSystem,
    TeacherRerankSystem,
)
from aligner.evaluation.teacher_spec import TeacherSpec


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 120-image world, an untrained built-in checkpoint (base), a perturbed one."""
    from aligner.world import WorldSpec, generate_world
    from tests.helpers.models import base_and_perturbed

    d = tmp_path_factory.mktemp("build")
    generate_world(WorldSpec(n_images=120, n_queries=30, n_paraphrases=6, rows_per_file=60,
                             gallery_relevant=0), d / "world", workers=1, progress=False)
    base_and_perturbed(d, seed=2)
    return d


def test_gallery_and_queries_from_a_world(small):
    from aligner.world import World

    world = World(small / "world")
    g = load_gallery(world=small / "world")
    assert g.ids == world.corpus(["id"])["id"].to_pylist() and len(g.images) == 120
    assert g.source == f"world {small / 'world'}" and g.captions and g.split is not None
    test = load_gallery(world=small / "world", which="test")
    assert 0 < len(test.ids) < 120 and set(test.split) == {"test", "val"}
    idx, where = test.recall_split()
    assert where == "test split" and idx.tolist() == test.indices("test").tolist()
    assert len(test.indices("test")) + len(test.indices("val")) == len(test.ids)
    qids, texts = load_queries(world=small / "world")
    want = world.queries(split="test", kind="content")
    assert qids == want["query_id"].to_pylist() and texts == want["query"].to_pylist()
    with pytest.raises(ValueError):
        load_gallery(world=small / "world", which="train")
    with pytest.raises(ValueError):
        load_queries(world=small / "world", split="nope")


def test_gallery_from_a_corpus(small, tmp_path):
    from aligner.world import World

    t = World(small / "world").corpus(["id", "image", "caption", "split"])
    hf = pa.table({"id": t["id"], "image": pa.StructArray.from_arrays(
        [t["image"].combine_chunks(), pa.nulls(t.num_rows, pa.string())], ["bytes", "path"]),
        "split": t["split"]})
    pq.write_table(hf, tmp_path / "hf.parquet")
    g = load_gallery(corpus=tmp_path / "hf.parquet", which="test")
    assert g.captions is None and set(g.split) == {"test", "val"}
    held = t.filter(pc.is_in(t["split"], value_set=pa.array(["test", "val"])))
    assert g.images[0] == held["image"][0].as_py() and g.ids == held["id"].to_pylist()
    pq.write_table(t.select(["id", "image"]), tmp_path / "nosplit.parquet")
    g = load_gallery(corpus=tmp_path / "nosplit.parquet", which="test")  # no split: every image
    assert len(g.ids) == 120 and g.split is None
    assert g.recall_split()[1].startswith("whole gallery")
    pq.write_table(pa.table({"id": ["a"], "uri": ["/x.jpg"]}), tmp_path / "uri.parquet")
    with pytest.raises(ValueError, match="jobs.embed"):
        load_gallery(corpus=tmp_path / "uri.parquet")
    q = pa.table({"query_id": ["a", "b"], "query": ["red", "blue"], "split": ["test", "train"]})
    pq.write_table(q, tmp_path / "q.parquet")
    assert load_queries(queries=tmp_path / "q.parquet") == (["a"], ["red"])  # no kind column


def test_build_systems_with_explicit_arguments(small):
    g = load_gallery(world=small / "world")
    qids, texts = load_queries(world=small / "world")
    reph = Rephrasings({qids[0]: "a shiny " + texts[0]}, "in memory")
    settings = BaselineSettings(cascade_n=20, cascade_weight=2.0, shift_weight=0.3,
                                teacher_weight=0.5)
    teacher = TeacherSpec(["scorer", "contrast"], [1.0, 1.0], source="test")
    built = build_systems(g, small / "base", models={"aligned": small / "aligned"},
                          settings=settings, rephrasings=reph, teacher=teacher)
    assert list(built.systems) == ["base", *BASELINES, "aligned"]
    # "aligned" changed only its image tower: one text encoder serves both
    assert built.base is built.systems["base"] and len(built.encoders) == 1
    assert built.info["aligned"]["text_tower"] == built.info["base"]["text_tower"]
    s = built.systems
    assert isinstance(s["base"], EncoderSystem) and isinstance(s["aligned"], EncoderSystem)
    assert isinstance(s["cascade"], CascadeSystem) and (s["cascade"].n, s["cascade"].weight) \
        == (20, 2.0)
    assert isinstance(s["query_shift"], QueryShiftSystem) and s["query_shift"].weight == 0.3
    assert s["rephrase"].on_missing == "plain" and s["rephrase"].inner is s["base"]
    tr = s["teacher_rerank"]
    assert isinstance(tr, TeacherRerankSystem) and (tr.n, tr.weight, tr.inner) == \
        (20, 0.5, s["base"])
    assert tr.teacher == "scorer*1+contrast*1" and tr.table == reph.table
    assert built.info["teacher_rerank"]["source"] == "test"
    assert built.aesthetic.shape == (120,) and np.isfinite(built.aesthetic).all()
    assert built.info["rephrase"] == {"table": "in memory"} and not built.notes
    assert built.info["aligned"]["checkpoint_hash"] != built.info["base"]["checkpoint_hash"]
    for name, system in s.items():
        _, top = system.search(texts, 5, ids=qids)
        assert top.shape == (len(qids), 5) and (top >= 0).all() and (top < 120).all(), name
    _, b = s["base"].search(texts, 5)
    _, r = s["rephrase"].search(texts, 5, ids=qids)
    assert (b[1:] == r[1:]).all() and s["rephrase"].missing == set(qids[1:])
    assert not np.allclose(s["aligned"].gallery, s["base"].gallery)
    # the same knobs build the same systems one by one (a sweep or a service)
    c = cascade_system(built.base, built.aesthetic, settings, name="c", weight=0.5)
    assert (c.n, c.weight, c.inner) == (20, 0.5, built.base)
    assert query_shift_system(built.base, built.aesthetic, settings).weight == 0.3
    assert rephrase_system(built.base, reph.table, settings, mix=0.5).mix == 0.5


def test_build_only_some_baselines_and_refusals(small):
    g = load_gallery(world=small / "world", which="test")
    built = build_systems(g, small / "base", baselines=["cascade", "rephrase"],
                          base_name="plain")
    assert list(built.systems) == ["plain", "cascade"]
    assert built.notes and "rephrase system skipped" in built.notes[0]
    built = build_systems(g, small / "base", baselines=["teacher_rerank"])
    assert list(built.systems) == ["base"] and "teacher_rerank skipped" in built.notes[0]
    built = build_systems(g, small / "base", baselines=["teacher_rerank"],
                          teacher=TeacherSpec(["contrast"], [1.0]))
    assert list(built.systems) == ["base", "teacher_rerank"]
    assert "uses each query as its own rephrasing" in built.notes[0]
    with pytest.raises(ValueError, match="unknown baselines"):
        build_systems(g, small / "base", baselines=["magic"])
    with pytest.raises(ValueError, match="may not be named"):
        build_systems(g, small / "base", models={"cascade": small / "aligned"})
    with pytest.raises(FileNotFoundError):
        build_systems(g, small / "nope")


def test_model_system_reuses_matching_embeddings_only(small, tmp_path):
    import json

    g = load_gallery(world=small / "world", which="test")
    m = load_model_system("base", small / "base", g)
    assert "embed_s" in m.info and m.aesthetic is None
    emb = m.system.gallery
    table = pa.table({"id": g.ids, "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(emb.reshape(-1)), emb.shape[1]), "aesthetic": pa.array(
        np.linspace(0, 1, len(g.ids)), pa.float32())})
    for name, chash in (("ok", m.info["checkpoint_hash"]), ("stale", "0000")):
        (tmp_path / name / "embeddings").mkdir(parents=True)
        pq.write_table(table, tmp_path / name / "embeddings" / "part-0.parquet")
        (tmp_path / name / "manifest.json").write_text(json.dumps(
            {"model": {"checkpoint_hash": chash}, "scorer": {"name": "lowlevel"}}))
    ok = load_model_system("base", small / "base", g, tmp_path / "ok")
    assert ok.info["embeddings"] == str(tmp_path / "ok") and "embed_s" not in ok.info
    assert np.allclose(ok.aesthetic, np.linspace(0, 1, len(g.ids)), atol=1e-6)
    other = load_model_system("base", small / "base", g, tmp_path / "ok", scorer="other")
    assert other.aesthetic is None  # scores of another scorer are not reused
    stale = load_model_system("base", small / "base", g, tmp_path / "stale")
    assert "embed_s" in stale.info and "embeddings" not in stale.info


def test_load_rephrasings(small, tmp_path):
    qids, texts = load_queries(world=small / "world")
    pq.write_table(pa.table({"query_id": qids[:2], "query": texts[:2],
                             "rephrased": ["x", ""]}), tmp_path / "r.parquet")
    r = load_rephrasings(tmp_path / "r.parquet", qids, texts)
    assert r.table == {qids[0]: "x"} and r.source == str(tmp_path / "r.parquet")
    assert r.counts["missing"] == len(qids) - 1


def test_gallery_is_a_plain_container():
    g = Gallery(["a", "b"], [b"", b""], None, np.array(["train", "val"]), "mem")
    assert g.recall_split()[1].startswith("whole gallery")


def test_library_builders_import_no_jobs():
    code = ("import sys, aligner.evaluation.build, aligner.evaluation.run, "
            "aligner.evaluation.gallery, aligner.data.results\n"
            "bad = [m for m in sys.modules if m == 'jobs' or m.startswith('jobs.')]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[2])


def test_teacher_found_through_the_aligned_models_manifests(tmp_path):
    """aligned checkpoint -> its align manifest -> the preferences manifest -> the teacher;
    the config's teacher only without a manifest; the manifest wins over the config."""
    import json

    from aligner.evaluation.teacher_spec import (
        parse_teacher_name,
        resolve_teacher,
        teacher_from_manifest,
        teacher_record,
    )
    from aligner.preferences.teacher import DEFAULT_BAD_TEMPLATE

    prefs, align = tmp_path / "prefs", tmp_path / "aligned"
    (align / "checkpoint").mkdir(parents=True)
    prefs.mkdir()
    (align / "manifest.json").write_text(json.dumps(
        {"job": "align", "inputs": {"preferences": str(prefs)}}))
    (prefs / "manifest.json").write_text(json.dumps(
        {"job": "build_preferences", "teacher": "scorer*1+contrast*1",
         "inputs": {"queries": "out/rephrased"},
         "config": {"aesthetic": ["scorer", "contrast"], "aesthetic_weights": [1.0, 2.0],
                    "bad_template": "an ugly {q}", "bad_rephraser": "", "degraded": True}}))
    spec, notes = resolve_teacher(BaselineSettings(), align / "checkpoint")
    assert spec.name == "scorer*1+contrast*2" and spec.bad_template == "an ugly {q}"
    assert spec.bad_rephrase()(["two red circles"]) == ["an ugly two red circles"]
    assert "the aligned model's" in spec.source and str(prefs) in spec.source
    assert spec.queries == "out/rephrased" and not notes
    assert any("degraded-copy" in n for n in spec.notes)
    # an explicit config teacher does not override the manifest's (noted)
    spec, notes = resolve_teacher(BaselineSettings(teacher_aesthetic=["scorer"]),
                                  align / "checkpoint")
    assert spec.name == "scorer*1+contrast*2" and "ignored" in notes[0]
    # no manifest: the config's teacher, else none
    spec, _ = resolve_teacher(BaselineSettings(teacher_aesthetic=["contrast"]), tmp_path / "x")
    assert spec.name == "contrast*1" and spec.source.startswith("config")
    assert spec.bad_template == DEFAULT_BAD_TEMPLATE
    spec, notes = resolve_teacher(BaselineSettings(), tmp_path / "x")
    assert spec is None and "skipped" in notes[-1]
    # an explicit preferences dir must be readable
    spec, _ = resolve_teacher(BaselineSettings(teacher_preferences=str(prefs)))
    assert "baseline.teacher_preferences" in spec.source
    with pytest.raises(FileNotFoundError):
        resolve_teacher(BaselineSettings(teacher_preferences=str(tmp_path / "nope")))
    # what the manifest may hold: the recommended record first, else only the teacher string
    rec = teacher_record(["contrast"], [1.0], "a bad {q}", "template:detail", "q.parquet")
    spec = teacher_from_manifest({"teacher_spec": rec, "config": {"aesthetic": ["scorer"]}})
    assert (spec.name, spec.bad_rephraser, spec.queries) == ("contrast*1", "template:detail",
                                                             "q.parquet")
    assert len(spec.bad_rephrase()(["a cat"])) == 1
    spec = teacher_from_manifest({"teacher": "contrast*1"})
    assert spec.bad_template == DEFAULT_BAD_TEMPLATE and "no bad template" in spec.notes[0]
    spec = teacher_from_manifest({"config": {"aesthetic": ["contrast"],
                                             "bad_rephraser": "oracle:x"}})
    assert spec.bad_rephraser == "" and "cannot run at query time" in spec.notes[-1]
    assert parse_teacher_name("scorer*0.5+rephrase*1") == (["scorer", "rephrase"], [0.5, 1.0])
    with pytest.raises(ValueError, match="records no teacher"):
        teacher_from_manifest({"job": "build_preferences"})


def test_a_changed_text_tower_gets_its_own_text_encoder(small, tmp_path):
    """Shared text encodings only where every text weight is the same."""
    import torch

    from aligner.retrieval.models import load_checkpoint, save_checkpoint

    r = load_checkpoint(small / "aligned", device="cpu")
    with torch.no_grad():
        dict(r.model.named_parameters())["text.proj.weight"].add_(0.01)
    save_checkpoint(r, tmp_path / "text_moved")
    g = load_gallery(world=small / "world")
    built = build_systems(g, small / "base", models={"aligned": small / "aligned",
                                                     "moved": tmp_path / "text_moved"},
                          baselines=[])
    assert len(built.encoders) == 2
    assert built.info["moved"]["text_tower"] != built.info["base"]["text_tower"]
    q = ["two red circles"]
    assert not np.allclose(built.systems["moved"].encode(q), built.systems["base"].encode(q))
    np.testing.assert_allclose(built.systems["aligned"].encode(q), built.systems["base"].encode(q))
