"""``jobs.build_preferences`` and ``jobs.align`` with every input in object storage, against a
real S3-compatible server, compared with the same jobs on the local copies.

A 60-image world, its images embedded by the built-in model (an embed job's layout and
manifest), a Flat index, rephrased queries and a votes table are made locally, then uploaded
to ``s3://``. ``build_preferences`` on the URIs (outputs local) writes the same preferences
table as on the local paths, through the exact search and through the index (whose output goes
to ``s3://``, manifest last). ``align``'s driver-side preparation gives the same arrays from
URIs as from paths, and the job runs a 2-step fine-tune on Ray Train from a ``world=s3://...``
whose counts are those of the local preparation. Bad URIs exit 2 naming what is missing.
The server and the environment that points pyarrow at it: ``s3`` / ``s3_env`` in
``tests/integration/conftest.py``; ``tests/unit/test_table_uris.py`` covers the readers
without a server.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from aligner.data.io import Store
from tests.helpers.s3 import upload_dir

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_faiss_thread")]

BUILD = ["k=16", "u=2", "v=2", "stride=2", "degraded_per_query=2", "splits=[train,val]",
         "examples=1", "source_weights=human=2"]
W = "s3://corpus/pw"  # the world, queries, votes and preferences in the bucket


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> SimpleNamespace:
    """The inputs on the local disk: world (corpus/ with a split column, queries/), embeddings
    in two files + manifest, a Flat index, rephrased queries, votes, the start checkpoint."""
    from PIL import Image

    from aligner.data.embeddings import embeddings_schema
    from aligner.data.images import decode_rgb
    from aligner.retrieval.index_build import build_index
    from aligner.retrieval.models import ModelSpec, load_retriever, save_checkpoint
    from aligner.runtime.manifest import write_manifest
    from aligner.world import World, WorldSpec, generate_world

    d = tmp_path_factory.mktemp("prefs-s3")
    # no dense galleries: this test is about object storage, 60 images keep its encoding short
    generate_world(WorldSpec(n_images=60, n_queries=20, n_paraphrases=4, val_fraction=0.2,
                             test_fraction=0.2, rows_per_file=30, gallery_relevant=0),
                   d / "world", workers=1, progress=False)
    world = World(d / "world")
    r = load_retriever(ModelSpec(), device="cpu")
    save_checkpoint(r, d / "start")
    t = world.corpus(["id", "image", "caption", "split"])
    x = r.encode_pil([Image.fromarray(decode_rgb(b)) for b in t["image"].to_pylist()])
    aes = np.random.default_rng(0).normal(size=t.num_rows).astype(np.float32)
    (d / "emb" / "embeddings").mkdir(parents=True)
    for part, (lo, hi) in enumerate([(0, 25), (25, t.num_rows)]):
        pq.write_table(pa.table({
            "id": t["id"][lo:hi], "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(x[lo:hi].reshape(-1)), x.shape[1]),
            "aesthetic": aes[lo:hi], "caption": t["caption"][lo:hi],
            "source": ["world"] * (hi - lo)}, schema=embeddings_schema(x.shape[1])),
            d / "emb" / "embeddings" / f"part-{part}.parquet")
    write_manifest(d / "emb", "embed", input=str(d / "world" / "corpus"), model=r.describe())
    build_index(d / "emb", d / "index", "Flat")
    q = world.queries(kind="content")
    q = q.append_column("rephrased", pa.array([s + ", crisp, clean, well-lit, vivid"
                                               for s in q["query"].to_pylist()]))
    (d / "rephrased").mkdir()
    pq.write_table(q, d / "rephrased" / "queries.parquet")
    train_q = q.filter(pc.equal(q["split"], "train"))
    train_i = [i for i, s in zip(t["id"].to_pylist(), t["split"].to_pylist(), strict=True)
               if s == "train"]
    (d / "votes").mkdir()
    pq.write_table(pa.table({"query_id": train_q["query_id"][:2], "query": train_q["query"][:2],
                             "chosen_id": train_i[:2], "rejected_id": train_i[2:4],
                             "source": ["human"] * 2, "weight": [1.0, 1.0]}),
                   d / "votes" / "part-0.parquet")
    return SimpleNamespace(root=d, world=d / "world", start=d / "start")


def _upload(local: SimpleNamespace) -> None:
    upload_dir(local.world / "corpus", f"{W}/corpus")
    upload_dir(local.world / "queries", f"{W}/queries")
    upload_dir(local.root / "rephrased", f"{W}/rephrased")
    upload_dir(local.root / "votes", f"{W}/votes")
    upload_dir(local.root / "emb", "s3://emb/pw")
    upload_dir(local.root / "index", "s3://index/pw")


def _argv(**kw: str | Path) -> list[str]:
    return [f"{k}={v}" for k, v in kw.items()]


def _s3_build(out: str | Path, **kw: str) -> list[str]:
    """build_preferences on the inputs in the bucket."""
    return _argv(embeddings="s3://emb/pw", queries=f"{W}/rephrased", corpus=f"{W}/corpus",
                 extra_tables=f"[{W}/votes]", output=out, **kw) + BUILD


def _local_build(local: SimpleNamespace, out: str | Path, **kw: str) -> list[str]:
    """build_preferences on the local copies."""
    r = local.root
    return _argv(embeddings=r / "emb", queries=r / "rephrased", corpus=local.world / "corpus",
                 extra_tables=f"[{r / 'votes'}]", output=out, **kw) + BUILD


def _listing(fs: pafs.FileSystem, prefix: str) -> dict[str, int]:
    sel = pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return {i.path[len(prefix) + 1:]: i.mtime_ns for i in fs.get_file_info(sel)
            if i.type == pafs.FileType.File}


def _same_align_data(a, b) -> None:
    """Every array and list of two :class:`AlignData` equal."""
    for name, va in vars(a).items():
        vb = getattr(b, name)
        if name in ("train", "val"):
            for f, arr in vars(va).items():
                np.testing.assert_array_equal(arr, getattr(vb, f), err_msg=f"{name}.{f}")
        elif isinstance(va, np.ndarray) or va is None:
            assert (va is None) == (vb is None), name
            if va is not None:
                np.testing.assert_array_equal(va, vb, err_msg=name)
        else:
            assert va == vb, name


@pytest.mark.timeout(240)
def test_build_preferences_and_align_read_their_inputs_from_s3(ray_session, s3_env, local,
                                                                tmp_path, monkeypatch, capsys):
    from aligner.retrieval.models import ModelSpec
    from aligner.training.align_data import degrade_seed_of, prepare_align_data
    from jobs.align import main as align_main
    from jobs.build_preferences import main as build_main

    fs = s3_env
    monkeypatch.setenv("ALIGNER_CACHE", str(tmp_path / "cache"))
    _upload(local)
    lw = local.world
    assert build_main(_local_build(local, tmp_path / "local")) == 0
    assert build_main(_s3_build(tmp_path / "from-s3")) == 0, capsys.readouterr().err[-3000:]
    assert build_main(_s3_build("s3://out/prefs", index="s3://index/pw")) == 0

    # the same pairs: exact search on the URIs, and through the index URI (a Flat index)
    want = pq.read_table(tmp_path / "local" / "preferences.parquet")
    assert want.num_rows > 20 and set(want["source"].to_pylist()) == {"grid", "degraded", "human"}
    got = pq.read_table(tmp_path / "from-s3" / "preferences.parquet")
    assert got.schema == want.schema
    assert repr(got.to_pylist()) == repr(want.to_pylist())  # every value (NaN != NaN)
    cols = ["query_id", "chosen_id", "rejected_id", "source", "weight"]
    via_index = pq.read_table("out/prefs/preferences.parquet", filesystem=fs)
    assert via_index.select(cols).equals(want.select(cols))
    ml = json.loads((tmp_path / "local" / "manifest.json").read_text())
    ms = json.loads((tmp_path / "from-s3" / "manifest.json").read_text())
    with fs.open_input_stream("out/prefs/manifest.json") as f:
        mi = json.loads(f.read())
    assert ml["counts"] == ms["counts"] and ml["held_out"] == ms["held_out"] == mi["held_out"]
    assert ml["held_out"]["held_out"] == {"test": 12, "val": 12}  # held out of the S3 corpus
    assert ms["inputs"]["embeddings"] == "s3://emb/pw" and mi["inputs"]["index"] == "s3://index/pw"
    assert ms["inputs"]["extra_tables"] == {f"{W}/votes": {"rows": 2, "dropped_other_split": 0,
                                                           "dropped_held_out_images": 0}}
    assert ms["model"] == ml["model"]
    assert set(_listing(fs, "out/prefs")) == {"preferences.parquet", "config.yaml", "grids.png",
                                              "degraded.png", "manifest.json"}
    assert (tmp_path / "from-s3" / "grids.png").stat().st_size > 1000  # images read from S3

    # align: the driver prepares the same arrays from the URIs (a degrade seed read from the
    # manifest in the bucket); the workers get them from the driver
    prefs = tmp_path / "prefs"
    upload_dir(tmp_path / "local", f"{W}/prefs")
    m = dict(ml, degrade={**ml["degrade"], "seed": 3})
    Store(f"{W}/prefs").write_text("manifest.json", json.dumps(m))
    Store(prefs).upload(tmp_path / "local" / "preferences.parquet", "preferences.parquet")
    Store(prefs).write_text("manifest.json", json.dumps(m))
    assert degrade_seed_of(f"{W}/prefs") == degrade_seed_of(prefs) == 3
    model = ModelSpec(checkpoint=str(local.start))
    a, counts = prepare_align_data(str(prefs), str(lw / "corpus"), str(lw / "queries"), model)
    b, counts_s3 = prepare_align_data(f"{W}/prefs", f"{W}/corpus", f"{W}/queries", model)
    _same_align_data(a, b)
    counts.pop("prepare_seconds")
    counts_s3.pop("prepare_seconds")
    assert counts == counts_s3 and counts["val_pairs"] > 0 and counts["dropped_test_pairs"] == 0

    out = tmp_path / "aligned"
    assert align_main([f"world={W}", f"preferences={W}/prefs", f"model.checkpoint={local.start}",
                       f"output={out}", "num_workers=1", "train.steps=2", "train.warmup=0",
                       "train.pairs_per_step=8", "train.captions_per_step=8",
                       "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1",
                       "train.selection=last"]) == 0, capsys.readouterr().err[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {k: metrics[k] for k in counts} == counts
    assert metrics["selected_step"] == 2 and (out / "checkpoint").is_dir()
    inputs = json.loads((out / "manifest.json").read_text())["inputs"]
    assert (inputs["corpus"], inputs["queries"]) == (f"{W}/corpus", f"{W}/queries")


@pytest.mark.timeout(120)
def test_missing_buckets_and_prefixes_exit_2_naming_them(s3_env, local, tmp_path, monkeypatch,
                                                         capsys):
    """Each bad URI in turn, the other inputs local: exit 2, the missing bucket or prefix
    named, nothing written."""
    from jobs.align import main as align_main
    from jobs.build_preferences import main as build_main

    monkeypatch.setenv("ALIGNER_CACHE", str(tmp_path / "cache"))
    lw = local.world
    bad_builds = [
        ({"embeddings": "s3://no-such-bucket/emb"}, "bucket 'no-such-bucket' does not exist"),
        ({"embeddings": "s3://emb/missing"}, "embeddings s3://emb/missing does not exist"),
        ({"queries": "s3://corpus/missing"}, "queries: s3://corpus/missing does not exist"),
        ({"corpus": "s3://corpus/missing"}, "corpus s3://corpus/missing does not exist"),
        ({"extra_tables": "[s3://no-such-bucket/votes]"},
         "bucket 'no-such-bucket' does not exist"),
        ({"output": "s3://no-out-bucket/prefs"}, "bucket 'no-out-bucket' does not exist"),
        ({"index": "s3://index/missing"}, "index directory s3://index/missing does not exist"),
    ]
    for bad, message in bad_builds:
        argv = _local_build(local, tmp_path / "p")
        argv = [a for a in argv if a.split("=", 1)[0] not in bad] + _argv(**bad)
        assert build_main(argv) == 2, bad
        err = capsys.readouterr().err
        assert message in err, (bad, err[-2000:])
    assert not (tmp_path / "p").exists()

    prefs = tmp_path / "prefs.parquet"
    pq.write_table(pa.table({"query_id": ["q"], "query": ["a"], "chosen_id": ["x"],
                             "rejected_id": ["y"], "source": ["grid"], "weight": [1.0]}), prefs)
    good = {"world": lw, "preferences": prefs, "model.checkpoint": local.start,
            "output": tmp_path / "a"}
    bad_aligns = [
        ({"preferences": "s3://no-such-bucket/p"}, "bucket 'no-such-bucket' does not exist"),
        ({"preferences": f"{W}/none"}, f"preferences {W}/none does not exist"),
        ({"corpus": "s3://corpus/missing"}, "corpus s3://corpus/missing does not exist"),
        ({"world": f"{W}-none"}, f"corpus {W}-none/corpus does not exist"),
        ({"queries": "s3://no-such-bucket/q"}, "bucket 'no-such-bucket' does not exist"),
        ({"queries": "s3://corpus/missing-q"}, "queries s3://corpus/missing-q does not exist"),
        ({"output": "s3://out/aligned"}, "not a URI"),
    ]
    for bad, message in bad_aligns:
        assert align_main(_argv(**{**good, **bad})) == 2, bad
        err = capsys.readouterr().err
        assert message in err, (bad, err[-2000:])
    assert not (tmp_path / "a" / "checkpoint").exists()
