"""The embedding job survives a model actor dying mid-run: every id is written exactly once.

A model actor kills its own process (``os._exit``) on its second batch
(:class:`tests.helpers.embed_faults.DieOnceScorer`); Ray Data restarts the actor and replays the
batch on it, and the part files named by their rows make the replay an overwrite. The ids are
counted across every output file (embeddings and failures), read back from disk.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import embed_faults as faults

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

N_IMAGES = 192
CORRUPT = 5


def _corpus(root: Path) -> list[str]:
    rng = np.random.default_rng(7)
    ids = [f"img{i:04d}" for i in range(N_IMAGES)]
    images = [faults.png(rng) for _ in ids]
    images[CORRUPT] = images[CORRUPT][:40]
    root.mkdir(parents=True)
    for part, (lo, hi) in enumerate([(0, 100), (100, N_IMAGES)]):
        pq.write_table(pa.table({"id": ids[lo:hi], "image": images[lo:hi],
                                 "caption": [f"c{i}" for i in range(lo, hi)]}),
                       root / f"part-{part}.parquet", row_group_size=32)
    return ids


def test_killed_actor_every_id_written_exactly_once(ray_session, tmp_path, capsys):
    from aligner.runtime.manifest import read_manifest
    from jobs.embed import main

    ids = _corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    fired = faults.arm()
    try:
        rc = main([f"input={tmp_path / 'corpus'}", f"output={out}", "model.name=builtin",
                   "batch_size=16", "read_batch_rows=16", "rows_per_shard=48", "progress=false",
                   f"scorer={faults.SCORER}"])
    finally:
        died = fired.exists()
        faults.disarm()
    assert rc == 0, capsys.readouterr().err[-3000:]
    assert died, "no actor died: the fault did not fire"

    written = Counter(pq.read_table(out / "embeddings", columns=["id"]).column("id").to_pylist())
    failed = Counter(pq.read_table(out / "failures", columns=["id"]).column("id").to_pylist())
    assert set(failed) == {ids[CORRUPT]}
    assert sorted((written + failed).elements()) == ids  # each id once, none lost
    assert max((written + failed).values()) == 1
    assert not (out / "_parts").exists()  # every part was merged and removed
    m = read_manifest(out)
    assert (m["rows_in"], m["rows_out"], m["rows_failed"]) == (N_IMAGES, N_IMAGES - 1, 1)
    assert m["shards"]["done"] == 5 and m["shards"]["incomplete"] == []
    emb = pq.read_table(out / "embeddings")
    np.testing.assert_allclose(  # the replayed batch was encoded and scored like the others
        emb.column("aesthetic").to_numpy(),
        np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))[:, 0] * 10, rtol=1e-5)
