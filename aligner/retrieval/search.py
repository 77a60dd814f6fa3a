"""Text-to-image search over a faiss index: encode the query, search, fetch the images.

A :class:`Searcher` holds the index, the query encoder and the corpus location; the CLI
(``jobs/search.py``) and later the Serve deployments call it. By default the query encoder is
the model recorded in the index's manifest (the one that embedded the corpus), so query and
image vectors always come from the same model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aligner.retrieval.index import SearchIndex
from aligner.retrieval.models import ModelSpec, Retriever, load_retriever

log = logging.getLogger(__name__)


@dataclass
class Hit:
    """One search result."""

    rank: int
    id: str
    score: float
    aesthetic: float | None
    caption: str


def spec_from_index(index: SearchIndex) -> ModelSpec:
    """The model that embedded the index's corpus, from the index manifest."""
    return ModelSpec.from_record((index.manifest.get("embeddings") or {}).get("model") or {},
                                 "the index manifest")


def corpus_from_index(index: SearchIndex) -> str | None:
    """The corpus the index's embeddings were computed from (``None`` if unrecorded)."""
    return (index.manifest.get("embeddings") or {}).get("input")


class Searcher:
    """Index + query encoder + corpus: ``search(texts, k)`` returns ranked hits.

    Args:
        index: a loaded :class:`SearchIndex`.
        retriever: the query encoder (default: the model in the index manifest).
        corpus: where images live (default: the corpus recorded in the manifest).
    """

    def __init__(self, index: SearchIndex, retriever: Retriever | None = None,
                 corpus: str | None = None) -> None:
        self.index = index
        self.retriever = retriever or load_retriever(spec_from_index(index))
        if self.retriever.embed_dim != index.dim:
            raise ValueError(f"the query model embeds into {self.retriever.embed_dim} dims but "
                             f"the index holds {index.dim}-dim vectors: use the model that "
                             "embedded the corpus")
        self.corpus = corpus or corpus_from_index(index)

    @classmethod
    def open(cls, index_dir: str | Path, model: ModelSpec | None = None,
             corpus: str | None = None, nprobe: int | None = None,
             ef_search: int | None = None) -> Searcher:
        index = SearchIndex.load(index_dir, nprobe=nprobe, ef_search=ef_search)
        return cls(index, load_retriever(model) if model else None, corpus)

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Ranked hits for ``[B, D]`` normalised query vectors."""
        res = self.index.search(queries, k)
        out = []
        for b in range(len(res.ids)):
            pos = res.positions[b]
            rows = self.index.rows_at(pos[pos >= 0])
            hits = []
            for r, (row, score) in enumerate(zip(rows, res.scores[b][pos >= 0], strict=True)):
                aest = row.get("aesthetic")
                hits.append(Hit(r + 1, row["id"], float(score),
                                None if aest is None or np.isnan(aest) else float(aest),
                                row.get("caption") or ""))
            out.append(hits)
        return out

    def search(self, texts: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Ranked hits for each query text.

        Raises:
            ValueError: an empty query.
        """
        texts = [t.strip() for t in texts]
        if not texts or any(not t for t in texts):
            raise ValueError("queries must be non-empty text")
        return self.search_vectors(self.retriever.encode_texts(texts), k)

    def images(self, hits: Sequence[Hit]) -> dict[str, bytes]:
        """The encoded images of some hits ({} when the corpus is unknown)."""
        if not self.corpus:
            return {}
        from aligner.data.corpus import fetch_images

        return fetch_images(self.corpus, [h.id for h in hits])


def hits_to_items(hits: Sequence[Hit], images: dict[str, bytes]) -> list[dict[str, Any]]:
    """Hits as grid items for :mod:`aligner.runtime.grids`."""
    return [{"image": images.get(h.id), "id": h.id, "score": h.score, "aesthetic": h.aesthetic,
             "caption": h.caption, "label": f"#{h.rank} {h.id}"} for h in hits]



