"""Candidate pools (step 1 of building pairs): each query's top K images, with their
embeddings and scorer values. Both kinds take ``allowed`` ids: images outside it (held-out
evaluation images) are never candidates, so they never reach a preferences table.

:class:`MatrixCandidates` searches an in-memory embedding matrix exactly;
:class:`IndexCandidates` searches a faiss index (corpora too large for memory) and reads the
candidates' exact vectors back from the embeddings, so the teacher's scores are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


class Candidates(NamedTuple):
    """Top-k retrieval results for a batch of queries.

    Attributes:
        ids: ``Q`` lists of up to ``k`` ids, best first.
        embeddings: ``Q`` arrays ``[k_q, D]`` of the candidates' image embeddings.
        aesthetic: ``Q`` arrays ``[k_q]`` of their pixel-scorer values (NaN if unknown).
    """

    ids: list[list[str]]
    embeddings: list[np.ndarray]
    aesthetic: list[np.ndarray]


class MatrixCandidates:
    """Exact cosine top-k over an in-memory ``[N, D]`` matrix (``aligner.retrieval.metrics.topk``).

    Args:
        ids: ``N`` image ids.
        matrix: ``[N, D]`` normalised float32 embeddings.
        aesthetic: ``[N]`` scorer values (None: NaN).
        chunk: queries scored at once (memory ``chunk x N`` floats).
    """

    def __init__(self, ids: Sequence[str], matrix: np.ndarray, aesthetic: np.ndarray | None = None,
                 chunk: int = 256) -> None:
        self.ids = list(ids)
        self.matrix = np.asarray(matrix, np.float32)
        self.aesthetic = (np.full(len(self.ids), np.nan, np.float32) if aesthetic is None
                          else np.asarray(aesthetic, np.float32))
        if not (len(self.ids) == len(self.matrix) == len(self.aesthetic)):
            raise ValueError("ids, matrix and aesthetic differ in length")
        self.chunk = chunk

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def search(self, vectors: np.ndarray, k: int) -> Candidates:
        from aligner.retrieval.metrics import topk

        ids, emb, aes = [], [], []
        for lo in range(0, len(vectors), self.chunk):
            _, idx = topk(np.asarray(vectors[lo:lo + self.chunk], np.float32), self.matrix, k)
            for row in idx:
                ids.append([self.ids[i] for i in row])
                emb.append(self.matrix[row])
                aes.append(self.aesthetic[row])
        return Candidates(ids, emb, aes)

    @classmethod
    def from_embeddings(cls, embeddings_dir: str | Path,
                        allowed: set[str] | None = None) -> MatrixCandidates:
        """Load an embed job's output (``id``, ``embedding``, ``aesthetic``) into memory;
        with ``allowed``, only those ids (the rest can never be a candidate)."""
        import pyarrow as pa

        from aligner.data.embeddings import embedding_matrix, read_embeddings

        t = read_embeddings(embeddings_dir, ["id", "embedding", "aesthetic"])
        if allowed is not None:
            keep = np.fromiter((i in allowed for i in t.column("id").to_pylist()), bool,
                               t.num_rows)
            t = t.filter(pa.array(keep))
        if t.num_rows == 0:
            raise ValueError(f"no candidate images left in {embeddings_dir} (pool splits?)")
        aes = t.column("aesthetic").to_numpy(zero_copy_only=False).astype(np.float32)
        return cls(t.column("id").to_pylist(), embedding_matrix(t), aes)


class IndexCandidates:
    """Top-k from a faiss index (:class:`aligner.retrieval.index.SearchIndex`), for corpora too large to
    hold in memory. The candidates' exact embeddings and scorer values are then read from the
    embeddings directory with a pushed-down ``id`` filter (an IVF-PQ index only stores
    approximate vectors), so semantic and teacher scores are exact.
    """

    def __init__(self, index: Any, embeddings_dir: str | Path,
                 allowed: set[str] | None = None) -> None:
        from aligner.data.io import shown_path

        self.index = index
        self.embeddings_dir = shown_path(embeddings_dir)  # a local Path or a URI
        self.allowed = allowed

    @property
    def dim(self) -> int:
        return int(self.index.dim)

    def _lookup(self, ids: set[str]) -> dict[str, tuple[np.ndarray, float]]:
        from aligner.data.embeddings import embedding_matrix, lookup_embeddings

        t = lookup_embeddings(self.embeddings_dir, sorted(ids))
        m = embedding_matrix(t)
        a = t.column("aesthetic").to_numpy(zero_copy_only=False).astype(np.float32)
        return {i: (m[r], float(a[r])) for r, i in enumerate(t.column("id").to_pylist())}

    def _search_ids(self, vectors: np.ndarray, k: int) -> list[list[str]]:
        """Each query's top ``k`` ids among the allowed ones: the index is searched wider
        (by the share of allowed ids) and widened again while a row comes up short."""
        total = int(self.index.ntotal)
        if self.allowed is None:
            rows = self.index.search(vectors, k).ids
            return [[i for i in row if i is not None] for row in rows]
        n = min(total, int(np.ceil(k * total / max(1, len(self.allowed)) * 1.3)) + 10)
        while True:
            rows = [[i for i in row if i is not None and i in self.allowed][:k]
                    for row in self.index.search(vectors, n).ids]
            if n >= total or all(len(r) >= k for r in rows):
                return rows
            n = min(total, 2 * n)

    def search(self, vectors: np.ndarray, k: int) -> Candidates:
        rows = self._search_ids(np.asarray(vectors, np.float32), k)
        found = self._lookup({i for row in rows for i in row})
        ids, emb, aes = [], [], []
        for row in rows:
            keep = [i for i in row if i in found]
            ids.append(keep)
            emb.append(np.stack([found[i][0] for i in keep]) if keep
                       else np.zeros((0, self.dim), np.float32))
            aes.append(np.array([found[i][1] for i in keep], np.float32))
        return Candidates(ids, emb, aes)


