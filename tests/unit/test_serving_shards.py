"""Serving a sharded index, and nprobe / k_factor at query time, without Ray.

The deployment classes' logic is called directly (``Deployment.func_or_class``); the shard
deployments' handles are stood in for by objects with the same ``search.remote(...).result()``
shape, so the retriever's fan-out and merge run as they do in Serve. Expected top-k come from
one unsharded index (itself checked against numpy in ``test_index_shards.py``) or from numpy.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from aligner.retrieval.index import RemoteShardsIndex, SearchIndex, search_parameters
from aligner.retrieval.index_build import build_index
from aligner.retrieval.metrics import neighbour_recall
from tests.unit.test_index import clustered, make_ids, numpy_topk, random_unit, write_embed_output

D = 256  # the built-in model's embedding size (the retriever test encodes nothing)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


class LocalHandle:
    """A shard deployment's handle, in-process: ``search.remote(...)`` runs the deployment
    class's coroutine and returns an object whose ``result()`` is its answer."""

    def __init__(self, shard) -> None:
        self.calls = 0
        outer = self

        class _Method:
            def remote(self, queries, k, params):
                outer.calls += 1
                out = asyncio.run(shard.search(queries, k, params))
                return SimpleNamespace(result=lambda: out)

        self.search = _Method()


def shard_handles(path, groups):
    from serving.deployments import IndexShard

    return [LocalHandle(IndexShard.func_or_class(str(path), g)) for g in groups]


@pytest.fixture(scope="module")
def flat_world(tmp_path_factory):
    """2,400 random unit vectors of size 256, as one Flat index and as 4 Flat shards."""
    root = tmp_path_factory.mktemp("shards")
    x = random_unit(2400, D, seed=5)
    ids = make_ids(len(x), seed=5)
    emb = write_embed_output(root / "emb", x, ids, files=3)
    build_index(emb, root / "one", "Flat")
    build_index(emb, root / "four", "Flat", shards=4, batch_size=500)
    return SimpleNamespace(root=root, x=x, ids=ids, one=root / "one", four=root / "four")


@pytest.mark.parametrize("groups", [[[0, 1], [2, 3]], [[0], [1], [2], [3]], [[0, 1, 2, 3]]])
def test_fanned_out_shards_equal_one_index(flat_world, groups):
    """Shard groups searched apart and merged by the retriever's fan-out give one index's
    top-k: positions, scores and ids; also for k larger than any shard's share."""
    from serving.deployments import fan_out

    handles = shard_handles(flat_world.four, groups)
    remote = RemoteShardsIndex.open(flat_world.four, fan_out(handles))
    one = SearchIndex.load(flat_world.one)
    q = random_unit(20, D, seed=6)
    assert remote.ntotal == one.ntotal == 2400 and remote.dim == D
    for k in (10, 700):  # 700 > 600 rows in a shard
        a, b = one.search(q, k), remote.search(q, k)
        np.testing.assert_array_equal(b.positions, a.positions)
        np.testing.assert_array_equal(b.scores, a.scores)
        assert b.ids == a.ids
    assert all(h.calls == 2 for h in handles)  # one call per group per search
    _, truth = numpy_topk(q, flat_world.x, 10)
    np.testing.assert_array_equal(remote.search(q, 10).positions, truth)


def test_retriever_over_shard_deployments_answers_like_one_index(flat_world):
    """The Retriever deployment with ``shards`` answers a query as the unsharded one does:
    ids, scores, aesthetics and the page's rows; what needs vectors is a 422, not a crash."""
    from serving.deployments import Retriever

    model = {"name": "builtin", "checkpoint": None, "pretrained": None}
    sharded = Retriever.func_or_class(
        "m", {**model, "indexes": {"flat": str(flat_world.four)}}, 10_000_000,
        {"flat": shard_handles(flat_world.four, [[0, 1], [2, 3]])})
    single = Retriever.func_or_class("m", {**model, "indexes": {"flat": str(flat_world.one)}},
                                     10_000_000)
    for seed in range(3):
        q = random_unit(1, D, seed=40 + seed)[0].tolist()
        a = asyncio.run(single.query(embedding=q, k=25, page=(5, 10)))
        b = asyncio.run(sharded.query(embedding=q, k=25, page=(5, 10)))
        assert b["ids"] == a["ids"] and b["rows"] == a["rows"]
        np.testing.assert_allclose(b["scores"], a["scores"], rtol=0, atol=1e-6)
        assert b["aesthetic"] == a["aesthetic"]
    sharded.check_health()  # the coordinator holds no vectors: not a reason to be unhealthy
    q = random_unit(1, D, seed=9)[0].tolist()
    out = asyncio.run(sharded.query(embedding=q, k=5, dedup_threshold=0.9))
    assert out["error"]["status"] == 422 and "vectors" in out["error"]["detail"]


# ----------------------------------------------------------------------------- k_factor / nprobe


