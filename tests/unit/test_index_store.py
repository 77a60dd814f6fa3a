"""Index directories in stores and their local cache (aligner.retrieval.index_store), and the
embeddings readers' one code path for paths and URIs, without Ray or an S3 server.

A :class:`aligner.data.io.Store` on a local directory stands in for the bucket here: the cache
and the publishing go through the same Store calls (pyarrow's LocalFileSystem instead of its
S3FileSystem); ``tests/integration/test_index_object_store.py`` runs them against a real
S3-compatible server. Local paths must behave exactly as before: no copy, no cache.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest

from aligner.data.embeddings import (
    embedding_files,
    inspect_embeddings,
    lookup_embeddings,
    model_record,
    read_embeddings,
    sample_vectors,
)
from aligner.data.io import Store, join_path, parquet_files, parquet_files_at
from aligner.retrieval.index import SearchIndex
from aligner.retrieval.index_build import build_index
from aligner.retrieval.index_store import (
    cache_key,
    fetch_index,
    local_index_dir,
    needed_files,
    publish_index,
)
from aligner.runtime.manifest import read_manifest
from tests.unit.test_index import make_ids, random_unit, write_embed_output

D = 16

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """``$ALIGNER_CACHE`` in the test's temp dir; the index cache is ``<it>/index``."""
    monkeypatch.setenv("ALIGNER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "index"


def _build(tmp_path: Path, name: str, factory: str = "Flat", n: int = 300,
           shards: int = 2) -> tuple[Path, np.ndarray]:
    x = random_unit(n, d=D, seed=3)
    emb = tmp_path / "emb"
    if not emb.exists():
        write_embed_output(emb, x, make_ids(n))
    build_index(emb, tmp_path / name, factory, shards=shards)
    return tmp_path / name, x


class RecordingStore(Store):
    """A local store that records the order of uploads (what a bucket would receive)."""

    def __init__(self, uri: str | Path) -> None:
        super().__init__(uri)
        self.uploads: list[str] = []

    def upload(self, local: str | Path, rel: str) -> int:
        self.uploads.append(rel)
        return super().upload(local, rel)


# ----------------------------------------------------------------------------- the cache key


def test_cache_key_depends_on_the_uri_and_the_manifest_bytes():
    m = b'{"ntotal": 3}'
    assert cache_key("s3://b/idx", m) == cache_key("s3://b/idx/", m)  # a trailing / is the same
    assert cache_key("s3://b/idx", m) != cache_key("s3://b/other", m)
    assert cache_key("s3://b/idx", m) != cache_key("s3://b/idx", b'{"ntotal": 4}')
    assert re.fullmatch(r"[0-9a-f]{32}", cache_key("gs://b/idx", m))


def test_needed_files_are_the_ids_and_the_shards_asked_for():
    manifest = {"shards": [{"file": "shard-00.faiss"}, {"file": "shard-01.faiss"}]}
    assert needed_files(manifest, None) == ["ids.parquet", "shard-00.faiss", "shard-01.faiss"]
    assert needed_files(manifest, [1]) == ["ids.parquet", "shard-01.faiss"]
    assert needed_files(manifest, []) == ["ids.parquet"]
    assert needed_files(manifest, [5]) == ["ids.parquet"]  # the loader refuses it, by number


# ----------------------------------------------------------------------------- local paths


def test_local_paths_are_loaded_in_place_and_never_cached(tmp_path, cache):
    idx, x = _build(tmp_path, "idx")
    assert local_index_dir(idx) == idx
    rel = os.path.relpath(idx)
    assert local_index_dir(rel) == Path(rel)  # as given, relative or not
    assert local_index_dir(f"file://{idx}") == idx
    a = SearchIndex.load(idx).search(x[:4], 5)
    b = SearchIndex.load(f"file://{idx}").search(x[:4], 5)
    assert a.ids == b.ids
    assert not cache.exists()
    with pytest.raises(FileNotFoundError, match=re.escape(f"index directory {tmp_path / 'no'}")):
        SearchIndex.load(tmp_path / "no")
    assert not cache.exists()


def test_a_local_embeddings_dataset_reads_as_before(tmp_path):
    """A plain path keeps its ``Path`` s (relative stays relative) and the files of
    ``parquet_files``; a ``file://`` URI of it reads the same rows."""
    x = random_unit(120, d=D, seed=5)
    ids = make_ids(120)
    emb = write_embed_output(tmp_path / "emb", x, ids)
    rel = Path(os.path.relpath(emb))
    infos = inspect_embeddings(rel)
    assert [i.path for i in infos] == parquet_files(rel / "embeddings")
    assert all(isinstance(i.path, Path) and not i.path.is_absolute() for i in infos)
    assert embedding_files(rel) == [i.path for i in infos]
    uri = f"file://{emb}"
    assert [str(i.path) for i in inspect_embeddings(uri)] == \
        [f"{uri}/embeddings/{p.name}" for p in parquet_files(emb / "embeddings")]
    assert read_embeddings(uri).equals(read_embeddings(rel))
    np.testing.assert_array_equal(sample_vectors(inspect_embeddings(uri), 50, seed=1),
                                  sample_vectors(infos, 50, seed=1))
    assert lookup_embeddings(uri, ids[:3]).equals(lookup_embeddings(rel, ids[:3]))
    assert model_record(uri) == model_record(rel) == {"name": "builtin", "embed_dim": D}
    assert read_manifest(uri) == read_manifest(emb)


def test_parquet_files_at_follows_the_local_rules_for_uris(tmp_path):
    root = tmp_path / "d"
    for rel in ("b/x.parquet", "a.parquet", "a.x/y.parquet", "a/z.parquet", "_tmp/q.parquet",
                ".hidden.parquet", "failures/f.parquet", "notes.txt", "c/_SUCCESS"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    (root / "linked").symlink_to(root / "b")  # os.walk does not follow linked directories
    want = parquet_files(root)
    fs, files = parquet_files_at(root)
    assert fs.type_name == "local" and [f for f, _ in files] == want
    _, files = parquet_files_at(f"file://{root}")
    got = [str(f).removeprefix(f"file://{root}/") for f, _ in files]
    assert got == ["a/z.parquet", "a.parquet", "a.x/y.parquet", "b/x.parquet",
                   "linked/x.parquet"]  # the same order; pyarrow follows the link
    assert [str(p.relative_to(root)) for p in want] == got[:-1]
    with pytest.raises(FileNotFoundError, match="embeddings: .*nope does not exist"):
        parquet_files_at(f"file://{tmp_path}/nope", "embeddings")
    assert join_path("s3://b/x/", "embeddings") == "s3://b/x/embeddings"
    assert join_path("rel/x", "embeddings") == Path("rel/x/embeddings")


# ----------------------------------------------------------------------------- publish + fetch


def test_publish_uploads_the_manifest_last_and_fetch_caches_what_loading_needs(tmp_path, cache,
                                                                              caplog):
    idx, x = _build(tmp_path, "idx")
    bucket = RecordingStore(tmp_path / "bucket" / "idx")
    (tmp_path / "bucket" / "idx").mkdir(parents=True)
    (tmp_path / "bucket" / "idx" / "manifest.json").write_text("{}")  # an older build's
    assert publish_index(idx, bucket) == 4  # ids.parquet, 2 shards, the manifest
    assert bucket.uploads[-1] == "manifest.json" and len(set(bucket.uploads)) == 4
    assert read_manifest(bucket.uri) == read_manifest(idx)

    # a shard replica: only its shard comes down
    with caplog.at_level(logging.INFO, logger="aligner.retrieval.index_store"):
        part = fetch_index(bucket, shards=[1])
    assert part.parent == cache and "downloaded 2 file(s)" in caplog.text
    assert sorted(p.name for p in part.iterdir()) == \
        [".lock", "ids.parquet", "manifest.json", "shard-01.faiss", "source.txt"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aligner.retrieval.index_store"):
        full = fetch_index(bucket)
    assert full == part and "downloaded 1 file(s)" in caplog.text  # shard 0 only
    ids_inode = (full / "ids.parquet").stat().st_ino
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aligner.retrieval.index_store"):
        again = fetch_index(bucket)
    assert again == full and "using the cached copy" in caplog.text
    assert (again / "ids.parquet").stat().st_ino == ids_inode  # not rewritten
    want = SearchIndex.load(idx).search(x[:5], 7)
    got = SearchIndex.load(full, mmap=True).search(x[:5], 7)
    assert got.ids == want.ids
    np.testing.assert_array_equal(got.scores, want.scores)

    # a new build at the same place (a new manifest): a new cache directory
    idx2, _ = _build(tmp_path, "idx2", shards=3)
    publish_index(idx2, bucket)
    new = fetch_index(bucket)
    assert new != full and new.parent == cache
    assert len(read_manifest(new)["shards"]) == 3
    assert (full / "shard-00.faiss").is_file()  # the old copy is left to its users
    assert not list(cache.glob("*/.*.tmp"))


def test_publish_refuses_an_unfinished_build(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "ids.parquet").write_bytes(b"x")
    bucket = RecordingStore(tmp_path / "bucket")
    with pytest.raises(FileNotFoundError, match="not a finished index"):
        publish_index(tmp_path / "half", bucket)
    assert bucket.uploads == []


class ChangingStore(Store):
    """A store whose index is replaced (a build publishing ``builds[0]``, ``builds[1]`` ...
    in turn) while each of the first ``times`` downloads of ``ids.parquet`` runs."""

    def __init__(self, uri: str | Path, builds: list[Path], times: int) -> None:
        super().__init__(uri)
        self.builds, self.times, self.done = builds, times, 0

    def download(self, rel: str, local: str | Path, chunk: int = 8 << 20) -> int:
        n = super().download(rel, local, chunk)
        if rel == "ids.parquet" and self.done < self.times:
            publish_index(self.builds[self.done % len(self.builds)], Store(self.uri))
            self.done += 1
        return n


def test_a_download_that_overlaps_a_publish_is_refused_and_retried(tmp_path, cache,
                                                                   monkeypatch):
    idx, x = _build(tmp_path, "idx")
    idx2, _ = _build(tmp_path, "idx2", factory="IVF2,Flat")
    publish_index(idx, Store(tmp_path / "bucket"))
    old_key = cache_key(str(tmp_path / "bucket"),
                        (tmp_path / "bucket" / "manifest.json").read_bytes())
    got = fetch_index(ChangingStore(tmp_path / "bucket", [idx2], times=1))
    assert read_manifest(got)["factory"] == "IVF2,Flat"
    assert not [p.name for p in (cache / old_key).iterdir() if not p.name.startswith(".")]
    # a build that keeps changing it (and an empty cache): an error, not a mixed copy
    monkeypatch.setenv("ALIGNER_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(RuntimeError, match="changed during each of 3 downloads"):
        fetch_index(ChangingStore(tmp_path / "bucket", [idx, idx2], times=10))


def test_fetch_names_what_is_missing(tmp_path, cache):
    empty = Store(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="index directory .*nothing does not exist"):
        fetch_index(empty)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "ids.parquet").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no manifest.json in .*half"):
        fetch_index(Store(tmp_path / "half"))
    idx, _ = _build(tmp_path, "idx")
    bucket = Store(tmp_path / "bucket")
    publish_index(idx, bucket)
    bucket.delete("shard-01.faiss")
    assert fetch_index(bucket, shards=[0]).is_dir()  # what a replica of shard 0 needs is there
    with pytest.raises(FileNotFoundError, match="index file .*shard-01.faiss is missing"):
        fetch_index(bucket)
