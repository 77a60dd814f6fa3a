"""Evaluate one checkpoint on the built-in world: held-out caption recall, paraphrases in unseen
words, content queries and the rephrasing premise (what ``jobs.pretrain`` reports)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

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
