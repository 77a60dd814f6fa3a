"""The table readers and input checks of ``aligner.data`` on a local path and on a URI, without
Ray or an S3 server.

A local path must read exactly as before: :func:`old_read_parquet` is ``read_parquet`` as it
was before it took URIs, and every case (files, order, promoted schemas, ``preferred``, columns,
errors) is compared with it. A ``file://`` URI takes the object-store branch of the same
code (``parquet_files_at``'s listing, ``Store``) on pyarrow's LocalFileSystem;
``tests/integration/test_preferences_object_store.py`` runs the jobs against a real
S3-compatible server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aligner.data import io as dio
from aligner.data.corpus import corpus_columns, read_corpus
from aligner.data.io import (
    Store,
    exists_at,
    is_dir_at,
    output_dir,
    parquet_files,
    read_parquet,
    require_at,
)
from aligner.data.preferences import preferences_manifest, read_preferences
from aligner.data.queries import query_splits, read_queries
from aligner.training.align_data import degrade_seed_of
from aligner.training.reward_data import votes_manifest


def old_read_parquet(path, what="table", preferred=None, columns=None):
    """``aligner.data.io.read_parquet`` before it took URIs (2c73188), the reference."""
    p = Path(path)
    if preferred and p.is_dir() and (p / preferred).is_file():
        files = [p / preferred]
    else:
        files = parquet_files(p, what)
    if not files:
        raise FileNotFoundError(f"{what}: no Parquet files under {p}")
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, columns=list(columns) if columns else None))
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{what}: {f} is not a readable Parquet file ({e})") from e
        except KeyError as e:
            raise ValueError(f"{what}: {f} lacks column {e}") from e
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive")


def outcome(fn, *args, **kwargs):
    """``("ok", table)`` or ``(exception type, message)``."""
    try:
        return "ok", fn(*args, **kwargs)
    except (OSError, ValueError) as e:
        return type(e), str(e)


@pytest.fixture()
def tree(tmp_path) -> Path:
    """A dataset directory with nested, hidden, ``_``-prefixed and failure files, two schemas
    (``b`` only in some files), a ``queries.parquet`` beside the others, an empty directory,
    and a file that is not Parquet."""
    root = tmp_path / "d"
    n = 0
    for rel in ("b/x.parquet", "a.parquet", "a.x/y.parquet", "a/z.parquet", "queries.parquet"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        cols = {"id": [f"r{n}", f"r{n + 1}"], "a": [n, n + 1]}
        if rel.startswith("a"):
            cols["b"] = ["x", "y"]
        pq.write_table(pa.table(cols), root / rel)
        n += 2
    for rel in ("_tmp/q.parquet", ".hidden.parquet", "failures/f.parquet", "c/_SUCCESS"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"not parquet")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.parquet").write_bytes(b"not parquet")
    return root


def test_read_parquet_reads_local_paths_exactly_as_before(tree, monkeypatch):
    tmp = tree.parent
    monkeypatch.chdir(tmp)
    cases = [
        ((tree,), {}), (("d",), {}), (("d/",), {}),  # absolute, relative, trailing /
        ((tree,), {"preferred": "queries.parquet"}), ((tree,), {"preferred": "nope.parquet"}),
        ((tree / "a.parquet",), {"preferred": "queries.parquet"}),
        ((tree,), {"columns": ["id"]}), ((tree / "a",), {"columns": ["b"]}),
        ((tmp / "missing",), {"what": "queries"}), ((tmp / "empty",), {"what": "votes"}),
        ((tmp / "bad",), {}), ((tree / "b",), {"columns": ["nope"]}),
    ]
    for args, kwargs in cases:
        want, got = outcome(old_read_parquet, *args, **kwargs), outcome(read_parquet, *args,
                                                                         **kwargs)
        assert got[0] == want[0], (args, kwargs, got, want)
        if want[0] == "ok":
            assert got[1].equals(want[1]), (args, kwargs)
        else:
            assert got[1] == want[1], (args, kwargs)
    # the files and their order: part by part, a/z before a.parquet before a.x/y
    assert read_parquet(tree).column("id").to_pylist()[:6] == ["r6", "r7", "r2", "r3", "r4",
                                                               "r5"]


def test_read_parquet_reads_a_uri_as_the_path(tree):
    uri = f"file://{tree}"
    for kwargs in ({}, {"preferred": "queries.parquet"}, {"columns": ["id", "a"]}):
        assert read_parquet(uri, **kwargs).equals(read_parquet(tree, **kwargs)), kwargs
    assert read_parquet(f"{uri}/a.parquet").equals(read_parquet(tree / "a.parquet"))
    with pytest.raises(FileNotFoundError, match=f"queries: {uri}/nope does not exist"):
        read_parquet(f"{uri}/nope", "queries")
    with pytest.raises(FileNotFoundError, match="votes: no Parquet files under file://"):
        read_parquet(f"file://{tree.parent / 'empty'}/", "votes")
    with pytest.raises(ValueError, match=f"file://{tree.parent}/bad/x.parquet is not a readable"):
        read_parquet(f"file://{tree.parent / 'bad'}")
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        read_parquet("ftp://host/x")


def test_input_checks_on_paths_and_uris(tree):
    for path in (tree, f"file://{tree}"):
        assert exists_at(path) and is_dir_at(path)
        require_at(path, "queries", directory=True)
    f = tree / "a.parquet"
    assert exists_at(f) and not is_dir_at(f) and exists_at(f"file://{f}")
    require_at(f, "queries")
    with pytest.raises(FileNotFoundError, match=f"^embeddings {f} does not exist$"):
        require_at(f, "embeddings", directory=True)
    assert not exists_at(tree / "nope") and not is_dir_at(f"file://{tree}/nope")
    with pytest.raises(FileNotFoundError, match=f"^corpus file://{tree}/nope does not exist$"):
        require_at(f"file://{tree}/nope/", "corpus")
    with pytest.raises(ValueError, match="names no bucket"):
        require_at("s3:///x", "corpus")


def test_output_dir_publishes_a_uri_at_the_end_manifest_last(tmp_path, monkeypatch):
    local = tmp_path / "rel" / "out"
    monkeypatch.chdir(tmp_path)
    with output_dir("rel/out") as out:  # a local path: the directory itself, as given
        assert out == Path("rel/out") and local.is_dir()
        (out / "x.txt").write_text("x")
    assert (local / "x.txt").read_text() == "x"

    uploads: list[str] = []
    real = Store.upload

    def record(self, src, rel):
        uploads.append(rel)
        return real(self, src, rel)

    monkeypatch.setattr(Store, "upload", record)
    dest = tmp_path / "store"
    dest.mkdir()
    (dest / "manifest.json").write_text('{"old": true}')
    (dest / "stale.png").write_text("kept")
    with pytest.raises(RuntimeError, match="boom"), output_dir(f"file://{dest}") as out:
        (out / "manifest.json").write_text("{}")
        raise RuntimeError("boom")
    assert uploads == [] and json.loads((dest / "manifest.json").read_text()) == {"old": True}
    with output_dir(f"file://{dest}") as out:
        assert out != dest and not is_dir_at(out / "sub")
        (out / "sub").mkdir()
        for name in ("manifest.json", "b.parquet", "sub/a.png", "config.yaml"):
            (out / name).write_text(name)
    assert uploads == ["b.parquet", "config.yaml", "sub/a.png", "manifest.json"]
    assert (dest / "manifest.json").read_text() == "manifest.json"
    assert (dest / "sub" / "a.png").read_text() == "sub/a.png"
    assert (dest / "stale.png").read_text() == "kept"
    assert not list(dest.rglob(".*"))  # no temp files left


def test_manifests_of_preference_tables(tmp_path):
    d = tmp_path / "prefs"
    d.mkdir()
    pq.write_table(pa.table({"query_id": ["q"], "query": ["a"], "chosen_id": ["x"],
                             "rejected_id": ["y"], "source": ["grid"], "weight": [1.0]}),
                   d / "preferences.parquet")
    for p in (d, f"file://{d}", d / "preferences.parquet", tmp_path / "missing"):
        assert preferences_manifest(p) == {} and degrade_seed_of(p) == 0
    (d / "manifest.json").write_text(json.dumps({"degrade": {"seed": 7}, "source": "page"}))
    for p in (d, f"file://{d}", f"file://{d}/"):
        assert degrade_seed_of(p) == 7 and votes_manifest(p)["source"] == "page"
    assert degrade_seed_of(d / "preferences.parquet") == 0
    a, b = read_preferences(f"file://{d}"), read_preferences(d)
    assert a.schema == b.schema and repr(a.to_pylist()) == repr(b.to_pylist())  # NaN != NaN
    with pytest.raises(FileNotFoundError, match="preference table: file://.*missing does not"):
        read_preferences(f"file://{tmp_path}/missing")


def test_queries_and_corpus_read_a_uri_as_the_path(tmp_path, monkeypatch):
    q = tmp_path / "queries"
    q.mkdir()
    pq.write_table(pa.table({"query_id": ["q0", "q1", "q2"], "query": ["a", "b", "c"],
                             "split": ["train", "val", "test"]}), q / "queries.parquet")
    uri = f"file://{q}"
    assert read_queries(uri, splits=["train", "val"]).equals(read_queries(q, ["train", "val"]))
    ids = ["q0", "q1", "q2", "q9"]
    assert query_splits(uri, ids, 0.5, 0) == query_splits(q, ids, 0.5, 0)
    assert query_splits(uri, ids, 0.5, 0)["q2"] == "test"
    # nothing there: every id hashed, as for a missing local path
    assert query_splits(f"{uri}/nope", ids, 0.5, 0) == query_splits(tmp_path / "x", ids, 0.5, 0)

    c = tmp_path / "corpus"
    c.mkdir()
    pq.write_table(pa.table({"id": ["i0", "i1"], "image": [b"x", b"y"], "caption": ["a", "b"],
                             "split": ["train", "test"]}), c / "part-0.parquet")
    assert corpus_columns(f"file://{c}") == corpus_columns(c) == ["id", "image", "caption",
                                                                  "split"]
    assert read_corpus(f"file://{c}/", ["id"], split="test").equals(
        read_corpus(c, ["id"], split="test"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="^corpus nope does not exist$"):
        read_corpus("nope")
    with pytest.raises(FileNotFoundError, match=f"^corpus file://{tmp_path}/nope does not"):
        corpus_columns(f"file://{tmp_path}/nope")


def test_align_inputs_check_what_is_given_and_refuse_a_uri_output(tmp_path):
    from aligner.retrieval.models import ModelSpec
    from aligner.training.config import AlignConfig
    from aligner.training.runs import align_inputs

    world = tmp_path / "world"
    (world / "corpus").mkdir(parents=True)
    (tmp_path / "prefs.parquet").write_bytes(b"")
    model = ModelSpec(checkpoint=str(tmp_path / "ckpt"))
    cfg = AlignConfig(world=str(world), preferences=str(tmp_path / "prefs.parquet"),
                      model=model)
    # the world's queries may be absent (hash split); given ones must exist
    assert align_inputs(cfg) == (str(world / "corpus"), str(world / "queries"))
    uri = AlignConfig(world=f"file://{world}/", preferences=cfg.preferences, model=model)
    assert align_inputs(uri) == (f"file://{world}/corpus", f"file://{world}/queries")
    for field, value, message in [
        ("queries", str(tmp_path / "q"), f"queries {tmp_path / 'q'} does not exist"),
        ("corpus", f"file://{tmp_path}/c", f"corpus file://{tmp_path}/c does not exist"),
        ("preferences", str(tmp_path / "p"), f"preferences {tmp_path / 'p'} does not exist"),
    ]:
        bad = AlignConfig(**{**cfg.__dict__, field: value})
        with pytest.raises(FileNotFoundError, match=f"^{message}$"):
            align_inputs(bad)
    with pytest.raises(ValueError, match="not a URI"):
        AlignConfig(output="s3://bucket/aligned", model=model)


def test_uri_helpers_keep_local_paths_as_given():
    assert dio.shown_path("rel/x/") == Path("rel/x")
    assert dio.shown_path("s3://b/x/") == "s3://b/x"
    assert os.fspath(dio.shown_path("/a/b")) == "/a/b"