@pytest.fixture(scope="module")
def refine_world(tmp_path_factory):
    """6,000 clustered vectors (size 256) as a 2-shard ``IVF64,PQ16x4,RFlat`` index built
    with nprobe 1 and k_factor 1 as its defaults (its worst settings), queries and numpy's
    exact top-10."""
    root = tmp_path_factory.mktemp("refine")
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, D)).astype(np.float32)
    x = clustered(6000, centres, noise=0.3, seed=2)
    emb = write_embed_output(root / "emb", x, make_ids(len(x), seed=2), files=2)
    build_index(emb, root / "rf", "IVF64,PQ16x4,RFlat", train_sample=6000, shards=2,
                nprobe=1, k_factor=1)
    q = clustered(100, centres, noise=0.3, seed=3)
    _, truth = numpy_topk(q, x, 10)
    return SimpleNamespace(path=root / "rf", q=q, truth=truth)


def _recall(index, world, **params) -> float:
    return neighbour_recall(index.search(world.q, 10, **params).positions, world.truth)


def test_nprobe_and_k_factor_at_query_time_take_effect(refine_world):
    """Raising nprobe and k_factor for one search raises recall towards 1, without changing
    the index's defaults for the next search (the parameters ride with the call)."""
    index = SearchIndex.load(refine_world.path)
    low = _recall(index, refine_world)
    wide = _recall(index, refine_world, nprobe=64)
    both = _recall(index, refine_world, nprobe=64, k_factor=32)
    assert low < wide < both and both >= 0.99, (low, wide, both)
    assert _recall(index, refine_world) == low  # defaults untouched
    _, applied = search_parameters(index.shards[0], nprobe=8, k_factor=4, ef_search=10)
    assert applied == {"nprobe": 8, "k_factor": 4.0}  # no HNSW inside: efSearch left out
    with pytest.raises(ValueError, match="k_factor"):
        index.search(refine_world.q, 10, k_factor=0.5)


def test_k_factor_from_the_serving_config_and_per_request_through_shards(refine_world):
    """``k_factor``/``nprobe`` in a model's config become the shard replicas' defaults; a
    request's own values go through the fan-out to every shard group."""
    from serving.deployments import fan_out

    path = refine_world.path
    plain = RemoteShardsIndex.open(path, fan_out(shard_handles(path, [[0], [1]])))
    from serving.deployments import IndexShard

    tuned = RemoteShardsIndex.open(path, fan_out(
        [LocalHandle(IndexShard.func_or_class(str(path), [s], False, 64, None, 32))
         for s in (0, 1)]))
    local = SearchIndex.load(path, nprobe=64, k_factor=32)
    np.testing.assert_array_equal(tuned.search(refine_world.q, 10).positions,
                                  local.search(refine_world.q, 10).positions)
    np.testing.assert_array_equal(plain.search(refine_world.q, 10, nprobe=64,
                                               k_factor=32).positions,
                                  local.search(refine_world.q, 10).positions)
    assert _recall(plain, refine_world) < _recall(plain, refine_world, nprobe=64, k_factor=32)


# ----------------------------------------------------------------------------- config


def test_config_limits_and_shard_groups(flat_world):
    from fastapi import HTTPException
    from pydantic import ValidationError

    from serving.app import shard_deployments, shard_groups
    from serving.config import LimitArgs, ModelArgs
    from serving.ingress import Ingress
    from serving.schemas import SearchRequest

    assert shard_groups(5, 2) == [[0, 1, 2], [3, 4]]
    assert shard_groups(4, 4) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="shards=") as e:
        shard_groups(2, 3)
    assert "2 shard(s)" in str(e.value)
    for bad in ({"k_factor": 0.5}, {"shard_groups": 0}, {"nprobe": 0}):
        with pytest.raises(ValidationError):
            ModelArgs(indexes={"flat": "x"}, **bad)
    m = ModelArgs(indexes={"flat": str(flat_world.four)}, shard_groups=2, k_factor=8)
    bound = shard_deployments("aligned", m)
    assert list(bound) == ["flat"] and len(bound["flat"]) == 2
    assert shard_deployments("aligned", ModelArgs(indexes={"flat": "x"})) == {}

    fake = SimpleNamespace(args=SimpleNamespace(limits=LimitArgs(max_nprobe=64,
                                                                  max_k_factor=16)))
    limits = Ingress.func_or_class._limits
    assert limits(fake, SearchRequest(text="a cat", nprobe=64, k_factor=16)) == 10
    for over, word in (({"nprobe": 65}, "nprobe=65"), ({"k_factor": 17}, "k_factor=17")):
        with pytest.raises(HTTPException) as e:
            limits(fake, SearchRequest(text="a cat", **over))
        assert e.value.status_code == 400 and word in e.value.detail
    with pytest.raises(ValidationError):
        SearchRequest(text="a cat", k_factor=0.5)
