"""Sharded search, the refine (re-ranking) stage and memory-mapped loading, without Ray.

The parallel (Ray task) build is tested in ``tests/integration/test_index_parallel.py``.
Expected results come from numpy (``q @ x.T`` and a full sort), never from the library's own
``exact_topk``. faiss runs on one thread here, as in ``test_index.py`` (why: its docstring).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aligner.data.embeddings import inspect_embeddings
from aligner.retrieval.index import SearchIndex, has_refine, set_search_params
from aligner.retrieval.index_build import (
    DEFAULT_K_FACTOR,
    build_index,
    shard_bounds,
    shard_mask,
)
from aligner.retrieval.index_parallel import FileScan, shard_files
from aligner.retrieval.metrics import neighbour_recall
from aligner.runtime.manifest import read_manifest
from tests.unit.test_index import (
    assert_exact,
    make_clustered_set,
    make_ids,
    random_unit,
    write_embed_output,
)

D = 64


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("mmap", [False, True])
def test_three_flat_shards_return_the_top_k_of_one_index(tmp_path, mmap):
    """S=3 exact shards, searched and merged, give one exact index's top-k (ids, positions,
    scores), loaded memory-mapped or not; k larger than a shard's share is merged too."""
    n = 2500
    x = random_unit(n, seed=21)
    q = random_unit(30, seed=22)
    ids = make_ids(n, seed=3)
    emb = write_embed_output(tmp_path / "emb", x, ids, files=5)
    build_index(emb, tmp_path / "one", "Flat")
    build_index(emb, tmp_path / "three", "Flat", shards=3, batch_size=600)
    one = SearchIndex.load(tmp_path / "one", mmap=mmap)
    three = SearchIndex.load(tmp_path / "three", mmap=mmap)
    assert len(three.shards) == 3 and three.ntotal == n
    for k in (10, 900):  # 900 > 834 rows in a shard: every shard returns all it has
        a, b = one.search(q, k), three.search(q, k)
        np.testing.assert_array_equal(b.positions, a.positions)
        np.testing.assert_array_equal(b.scores, a.scores)
        assert b.ids == a.ids
    assert_exact(three.search(q, 10), q, x, ids, 10)


def test_shard_bounds_and_masks_cover_every_position_once():
    bounds = shard_bounds(10, 3)
    np.testing.assert_array_equal(bounds, [0, 3, 7, 10])
    p = np.arange(10)
    for mode in ("contiguous", "round_robin"):
        owners = np.stack([shard_mask(p, s, 3, mode, bounds) for s in range(3)])
        np.testing.assert_array_equal(owners.sum(axis=0), np.ones(10))
    np.testing.assert_array_equal(np.flatnonzero(shard_mask(p, 1, 3, "contiguous", bounds)),
                                  [3, 4, 5, 6])
    np.testing.assert_array_equal(np.flatnonzero(shard_mask(p, 1, 3, "round_robin", bounds)),
                                  [1, 4, 7])


def test_a_shard_task_reads_only_the_files_that_hold_its_positions(tmp_path):
    """Files of 4, 0 (all rows failed), 3 and 5 valid rows -> first positions 0, 4, 4, 7;
    contiguous shards [0, 4), [4, 8), [8, 12) read files {0}, {2, 3}, {3}; round robin reads
    every non-empty file."""
    x = random_unit(12, seed=5)
    emb = write_embed_output(tmp_path / "emb", x, files=4)
    infos = inspect_embeddings(emb)
    scans = [FileScan(v, [], 0, "") for v in (4, 0, 3, 5)]
    bounds = shard_bounds(12, 3)
    got = [[(infos.index(i), start) for i, start in
            shard_files(scans, infos, s, 3, "contiguous", bounds)] for s in range(3)]
    assert got == [[(0, 0)], [(2, 4), (3, 7)], [(3, 7)]]
    rr = [(infos.index(i), start) for i, start in
          shard_files(scans, infos, 0, 3, "round_robin", bounds)]
    assert rr == [(0, 0), (2, 4), (3, 7)]
    with pytest.raises(ValueError, match="3 scans for 4 files"):
        shard_files(scans[:3], infos, 0, 3, "contiguous", bounds)


def test_bad_build_arguments_are_value_errors(tmp_path):
    emb = write_embed_output(tmp_path / "emb", random_unit(50, seed=6))
    for kwargs, match in (({"shard_mode": "striped"}, "shard_mode"),
                          ({"k_factor": 0.5}, "k_factor"),
                          ({"cpus_per_task": 0}, "cpus_per_task"),
                          ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ValueError, match=match):
            build_index(emb, tmp_path / "idx", "Flat", **kwargs)
    idx = build_index(emb, tmp_path / "idx", "Flat", shards=2)
    with pytest.raises(ValueError, match="shards \\[2\\] not in this index"):
        SearchIndex.load(tmp_path / "idx", shards=[2])
    with pytest.raises(ValueError, match="k_factor"):
        set_search_params(idx.shards[0], k_factor=0)


# ----------------------------------------------------------------------------- refine


@pytest.fixture(scope="module")
def clustered_emb(tmp_path_factory):
    """The set of ``test_index.py``'s IVF-PQ tests (:func:`make_clustered_set`)."""
    return make_clustered_set(tmp_path_factory)


