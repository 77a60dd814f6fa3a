"""The gallery every system searches, the held-out queries, and the gallery's embeddings.

A :class:`Gallery` is the built-in world's corpus or any Parquet corpus with image bytes
(:func:`load_gallery`), the same ids in the same order for every system. Its embeddings come
from a ``jobs.embed`` output when that matches the model (:func:`read_gallery_embeddings`),
else from the model in-process (:func:`embed_gallery`). Tables are read only through
:mod:`aligner.data` (corpus, queries, embeddings); images are decoded by
:func:`aligner.data.images.decode_rgb`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

    from aligner.retrieval.models import Retriever

log = logging.getLogger(__name__)

GALLERIES = ("all", "test")
#: What each gallery means, in every output that names it.
GALLERY_VIEWS = {"test": "held out: test-split images no model trained on (choices are made "
                         "on the val-split images)",
                 "all": "deployment view: the whole corpus, training images included"}
#: The splits ``load_gallery(which="test")`` loads: the held-out test gallery every result is
#: reported on, and the val gallery every choice is made on (``docs/evaluation.md`` §1, §3).
HELD_OUT_SPLITS = ("test", "val")


@dataclass
class Gallery:
    """The images every system searches (same ids, same order for all).

    Attributes:
        ids: image ids.
        images: encoded image bytes, one per id.
        captions: captions (None: the corpus has none).
        split: ``[N]`` split names (None: the corpus has none).
        source: where the gallery came from (``world DIR`` / ``corpus PATH``).
    """

    ids: list[str]
    images: list[bytes]
    captions: list[str] | None
    split: np.ndarray | None
    source: str
    _decoded: list[np.ndarray] | None = None

    def decoded(self) -> list[np.ndarray]:
        """``[H, W, 3]`` uint8 per image (decoded once, on first use)."""
        if self._decoded is None:
            from aligner.data.images import decode_rgb

            t0 = time.time()
            self._decoded = [decode_rgb(b) for b in self.images]
            log.info("decoded %d gallery images in %.1f s", len(self.images), time.time() - t0)
        return self._decoded

    def has_split(self, split: str) -> bool:
        return self.split is not None and bool((self.split == split).any())

    def indices(self, split: str | None) -> np.ndarray:
        """Gallery indices of one split (``None``: every image)."""
        if split is None:
            return np.arange(len(self.ids))
        if self.split is None:
            raise ValueError(f"the gallery ({self.source}) has no split column")
        return np.flatnonzero(self.split == split)

    def recall_split(self) -> tuple[np.ndarray, str]:
        """Gallery indices recall is measured among: the test split, else every image."""
        if self.split is not None and (self.split == "test").any():
            return np.flatnonzero(self.split == "test"), "test split"
        return np.arange(len(self.ids)), "whole gallery (no test split)"


def _image_bytes(col: pa.ChunkedArray) -> list[bytes]:
    """Encoded bytes of an ``image`` column (binary, or a Hugging Face ``{bytes, path}``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_struct(col.type):
        col = pc.struct_field(col, "bytes")
    return col.to_pylist()


def _only_splits(t: pa.Table, splits: tuple[str, ...]) -> pa.Table:
    import pyarrow as pa
    import pyarrow.compute as pc

    return t.filter(pc.is_in(t["split"], value_set=pa.array(list(splits))))


def load_gallery(world: str | Path | None = None, corpus: str | Path | None = None,
                 which: str = "all") -> Gallery:
    """The gallery: the built-in world's corpus (``world`` dir) or a Parquet ``corpus``
    (wins when both are given).

    Args:
        world: a world directory (``jobs.make_world`` output).
        corpus: a Parquet corpus with ``id`` and ``image`` bytes (``caption``, ``split``
            optional).
        which: ``all`` (every image, as a deployed search would) or ``test`` (the test split,
            which held-out results are reported on, plus the val split, which choices are made
            on; a corpus without a split column keeps every image).

    Raises:
        FileNotFoundError: no world / corpus there.
        ValueError: an unknown ``which``, neither source given, or a corpus without image
            bytes (a ``uri`` corpus must be embedded first: pass its embeddings).
    """
    from aligner.data.corpus import corpus_columns, read_corpus

    if which not in GALLERIES:
        raise ValueError(f"gallery must be one of {list(GALLERIES)}, not {which!r}")
    if not corpus:
        if not world:
            raise ValueError("load_gallery needs a world directory or a corpus")
        from aligner.world import World

        t = World(world).corpus(["id", "image", "caption", "split"])
        if which == "test":
            t = _only_splits(t, HELD_OUT_SPLITS)
        return Gallery(t["id"].to_pylist(), _image_bytes(t["image"]), t["caption"].to_pylist(),
                       np.asarray(t["split"].to_pylist()), f"world {world}")
    have = corpus_columns(corpus)
    if "image" not in have:
        raise ValueError(f"corpus {corpus} needs columns id and image (encoded bytes); it has "
                         f"{have} (for uri corpora, run jobs.embed and pass embeddings)")
    cols = [c for c in ("id", "image", "caption", "split") if c in have]
    has_split = "split" in have
    t = read_corpus(corpus, cols)
    if which == "test" and has_split:
        t = _only_splits(t, HELD_OUT_SPLITS)
    split = np.asarray(t["split"].to_pylist()) if has_split else None
    caps = t["caption"].to_pylist() if "caption" in have else None
    return Gallery(t["id"].to_pylist(), _image_bytes(t["image"]), caps, split,
                   f"corpus {corpus}")


def load_queries(world: str | Path | None = None, queries: str | Path | None = None,
                 split: str = "test", kind: str = "content") -> tuple[list[str], list[str]]:
    """(query ids, texts) of the held-out queries: the world's, or a queries table's
    (``queries`` wins; its ``split`` / ``kind`` filters apply only where it has the column).

    Raises:
        FileNotFoundError: no queries there.
        ValueError: no query left after the filters, or not a queries table.
    """
    from aligner.data.queries import filter_queries, read_queries

    if queries:
        q = read_queries(queries)
        q = filter_queries(q, [split] if split and "split" in q.column_names else [],
                           [kind] if kind and "kind" in q.column_names else [],
                           where=f"queries {queries}")
    elif world:
        from aligner.world import World

        q = World(world).queries(split=split or None, kind=kind or None)
    else:
        raise ValueError("load_queries needs a world directory or a queries table")
    if q.num_rows == 0:
        raise ValueError(f"no queries with split={split!r} kind={kind!r}")
    return q["query_id"].to_pylist(), q["query"].to_pylist()


def embed_gallery(retriever: Retriever, gallery: Gallery, batch_size: int = 256) -> np.ndarray:
    """Embed every gallery image in-process (decoded once; the model's eval transform)."""
    import torch

    from aligner.retrieval.models import to_pixels

    ims = gallery.decoded()
    size = retriever.image_size
    same = all(im.shape == (size, size, 3) for im in ims)
    pre = retriever.preprocess_cfg
    out = []
    step = max(batch_size, 512)
    for i in range(0, len(ims), step):
        if same and "mean" in pre:  # fast path (the built-in world): no PIL round trip
            px = to_pixels(np.stack(ims[i:i + step]), pre["mean"], pre["std"])
        else:
            from PIL import Image

            px = torch.stack([retriever.preprocess(Image.fromarray(im)) for im in ims[i:i + step]])
        out.append(retriever.encode_images(px, batch_size))
    return np.concatenate(out) if out else np.zeros((0, retriever.embed_dim), np.float32)


def _made_by(emb_dir: str | Path) -> tuple[str | None, str | None]:
    """(checkpoint hash, scorer name) an embed output's manifest records (None: unknown)."""
    from aligner.data.embeddings import model_record
    from aligner.runtime.manifest import read_manifest

    try:
        return model_record(emb_dir).get("checkpoint_hash"), \
            (read_manifest(emb_dir).get("scorer") or {}).get("name")
    except FileNotFoundError:
        return None, None


def read_gallery_embeddings(emb_dir: str | Path, ids: list[str], checkpoint_hash: str | None,
                            scorer: str) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Precomputed embeddings in gallery order, the scorer's scores, and why not (if None).

    Args:
        emb_dir: a ``jobs.embed`` output (or a directory of embeddings Parquet files).
        ids: the gallery's ids, in order.
        checkpoint_hash: the model's; embeddings its manifest says another checkpoint made
            are refused.
        scorer: the scorer's name; the ``aesthetic`` column is used only when the manifest
            says this scorer wrote it.

    Returns:
        ``(embeddings [N, D] or None, scores [N] or None, reason for None or "")``.
    """
    from aligner.data.embeddings import embedding_matrix, read_embeddings

    made_by, scored_by = _made_by(emb_dir)
    if made_by and checkpoint_hash and made_by != checkpoint_hash:
        return None, None, f"made by checkpoint {made_by}, not {checkpoint_hash}"
    t = read_embeddings(emb_dir, columns=None)
    pos = {i: k for k, i in enumerate(t["id"].to_pylist())}
    missing = [i for i in ids if i not in pos]
    if missing:
        return None, None, f"{len(missing)} gallery ids missing (e.g. {missing[:3]})"
    order = np.array([pos[i] for i in ids], np.int64)
    emb = embedding_matrix(t)[order]
    aes = None
    if "aesthetic" in t.column_names and scored_by == scorer:
        aes = np.asarray(t["aesthetic"].to_numpy(zero_copy_only=False), np.float64)[order]
    return emb, aes, ""
