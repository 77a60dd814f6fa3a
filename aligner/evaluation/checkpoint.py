"""Evaluate one checkpoint on the built-in world: held-out caption recall, paraphrases in unseen
words, content queries and the rephrasing premise (what ``jobs.pretrain`` reports)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from aligner.data.images import decode_batch

log = logging.getLogger(__name__)


def evaluate_checkpoint(ckpt: Path, world_dir: str, gallery: str = "test") -> dict:
    """Held-out recall, paraphrases and the rephrasing premise for one checkpoint.

    ``gallery``: ``test`` (the held-out images; fast) or ``all`` (the whole corpus, as a
    deployed system would search it; about 5x slower on CPU).
    """
    from aligner.evaluation.oracle import WorldEval
    from aligner.retrieval.models import load_checkpoint, to_pixels
    from aligner.world import World

    world = World(world_dir)
    r = load_checkpoint(ckpt, device="cpu")
    corpus = world.corpus(["id", "image", "caption"], split=None if gallery == "all" else "test")
    t0 = time.time()
    emb = []
    blobs = corpus["image"].to_pylist()
    for i in range(0, len(blobs), 1024):
        px = to_pixels(decode_batch(blobs[i:i + 1024]), r.preprocess_cfg["mean"],
                       r.preprocess_cfg["std"])
        emb.append(r.encode_images(px))
    ev = WorldEval(world, np.concatenate(emb), corpus["id"].to_pylist())
    log.info("embedded %d images for evaluation in %.1f s", len(blobs), time.time() - t0)
    captions = corpus["caption"].to_pylist()
    return {"gallery": gallery, "gallery_size": len(blobs),
            "caption_recall_test": ev.caption_recall(r.encode_texts, captions, "test"),
            "paraphrases": ev.content_hits(r.encode_texts, "paraphrase"),
            "content_queries": ev.content_hits(r.encode_texts, "content"),
            "premise": ev.premise(r.encode_texts, gallery_split=None)}


def embed_split(ckpt: str | Path, world_dir: str | Path, split: str = "test",
                batch: int = 1024) -> tuple[list[str], np.ndarray]:
    """``(ids, [N, D] embeddings)`` of one split's images (natural and gallery) under a
    checkpoint, in process."""
    from aligner.retrieval.models import load_checkpoint, to_pixels
    from aligner.world import World

    r = load_checkpoint(ckpt, device="cpu")
    t = World(world_dir).corpus(["id", "image"], split=split)
    blobs = t["image"].to_pylist()
    emb = [r.encode_images(to_pixels(decode_batch(blobs[i:i + batch]), r.preprocess_cfg["mean"],
                                      r.preprocess_cfg["std"]))
           for i in range(0, len(blobs), batch)]
    return t["id"].to_pylist(), np.concatenate(emb) if emb else np.zeros((0, 1), np.float32)


def primary_metrics(ckpt: str | Path, world_dir: str | Path, k: int = 10,
                    split: str = "test") -> dict[str, Any]:
    """The evaluation's primary measure and its guardrail for one checkpoint, per query.

    The ``split`` content queries search that split's images (the dense held-out gallery for
    ``test``); per query: ``ndcg@k`` with gain match x beauty (beauty min-max normalised over
    the gallery searched), ``beauty_relevant@k`` and ``precision@k``, exactly as
    :meth:`aligner.evaluation.oracle.WorldEval.graded` computes them for ``jobs.evaluate``
    (docs/evaluation.md, section 2). Returns ``{"query_ids": [...], "ndcg@k": [Q], ...}``.
    """
    from aligner.evaluation.oracle import WorldEval
    from aligner.retrieval.models import load_checkpoint
    from aligner.world import World

    world = World(world_dir)
    ids, emb = embed_split(ckpt, world_dir, split)
    ev = WorldEval(world, emb, ids)
    q = world.queries(split=split, kind="content")
    qids, texts = q["query_id"].to_pylist(), q["query"].to_pylist()
    r = load_checkpoint(ckpt, device="cpu")
    top = ev.query_topk(r.encode_texts, texts, k)
    return {"query_ids": qids, "gallery_size": len(ids),
            **{key: np.asarray(v, np.float64) for key, v in ev.graded(qids, top, k, None).items()
               if not key.startswith("aesthetic@")}}
