"""Text-to-image search over a faiss index: encode the query, search, fetch the images.

A :class:`Searcher` holds the index, the query encoder and the corpus location; the CLI
(``jobs/search.py``) and later the Serve deployments call it. By default the query encoder is
the model recorded in the index's manifest (the one that embedded the corpus), so query and
image vectors always come from the same model.
"""

from __future__ import annotations

import io
import logging
import tarfile
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
    model = (index.manifest.get("embeddings") or {}).get("model") or {}
    if not model:
        raise ValueError("the index manifest does not record the embedding model: "
                         "pass model.name / model.checkpoint explicitly")
    spec = ModelSpec(name=model.get("name") or "builtin", pretrained=model.get("pretrained"),
                     checkpoint=model.get("checkpoint"))
    if spec.name == "builtin" and not spec.checkpoint:  # sizes live in the spec, not a file
        spec.image_size = int(model.get("image_size") or spec.image_size)
        spec.embed_dim = int(model.get("embed_dim") or spec.embed_dim)
    return spec


def corpus_from_index(index: SearchIndex) -> str | None:
    """The corpus the index's embeddings were computed from (``None`` if unrecorded)."""
    return (index.manifest.get("embeddings") or {}).get("input")


def fetch_images(corpus: str, ids: Sequence[str]) -> dict[str, bytes]:
    """Encoded image bytes for ``ids`` from a corpus (Parquet, folder tree or WebDataset tars).

    Parquet: rows are selected with a pushed-down ``id`` filter (never the whole corpus);
    a ``uri`` column is fetched through pyarrow filesystems. Folder: the id is the path
    relative to the folder. WebDataset: tar members whose key is an id (a scan of the tars).
    Ids that cannot be found are left out of the result.
    """
    from aligner.data.corpus_shards import detect_format, resolve

    wanted = list(dict.fromkeys(i for i in ids if i))
    if not wanted:
        return {}
    fmt = detect_format(corpus)
    out: dict[str, bytes] = {}
    if fmt == "parquet":
        import pyarrow.dataset as ds

        fs, path = resolve(corpus)
        d = ds.dataset(path, filesystem=fs, format="parquet")
        cols = [c for c in ("id", "image", "uri") if c in d.schema.names]
        table = d.to_table(columns=cols, filter=ds.field("id").isin(wanted))
        for row in table.to_pylist():
            if row.get("image"):
                out[row["id"]] = row["image"]
            elif row.get("uri"):
                try:
                    ufs, upath = resolve(row["uri"])
                    with ufs.open_input_file(upath) as f:
                        out[row["id"]] = f.read()
                except OSError as e:
                    log.warning("cannot fetch %s: %s", row["uri"], e)
    elif fmt == "folder":
        fs, root = resolve(corpus)
        for i in wanted:
            try:
                with fs.open_input_file(f"{root.rstrip('/')}/{i}") as f:
                    out[i] = f.read()
            except OSError as e:
                log.warning("cannot read %s/%s: %s", corpus, i, e)
    else:
        from aligner.data.corpus_shards import plan_webdataset, split_key

        want = set(wanted)
        fs, _ = resolve(corpus)
        for shard in plan_webdataset(corpus):
            with fs.open_input_file(shard.paths[0]) as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
                for member in tar:
                    key, ext = split_key(member.name)
                    if key in want and ext in ("jpg", "jpeg", "png", "webp") and key not in out:
                        f = tar.extractfile(member)
                        if f is not None:
                            out[key] = f.read()
            if len(out) == len(want):
                break
    return out


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
        return fetch_images(self.corpus, [h.id for h in hits])


def hits_to_items(hits: Sequence[Hit], images: dict[str, bytes]) -> list[dict[str, Any]]:
    """Hits as grid items for :mod:`aligner.runtime.grids`."""
    return [{"image": images.get(h.id), "id": h.id, "score": h.score, "aesthetic": h.aesthetic,
             "caption": h.caption, "label": f"#{h.rank} {h.id}"} for h in hits]


def decode(data: bytes):
    """Bytes -> PIL image (for grids)."""
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")
