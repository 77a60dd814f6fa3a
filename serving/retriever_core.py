"""The retriever's work without Ray Serve: one model, its indexes and its query cache.

:class:`RetrieverCore` encodes query texts (through a :class:`serving.query_cache.QueryCache`)
and searches the model's indexes, returning plain JSON-ready dicts or an error value
(``{"error": {"status": ..., "detail": ...}}``) for an expected failure. Two places run it:

* the ``Retriever`` deployment (:mod:`serving.deployments`), one per model, which adds
  ``@serve.batch`` batching and image queries;
* the ingress itself for plain text searches when ``speed.local_text_search`` is on (one Serve
  hop per search instead of two; docs/serving.md has the measurements).

Every step records its time in the ``aligner_step_ms`` histogram (tag ``step``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from ray.serve.metrics import Histogram

from serving.query_cache import QueryCache

STEP_MS_BOUNDARIES = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


def step_histogram() -> Histogram:
    """``aligner_step_ms{step=...}``: milliseconds per step of a request."""
    return Histogram("aligner_step_ms", description="milliseconds per step of a request",
                     boundaries=STEP_MS_BOUNDARIES, tag_keys=("step",))


def error(status: int, detail: str) -> dict[str, Any]:
    """The error value a deployment returns for an expected failure."""
    return {"error": {"status": status, "detail": detail}}


class Timed:
    """Records ``aligner_step_ms`` for a step."""

    def __init__(self, hist: Histogram, step: str) -> None:
        self.hist, self.step = hist, step

    def __enter__(self) -> Timed:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.ms = 1000 * (time.perf_counter() - self.t0)
        self.hist.observe(self.ms, tags={"step": self.step})


class RetrieverCore:
    """One model and its indexes (see the module docstring).

    Args:
        name: the model's name in the API (``base``, ``aligned``).
        model: :class:`serving.config.ModelArgs` as a dict.
        max_image_pixels: bigger query images are refused.
        remote: index name -> a :class:`aligner.retrieval.index.RemoteShardsIndex` (sharded
            indexes searched in other deployments).
        speed: :class:`serving.config.SpeedArgs` as a dict (query cache, threads).
    """

    def __init__(self, name: str, model: dict[str, Any], max_image_pixels: int,
                 remote: dict[str, Any] | None = None,
                 speed: dict[str, Any] | None = None) -> None:
        from aligner.retrieval.models import ModelSpec
        from aligner.retrieval.service import SearchService

        spec = ModelSpec(name=model.get("name") or "builtin", pretrained=model.get("pretrained"),
                         checkpoint=model.get("checkpoint"))
        self.name = name
        self.service = SearchService.open(spec, model["indexes"], max_image_pixels,
                                          mmap=model.get("mmap", False),
                                          nprobe=model.get("nprobe"),
                                          ef_search=model.get("ef_search"),
                                          k_factor=model.get("k_factor"), remote=remote or {})
        self.hist = step_histogram()
        speed = speed or {}
        self._threads(int(speed.get("torch_threads", 1)))
        self.cache = QueryCache(int(speed.get("text_cache", 0)))

    @staticmethod
    def _threads(n: int) -> None:
        """torch and faiss threads (Ray sets ``OMP_NUM_THREADS`` from the replica's CPUs)."""
        import faiss
        import torch

        torch.set_num_threads(n)
        faiss.omp_set_num_threads(n)

    def encode_cached(self, texts: list[str]) -> np.ndarray:
        """``[B, D]`` vectors of query texts (cached ones from the query cache)."""
        return self.cache.encode(texts, self.service.encode_texts)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.service.dim, **self.service.describe(),
                "query_cache": self.cache.stats()}

    def text_queries(self, items: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Text searches: one forward pass for every text not cached, then each one's
        search (``items``: (text, keyword arguments of :meth:`search_now`))."""
        with Timed(self.hist, "encode_text") as t:
            vecs = self.encode_cached([text for text, _ in items])
        outs = [self.search_now(v, **kw) for v, (_, kw) in zip(vecs, items, strict=True)]
        for out in outs:
            if "timings_ms" in out:
                out["timings_ms"]["encode"] = t.ms
        return outs

    def search_now(self, vector: np.ndarray, k: int, index: str | None,
                    aesthetic_weight: float, dedup_threshold: float | None,
                    page: tuple[int, int] | None, nprobe: int | None = None,
                    k_factor: float | None = None) -> dict[str, Any]:
        try:
            with Timed(self.hist, "knn"):
                r = self.service.search(np.asarray(vector, np.float32), k, index,
                                        aesthetic_weight, dedup_threshold, nprobe=nprobe,
                                        k_factor=k_factor)
            idx = self.service.index(index)
            aes = idx.table.column("aesthetic").take(r.positions).to_numpy(zero_copy_only=False)
            out: dict[str, Any] = {
                "index": index or self.service.default_index, "ids": r.ids,
                "scores": r.scores.tolist(),
                "aesthetic": [None if not np.isfinite(a) else float(a) for a in aes],
                "removed": len(r.removed), "timings_ms": dict(r.timings_ms)}
            if "dedup" in r.timings_ms:
                self.hist.observe(r.timings_ms["dedup"], tags={"step": "dedup"})
            if page is not None:
                with Timed(self.hist, "metadata") as t:
                    lo, size = page
                    out["rows"] = self.service.rows(r.positions[lo:lo + size], index)
                out["timings_ms"]["metadata"] = t.ms
            return out
        except KeyError as e:
            return error(400, str(e).strip("'\""))
        except ValueError as e:
            return error(422, str(e))

    def metadata(self, ids: list[str], index: str | None = None) -> Any:
        """Rows for ids (None for an unknown id), or an error value."""
        try:
            with Timed(self.hist, "metadata"):
                return self.service.metadata(ids, index)
        except KeyError as e:
            return error(400, str(e).strip("'\""))

    def view(self, query: list[float], ids: list[str], index: str | None = None) -> Any:
        """What a judge sees of a row: each image's similarity to the query, its aesthetic
        score and its vector; or an error value."""
        try:
            idx = self.service.index(index)
        except KeyError as e:
            return error(400, str(e).strip("'\""))
        pos = idx.positions_of(ids)
        if (pos < 0).any():
            return error(400, f"unknown ids {[i for i, p in zip(ids, pos, strict=True) if p < 0][:5]}")
        vecs = idx.vectors_at(pos)
        if vecs is None:
            return error(422, "this index cannot return its vectors")
        aes = idx.table.column("aesthetic").take(pos).to_numpy(zero_copy_only=False)
        return {"similarity": (vecs @ np.asarray(query, np.float32)).tolist(),
                "aesthetic": aes.astype(np.float64).tolist(), "vectors": vecs.tolist()}
