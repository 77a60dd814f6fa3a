"""A model and its indexes, answering search requests: what a serving replica runs.

:class:`SearchService` holds one retriever (the query encoder) and one or more named faiss
indexes built from that model's embeddings. It turns a request's text, image bytes or raw
embedding into one query vector (weighted and normalised), searches an index for the top
``k``, and can:

* shift the query towards the aesthetic direction (clip-retrieval's ``aesthetic_weight``:
  ``q' = normalise(q + w e)``, ``e`` the mean vector of the images the scorer rates in the top
  10%, computed once per index);
* remove near-duplicates (a result whose stored vector has cosine >= ``threshold`` with a
  better-ranked kept result is dropped, and the search is widened so ``k`` remain when the
  index holds enough);
* return metadata (id, aesthetic, caption) for any positions or ids.

No Ray Serve and no HTTP here: ``serving/`` wraps it in deployments, and a test compares the
HTTP answers with this class's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aligner.data.images import DEFAULT_MAX_PIXELS, decode_image
from aligner.retrieval.index import SearchIndex
from aligner.retrieval.metrics import aesthetic_direction, normalise
from aligner.retrieval.models import ModelSpec, Retriever, load_retriever

log = logging.getLogger(__name__)


@dataclass
class Ranked:
    """One query's results, best first.

    Attributes:
        positions: ``[n]`` rows of the index's ``ids.parquet``.
        ids: the image ids.
        scores: ``[n]`` cosine similarities to the (possibly shifted) query.
        removed: near-duplicates dropped (positions), when deduplication was asked for.
        timings_ms: time per step (``knn``, ``dedup``).
    """

    positions: np.ndarray
    ids: list[str]
    scores: np.ndarray
    removed: list[int] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)


class SearchService:
    """One retriever and its named indexes (see the module docstring).

    Args:
        retriever: the query encoder (the model that embedded the indexed corpus).
        indexes: name -> loaded index; the first is the default.
        max_image_pixels: images over this size are refused (decompression bombs).
    """

    def __init__(self, retriever: Retriever, indexes: dict[str, SearchIndex],
                 max_image_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if not indexes:
            raise ValueError("a search service needs at least one index")
        for name, index in indexes.items():
            if index.dim != retriever.embed_dim:
                raise ValueError(f"index {name!r} holds {index.dim}-dim vectors but the model "
                                 f"embeds into {retriever.embed_dim}: use the model that "
                                 "embedded the corpus")
        self.retriever = retriever
        self.indexes = indexes
        self.default_index = next(iter(indexes))
        self.max_image_pixels = max_image_pixels
        self._directions: dict[str, np.ndarray | None] = {}

    @classmethod
    def open(cls, model: ModelSpec, index_dirs: dict[str, str | Path],
             max_image_pixels: int = DEFAULT_MAX_PIXELS, mmap: bool = False,
             nprobe: int | None = None, ef_search: int | None = None,
             k_factor: float | None = None,
             remote: dict[str, SearchIndex] | None = None) -> SearchService:
        """Load the model and every named index (on CPU unless CUDA is present).

        ``nprobe``, ``ef_search`` and ``k_factor`` become the indexes' defaults (each index
        keeps the parameters it does not have unset). ``remote`` holds indexes already open
        elsewhere (a :class:`aligner.retrieval.index.RemoteShardsIndex` over shard replicas)
        by name; they take the place of the directory of the same name.
        """
        t0 = time.time()
        retriever = load_retriever(model)
        remote = remote or {}
        indexes = {name: remote[name] if name in remote else
                   SearchIndex.load(path, mmap=mmap, nprobe=nprobe, ef_search=ef_search,
                                    k_factor=k_factor)
                   for name, path in index_dirs.items()}
        log.info("search service: %s with indexes %s loaded in %.1f s", retriever.describe(),
                 {n: i.ntotal for n, i in indexes.items()}, time.time() - t0)
        return cls(retriever, indexes, max_image_pixels)

    @property
    def dim(self) -> int:
        return self.retriever.embed_dim

    def index(self, name: str | None) -> SearchIndex:
        """A named index (the default for None).

        Raises:
            KeyError: an unknown name (the message lists the known ones).
        """
        name = name or self.default_index
        if name not in self.indexes:
            raise KeyError(f"unknown index {name!r}; this model has {sorted(self.indexes)}")
        return self.indexes[name]

    def describe(self) -> dict[str, Any]:
        """The model and its indexes (what ``/v1/indexes`` lists)."""
        return {"model": self.retriever.describe(), "default_index": self.default_index,
                "indexes": {n: {"vectors": i.ntotal, "dim": i.dim,
                                "factory": i.manifest.get("factory"),
                                "shards": len(i.shard_numbers)}
                            for n, i in self.indexes.items()}}

    # ------------------------------------------------------------------------------- encoding

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``[B, D]`` normalised text vectors."""
        return self.retriever.encode_texts(list(texts))

    def encode_images(self, blobs: Sequence[bytes]) -> np.ndarray:
        """``[B, D]`` normalised image vectors from encoded image bytes.

        Raises:
            aligner.data.images.ImageError: an image that cannot be decoded or is too large.
        """
        ims = [decode_image(b, self.max_image_pixels) for b in blobs]
        return self.retriever.encode_pil(ims) if ims else np.zeros((0, self.dim), np.float32)

    def query_vector(self, text: np.ndarray | None = None, image: np.ndarray | None = None,
                     embedding: Sequence[float] | None = None, text_weight: float = 1.0,
                     image_weight: float = 1.0) -> np.ndarray:
        """One normalised ``[D]`` query: a raw embedding as given (normalised), else the
        weighted sum of the text and image vectors.

        Raises:
            ValueError: nothing to search with, a wrong embedding size, non-finite values or
                weights that cancel out.
        """
        if embedding is not None:
            q = np.asarray(embedding, np.float32).reshape(-1)
            if q.shape[0] != self.dim:
                raise ValueError(f"embedding has {q.shape[0]} values, the model's are {self.dim}")
        else:
            parts = [w * np.asarray(v, np.float32).reshape(-1)
                     for v, w in ((text, text_weight), (image, image_weight)) if v is not None]
            if not parts:
                raise ValueError("nothing to search with: give text, an image or an embedding")
            q = np.sum(parts, axis=0)
        if not np.isfinite(q).all():
            raise ValueError("the query vector holds NaN or inf")
        if np.linalg.norm(q) < 1e-8:
            raise ValueError("the query vector is zero (do the weights cancel out?)")
        return normalise(q[None, :])[0]

    # ------------------------------------------------------------------------------- search

    def direction(self, index: str | None = None, quantile: float = 0.1) -> np.ndarray:
        """The aesthetic direction of an index (computed once from its stored vectors).

        Raises:
            ValueError: the index cannot return its vectors or holds no aesthetic scores.
        """
        name = index or self.default_index
        if name not in self._directions:
            idx = self.index(name)
            aes = idx.table.column("aesthetic").to_numpy(zero_copy_only=False)
            finite = np.isfinite(aes.astype(np.float64))
            if not finite.any():
                self._directions[name] = None
            else:
                cut = np.quantile(aes[finite], 1.0 - quantile)
                top = np.flatnonzero(finite & (aes >= cut))
                vecs = idx.vectors_at(top)
                self._directions[name] = (None if vecs is None else
                                          aesthetic_direction(vecs, aes[top], 1.0))
        d = self._directions[name]
        if d is None:
            raise ValueError(f"index {name!r} cannot give an aesthetic direction (no aesthetic "
                             "scores, or its vectors cannot be reconstructed)")
        return d

    def search(self, query: np.ndarray, k: int, index: str | None = None,
               aesthetic_weight: float = 0.0, dedup_threshold: float | None = None,
               nprobe: int | None = None, k_factor: float | None = None,
               ef_search: int | None = None) -> Ranked:
        """The top ``k`` for one ``[D]`` query vector; ``nprobe``, ``k_factor`` and
        ``ef_search`` apply to this search only (None: the index's own settings).

        Raises:
            KeyError: an unknown index. ValueError: a bad ``k`` or query, or a shift / dedup
            the index cannot do.
        """
        idx = self.index(index)
        q = np.asarray(query, np.float32).reshape(-1)
        if aesthetic_weight:
            q = normalise(q + aesthetic_weight * self.direction(index))
        k = max(1, min(int(k), idx.ntotal))
        widen = dedup_threshold is not None
        n = min(idx.ntotal, 2 * k + 10) if widen else k
        knn = dedup_ms = 0.0
        while True:  # with deduplication: widen until k results remain or the index is spent
            t0 = time.perf_counter()
            res = idx.search(q[None, :], n, nprobe=nprobe, ef_search=ef_search,
                             k_factor=k_factor)
            knn += 1000 * (time.perf_counter() - t0)
            pos, scores = res.positions[0], res.scores[0]
            keep = pos >= 0
            pos, scores = pos[keep], scores[keep]
            removed: list[int] = []
            if not widen:
                break
            t1 = time.perf_counter()
            pos, scores, removed = self._dedup(idx, pos, scores, float(dedup_threshold), k)
            dedup_ms += 1000 * (time.perf_counter() - t1)
            if len(pos) >= k or n >= idx.ntotal:
                break
            n = min(idx.ntotal, 4 * n)
        pos, scores = pos[:k], scores[:k]
        ids = [i for row in idx.ids_at(pos[None, :]) for i in row]
        timings = {"knn": knn} | ({"dedup": dedup_ms} if widen else {})
        return Ranked(pos, ids, scores, removed, timings)

    @staticmethod
    def _dedup(idx: SearchIndex, pos: np.ndarray, scores: np.ndarray, threshold: float,
               k: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        vecs = idx.vectors_at(pos)
        if vecs is None:
            raise ValueError("this index cannot reconstruct its vectors: no deduplication")
        vecs = normalise(vecs)
        kept: list[int] = []
        removed: list[int] = []
        for i in range(len(pos)):
            if kept and float((vecs[kept] @ vecs[i]).max()) >= threshold:
                removed.append(int(pos[i]))
                continue
            kept.append(i)
            if len(kept) == k:
                break
        return pos[kept], scores[kept], removed

    def rows(self, positions: Sequence[int], index: str | None = None) -> list[dict[str, Any]]:
        """``ids.parquet`` rows (id, aesthetic, caption) at positions; NaN aesthetic -> None."""
        rows = self.index(index).rows_at(positions)
        for r in rows:
            a = r.get("aesthetic")
            r["aesthetic"] = None if a is None or not np.isfinite(a) else float(a)
        return rows

    def metadata(self, ids: Sequence[str], index: str | None = None) -> list[dict[str, Any] | None]:
        """Rows for ids (None for an id the index does not hold), in the given order."""
        pos = self.index(index).positions_of(ids)
        found = self.rows([p for p in pos if p >= 0], index)
        it = iter(found)
        return [next(it) if p >= 0 else None for p in pos]