def test_refine_stage_lifts_ivf_pq_recall(clustered_emb, tmp_path):
    """Measured (IVF256,PQ16 on 5k training rows, nprobe 16): recall@10 0.49 without a
    refine stage; 1.00 with RFlat at the default k_factor (32; 0.91 at 4, 0.49 at 1, which
    only re-orders the IVF-PQ top 10); 0.998 with Refine(SQfp16) at k_factor 16. The PQ codes
    order neighbours that differ only by within-cluster noise badly; re-scoring 320
    candidates with the stored vectors recovers them."""
    emb, x, q, truth = clustered_emb
    common = {"train_sample": 5000, "nprobe": 16}
    plain = build_index(emb, tmp_path / "pq", "IVF256,PQ16", **common)
    rflat = build_index(emb, tmp_path / "rflat", "IVF256,PQ16,RFlat", **common)
    assert not has_refine(plain.shards[0]) and has_refine(rflat.shards[0])
    m = read_manifest(tmp_path / "rflat")
    assert m["refine"] is True and read_manifest(tmp_path / "pq")["refine"] is False
    assert m["search_params"] == {"nprobe": 16, "k_factor": DEFAULT_K_FACTOR}

    r_plain = neighbour_recall(plain.search(q, 10).positions, truth)
    r_rflat = neighbour_recall(SearchIndex.load(tmp_path / "rflat").search(q, 10).positions,
                               truth)
    assert r_plain <= 0.6, r_plain
    assert r_rflat >= 0.95, r_rflat
    # k_factor is a real knob: 1 re-orders only the IVF-PQ top 10
    r_k1 = neighbour_recall(SearchIndex.load(tmp_path / "rflat", k_factor=1)
                            .search(q, 10).positions, truth)
    assert r_k1 < r_rflat - 0.2, (r_k1, r_rflat)
    # the refined scores are the exact inner products of the hits
    res = rflat.search(q[:5], 10)
    np.testing.assert_allclose(res.scores, np.take_along_axis(q[:5] @ x.T, res.positions, 1),
                               atol=1e-5)
    # stored vectors come back exactly (from the refine stage, not the PQ codes)
    np.testing.assert_array_equal(rflat.vectors_at([0, 7, 19_999]), x[[0, 7, 19_999]])

    fp16 = build_index(emb, tmp_path / "sq", "IVF256,PQ16,Refine(SQfp16)", k_factor=16,
                       **common)
    assert neighbour_recall(fp16.search(q, 10).positions, truth) >= 0.95
    sizes = {name: (tmp_path / name / "shard-00.faiss").stat().st_size
             for name in ("pq", "rflat", "sq")}
    assert sizes["rflat"] > 20_000 * D * 4 > sizes["sq"] > 20_000 * D * 2 > sizes["pq"]


LOAD_AND_MEASURE = """
import sys
import faiss  # noqa: F401 - imported before measuring: the import itself takes memory
import numpy as np
import pyarrow.parquet as pq
from aligner.retrieval.index import SearchIndex

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

path, mmap = sys.argv[1], sys.argv[2] == "1"
q = np.load(sys.argv[3])
pq.read_table(path + "/ids.parquet")  # arrow's memory pool starts (~30 MB) before measuring
before = anon_mb()
index = SearchIndex.load(path, mmap=mmap)  # kept alive while measuring
res = index.search(q, 10)
print(anon_mb() - before)
np.save(sys.argv[4], res.positions)
"""


def _load_in_subprocess(index: Path, mmap: bool, q_file: Path, out: Path) -> float:
    """Load and search the index in a fresh interpreter (this one's heap keeps freed pages
    resident); returns the growth of its anonymous resident memory (``RssAnon``), MB: heap
    and private maps, not the page cache behind memory-mapped files."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(index), str(int(mmap)),
                           str(q_file), str(out)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2], check=True)
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_mmap_keeps_a_refine_stage_out_of_process_memory(tmp_path):
    """200k x 128 float32 vectors (98 MB) in a refine stage: read into anonymous memory
    without mmap; with mmap they stay in the page cache, and the search results are the same.
    (With 60k vectors, 29 MB, the load's other allocations, about 2-12 MB from run to run,
    made the comparison flaky under load; the bound is unchanged.)"""
    x = random_unit(200_000, d=128, seed=31)
    q = random_unit(50, d=128, seed=32)
    emb = write_embed_output(tmp_path / "emb", x, files=2)
    build_index(emb, tmp_path / "idx", "IVF64,PQ16,RFlat", train_sample=4000, nprobe=8,
                k_factor=8)
    np.save(tmp_path / "q.npy", q)
    vec_mb = x.nbytes / 2**20
    read_mb = _load_in_subprocess(tmp_path / "idx", False, tmp_path / "q.npy", tmp_path / "a.npy")
    mapped_mb = _load_in_subprocess(tmp_path / "idx", True, tmp_path / "q.npy", tmp_path / "b.npy")
    # the mapped load saves (about) the vectors' bytes; what both pay (the ids table, search
    # buffers, the quantisers) is a few MB
    assert read_mb - mapped_mb > 0.8 * vec_mb, (read_mb, mapped_mb, vec_mb)
    assert mapped_mb < 0.4 * vec_mb, (read_mb, mapped_mb, vec_mb)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
