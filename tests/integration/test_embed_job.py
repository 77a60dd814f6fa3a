"""The embedding job end to end on the session's local Ray, plus its in-process parts (the
part writer and the finaliser: tests/unit/test_embedding_parts.py).

Job logs are checked through captured stderr: ``setup_logging`` reconfigures the root logger
(``force=True``), which removes pytest's ``caplog`` handler.

The expensive part is one pipeline run (actors load the model: 10-30 s on 2 CPUs), so the
Parquet corpus is embedded once per module and several tests read that output.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from aligner.data.corpus_plan import plan_shards
from aligner.data.embeddings import (
    embedding_matrix,
    iter_embeddings,
    read_embeddings,
)
from aligner.runtime.manifest import read_manifest
from aligner.runtime.raycluster import plan_model_actors

N_IMAGES = 240
CORRUPT = 7  # index of the image whose bytes are cut short


def png(rng: np.random.Generator, size: int = 64) -> bytes:
    """A coloured shape on a coloured background."""
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    x, y = (int(v) for v in rng.integers(2, size // 2, 2))
    s = int(rng.integers(10, size // 2))
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    [draw.ellipse, draw.rectangle][int(rng.integers(2))]([x, y, x + s, y + s], fill=fill)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def job_args(inp: Path, out: Path, *extra: str) -> list[str]:
    return [f"input={inp}", f"output={out}", "model.name=builtin", "batch_size=64",
            "progress=false", *extra]


@pytest.fixture(scope="module")
def parquet_corpus(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    images = [png(rng) for _ in range(N_IMAGES)]
    images[CORRUPT] = images[CORRUPT][:200]  # truncated PNG
    d = tmp_path_factory.mktemp("corpus")
    n = N_IMAGES
    for part, (lo, hi) in enumerate([(0, 150), (150, n)]):
        pq.write_table(pa.table({
            "id": [f"img{i:05d}" for i in range(lo, hi)], "image": images[lo:hi],
            "caption": [f"shape number {i}" for i in range(lo, hi)],
            "split": ["test" if i % 5 == 0 else "train" for i in range(lo, hi)]}),
            d / f"part-{part}.parquet", row_group_size=50)
    return d


@pytest.fixture(scope="module")
def embedded(ray_session, parquet_corpus, tmp_path_factory) -> Path:
    from jobs.embed import main

    out = tmp_path_factory.mktemp("emb") / "out"
    assert main(job_args(parquet_corpus, out, "rows_per_shard=100")) == 0
    return out


# ----------------------------------------------------------------------------- parquet corpus

def test_parquet_corpus_end_to_end(embedded, parquet_corpus):
    table = read_embeddings(embedded)
    ids = table.column("id").to_pylist()
    expected = [f"img{i:05d}" for i in range(N_IMAGES) if i != CORRUPT]
    assert sorted(ids) == expected
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 256)
    emb = embedding_matrix(table)
    assert emb.shape == (N_IMAGES - 1, 256) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert np.std(emb, axis=0).mean() > 1e-3  # not one constant vector
    rows = {r["id"]: r for r in table.select(["id", "caption", "split", "aesthetic"]).to_pylist()}
    assert rows["img00010"]["caption"] == "shape number 10" and rows["img00010"]["split"] == "test"
    assert rows["img00011"]["split"] == "train"
    aest = table.column("aesthetic").to_numpy()
    assert aest.dtype == np.float32 and np.isfinite(aest).all() and np.ptp(aest) > 0.1
    # streaming read-back gives the same rows
    assert sum(b.num_rows for b in iter_embeddings(embedded, batch_size=50)) == N_IMAGES - 1


def test_failures_and_manifest(embedded):
    failures = pq.read_table(embedded / "failures").to_pylist()
    assert len(failures) == 1
    f = failures[0]
    assert f["id"] == f"img{CORRUPT:05d}" and f["stage"] == "decode"
    assert f["reason"].startswith(("truncated", "corrupt")) and "part-0.parquet#row=7" in f["source"]
    m = read_manifest(embedded)
    assert (m["rows_in"], m["rows_out"], m["rows_failed"]) == (N_IMAGES, N_IMAGES - 1, 1)
    assert m["dim"] == 256 and m["model"]["name"] == "builtin"
    assert m["model"]["checkpoint_hash"] and m["versions"]["ray"]
    assert m["shards"] == {"total": 3, "done": 3, "skipped_this_run": 0, "incomplete": []}
    assert m["this_run"]["failure_reasons"] == {f["reason"].split(":")[0]: 1}
    assert m["config"]["batch_size"] == 64 and m["wall_time_s"] > 0
    assert m["scorer"]["name"] == "lowlevel"
    assert (embedded / "config.yaml").is_file()
    assert len(json.loads((embedded / "shards.json").read_text())["shards"]) == 3


def test_pipeline_matches_a_plain_loop(embedded, parquet_corpus):
    """Same eval transform and model: the same embeddings and scores as in-process code."""
    from aligner.aesthetics.scorer import LowLevelScorer
    from aligner.data.images import decode_image, to_uint8
    from aligner.retrieval.models import ModelSpec, load_retriever

    corpus = pq.read_table(parquet_corpus / "part-1.parquet").slice(0, 12)
    ims = [decode_image(b) for b in corpus.column("image").to_pylist()]
    want = load_retriever(ModelSpec(), device="cpu").encode_pil(ims)
    table = read_embeddings(embedded)
    pos = {id_: i for i, id_ in enumerate(table.column("id").to_pylist())}
    idx = [pos[i] for i in corpus.column("id").to_pylist()]
    got = embedding_matrix(table)[idx]
    np.testing.assert_allclose(got, want, atol=2e-5)
    scores = LowLevelScorer().score([to_uint8(im) for im in ims])
    np.testing.assert_allclose(table.column("aesthetic").to_numpy()[idx], scores, rtol=1e-5)


def test_second_run_does_no_work(embedded, parquet_corpus, capsys):
    from jobs.embed import main

    files = sorted((embedded / "embeddings").iterdir())
    stamps = [p.stat().st_mtime_ns for p in files]
    manifest = (embedded / "manifest.json").read_text()
    assert main(job_args(parquet_corpus, embedded, "rows_per_shard=100")) == 0
    assert "3 shards already done, nothing to do" in capsys.readouterr().err
    assert [p.stat().st_mtime_ns for p in sorted((embedded / "embeddings").iterdir())] == stamps
    assert (embedded / "manifest.json").read_text() == manifest


def test_resume_redoes_only_unfinished_shards(embedded, parquet_corpus, tmp_path, capsys):
    """A crash mid-run leaves temp files and shards without their embeddings file."""
    import shutil

    from jobs.embed import main

    out = tmp_path / "out"
    shutil.copytree(embedded, out)
    before = read_embeddings(out).sort_by("id")
    victim = sorted((out / "embeddings").glob("part-0*.parquet"))[0]  # holds the failure
    victim.unlink()
    (out / "embeddings" / ".half-written.parquet.123.tmp").write_bytes(b"junk")
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").glob("*.parquet")}
    assert main(job_args(parquet_corpus, out, "rows_per_shard=100")) == 0
    assert "3 shards, 2 already done, 1 pending" in capsys.readouterr().err
    assert not list((out / "embeddings").glob(".*.tmp"))
    for name, stamp in done_before.items():  # finished shards were not touched
        assert (out / "embeddings" / name).stat().st_mtime_ns == stamp
    after = read_embeddings(out).sort_by("id")
    assert after.column("id").to_pylist() == before.column("id").to_pylist()
    np.testing.assert_allclose(embedding_matrix(after), embedding_matrix(before), atol=1e-6)
    m = read_manifest(out)
    assert (m["rows_in"], m["rows_out"], m["rows_failed"]) == (N_IMAGES, N_IMAGES - 1, 1)
    assert m["this_run"]["shards_processed"] == 1 and m["this_run"]["shards_skipped"] == 2
    assert len(pq.read_table(out / "failures")) == 1


def test_resume_refuses_another_model_or_input(embedded, parquet_corpus, tmp_path, capsys):
    from jobs.embed import main

    assert main(job_args(parquet_corpus, embedded, "rows_per_shard=100", "model.image_size=32")) == 2
    err = capsys.readouterr().err
    assert "ValueError" in err and re.search("started with model", err)
    assert main(job_args(parquet_corpus, embedded, "rows_per_shard=50")) == 2
    err = capsys.readouterr().err
    assert "ValueError" in err and re.search("not part of this input", err)


def test_resume_refuses_changed_weights(embedded, parquet_corpus, tmp_path, capsys):
    """Same spec, other weights (a checkpoint retrained in place): caught on the driver."""
    import shutil

    from jobs.embed import main

    out = tmp_path / "out"
    shutil.copytree(embedded, out)
    sorted((out / "embeddings").glob("*.parquet"))[0].unlink()
    plan = json.loads((out / "shards.json").read_text())
    plan["checkpoint_hash"] = "0123456789abcdef"
    (out / "shards.json").write_text(json.dumps(plan))
    assert main(job_args(parquet_corpus, out, "rows_per_shard=100")) == 2
    err = capsys.readouterr().err
    assert "ValueError" in err and re.search("checkpoint changed", err)


def test_missing_input_fails_before_ray_work(tmp_path, capsys):
    from jobs.embed import main

    assert main(job_args(tmp_path / "nope", tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "FileNotFoundError" in err and re.search("does not exist", err)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- other formats

def test_folder_corpus(ray_session, tmp_path):
    from jobs.embed import main

    rng = np.random.default_rng(1)
    root = tmp_path / "folder"
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        (root / ("sub" if i % 2 else "") / f"im{i:02d}.png").write_bytes(png(rng))
    (root / "im00.txt").write_text("a caption from a sidecar")
    (root / "sub" / "zero.png").write_bytes(b"")
    (root / "sub" / "fake.jpg").write_text("not an image")
    (root / "readme.md").write_text("ignored")
    out = tmp_path / "out"
    assert main(job_args(root, out, "rows_per_shard=5")) == 0
    table = read_embeddings(out)
    assert sorted(table.column("id").to_pylist()) == sorted(
        [f"im{i:02d}.png" if i % 2 == 0 else f"sub/im{i:02d}.png" for i in range(12)])
    caps = dict(zip(table.column("id").to_pylist(), table.column("caption").to_pylist(),
                    strict=True))
    assert caps["im00.png"] == "a caption from a sidecar" and caps["im02.png"] is None
    np.testing.assert_allclose(np.linalg.norm(embedding_matrix(table), axis=1), 1, atol=1e-4)
    failures = {r["id"]: r["reason"] for r in pq.read_table(out / "failures").to_pylist()}
    assert set(failures) == {"sub/zero.png", "sub/fake.jpg"}
    assert failures["sub/zero.png"].startswith("empty")
    assert failures["sub/fake.jpg"].startswith("not_an_image")
    m = read_manifest(out)
    assert (m["rows_in"], m["rows_out"], m["rows_failed"]) == (14, 12, 2)


def test_webdataset_corpus(ray_session, tmp_path):
    from jobs.embed import main

    rng = np.random.default_rng(2)
    root = tmp_path / "wds"
    root.mkdir()
    for shard in range(2):
        with tarfile.open(root / f"shard-{shard:04d}.tar", "w") as tar:
            for i in range(6):
                key = f"{shard:02d}{i:04d}"
                files = {"png": png(rng), "txt": f"sample {key}".encode()}
                if key == "010003":
                    files = {"json": b'{"caption": "no image here"}'}
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert main(job_args(root, out)) == 0
    table = read_embeddings(out)
    assert len(table) == 11
    assert dict(zip(table.column("id").to_pylist(), table.column("caption").to_pylist(),
                    strict=True))["000002"] == "sample 000002"
    failures = pq.read_table(out / "failures").to_pylist()
    assert [(f["id"], f["stage"]) for f in failures] == [("010003", "read")]
    assert read_manifest(out)["shards"]["total"] == 2


# ----------------------------------------------------------------------------- driver-side parts

def _embedding_scorer_class():
    """A stand-in learned scorer (needs embeddings), importable as ``module:FirstDimScorer``."""
    from aligner.aesthetics.scorer import AestheticScorer

    class FirstDimScorer(AestheticScorer):
        name = "first-dim"
        needs = "embedding"

        def score(self, batch):
            return np.asarray(batch, np.float32)[:, 0] * 10

    return FirstDimScorer


FirstDimScorer = _embedding_scorer_class()


def test_udfs_in_process(tmp_path):
    """DecodeImages -> EncodeImages without Ray: failures pass through, scorers by need."""
    from aligner.data.corpus_shards import iter_shard
    from aligner.retrieval.embed_pipeline import DecodeImages, EncodeImages
    from aligner.retrieval.models import ModelSpec, load_retriever

    rng = np.random.default_rng(3)
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": [png(rng), b"junk", png(rng)]}),
                   tmp_path / "c.parquet")
    (shard,) = plan_shards(str(tmp_path / "c.parquet"))
    (raw,) = list(iter_shard(shard))
    retriever = load_retriever(ModelSpec(), device="cpu")
    decoded = DecodeImages(retriever.preprocess, scorer="lowlevel")(raw)
    assert decoded["pixels"].shape == (3, 3, 64, 64)
    assert list(decoded["reason"] != "") == [False, True, False]
    assert np.isnan(decoded["aesthetic"][1]) and np.isfinite(decoded["aesthetic"][[0, 2]]).all()
    scorer = f"{FirstDimScorer.__module__}:FirstDimScorer"
    dec2 = DecodeImages(retriever.preprocess, scorer=scorer)(raw)
    assert np.isnan(dec2["aesthetic"]).all()  # an embedding scorer is not run on pixels
    out = EncodeImages(dataclasses.asdict(ModelSpec()), batch_size=2, scorer=scorer)(dec2)
    assert "pixels" not in out and out["embedding"].shape == (3, 256)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), [1, 0, 1], atol=1e-5)
    np.testing.assert_allclose(out["aesthetic"][[0, 2]], out["embedding"][[0, 2], 0] * 10,
                               rtol=1e-5)
    assert np.isnan(out["aesthetic"][1])


def test_actor_pool_plans():
    two = plan_model_actors({"CPU": 2.0})
    assert (two.size, two.num_gpus, two.device, two.threads) == (1, 0.0, "cpu", 2)
    assert two.num_cpus <= 1.0  # a whole CPU always stays free for the read/decode tasks
    big = plan_model_actors({"CPU": 32.0})
    assert big.size == 8 and big.threads == 4 and big.size * big.num_cpus <= 31
    gpu = plan_model_actors({"CPU": 16.0, "GPU": 4.0})
    assert (gpu.size, gpu.num_gpus, gpu.device) == (4, 1.0, "cuda")
    assert plan_model_actors({"CPU": 16.0, "GPU": 2.0}, num_actors=5).size == 2
    fixed = plan_model_actors({"CPU": 2.0}, num_actors=3)
    assert fixed.size == 3 and fixed.size * fixed.num_cpus <= 1.0


def test_plan_is_deterministic_for_resume(parquet_corpus):
    a = plan_shards(str(parquet_corpus), rows_per_shard=100)
    b = plan_shards(str(parquet_corpus), rows_per_shard=100)
    assert [s.shard_id for s in a] == [s.shard_id for s in b] and len(a) == 3


def test_odd_folder_every_file_embedded_failed_or_skipped(ray_session, tmp_path):
    """14 odd but valid images (CMYK, 16-bit, palette, EXIF-rotated, 1x1, 4000x2, animated GIF,
    multi-page TIFF ...) are embedded, 5 broken files are failures with their reason, the
    caption beside an image is used and 3 other files are listed as skipped: the counts add
    up to the files in the folder."""
    from jobs.embed import main
    from tests.helpers.odd_folder import BROKEN, CAPTIONS, GOOD, SKIPPED, write_odd_folder

    root = write_odd_folder(tmp_path / "odd")
    out = tmp_path / "out"
    assert main(job_args(root, out)) == 0
    table = read_embeddings(out)
    assert sorted(table.column("id").to_pylist()) == sorted(GOOD)
    emb = embedding_matrix(table)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    captions = dict(zip(table["id"].to_pylist(), table["caption"].to_pylist(), strict=True))
    assert captions["rgb.jpg"] == "a noisy photo" and captions["grey.png"] is None
    fails = pq.read_table(out / "failures").to_pylist()
    assert {f["id"]: f["reason"].split(":")[0] for f in fails} == BROKEN
    assert all(f["stage"] == "decode" for f in fails)
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    assert {s["path"]: s["reason"].split(":")[0] for s in skipped} == SKIPPED
    m = read_manifest(out)
    files = m["files"]
    n_files = sum(1 for p in root.rglob("*") if p.is_file())
    assert files["input_files"] == n_files == 23 and files["accounted"] is True
    assert m["rows_out"] + m["rows_failed"] + files["caption_sidecars"] + files["skipped"] == \
        n_files
    assert files["caption_sidecars"] == len(CAPTIONS)
