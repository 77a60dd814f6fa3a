"""Driver-side preparation of a reward model's training data (everything frozen, computed once).

Reads a preferences table (simulated-rater votes, page votes, LMM labels: any table in the
preferences contract), splits its pairs by the query's split (the queries table, else a seeded
hash), drops pairs naming test-split images, decodes every image once into a uint8 array at
the backbone's size, and caches the locked text tower's pooled outputs for the built-in
backbone. The result ships to the Ray Train workers through the object store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aligner.data.corpus import corpus_columns, read_corpus
from aligner.data.images import decode_rgb
from aligner.data.preferences import preferences_manifest, read_preferences
from aligner.data.queries import query_splits
from aligner.retrieval.models import ModelSpec
from aligner.reward.model import PairIndex

log = logging.getLogger(__name__)


#: the reward trainer's pairs: the project's one pair index (aligner.reward.model)
RewardPairs = PairIndex


@dataclass
class RewardData:
    """What every reward-training worker receives.

    Attributes:
        pixels: ``[N, H, W, 3]`` uint8, every image a pair names.
        queries: the query texts, indexed by the pairs.
        text_pooled: ``[Q, W]`` the locked text tower's pooled outputs (built-in backbone), or
            None (the text tower runs on tokens).
        train, val: the training and validation pairs.
        norm_items: ``(query, image row)`` pairs ``[M, 2]`` whose raw rewards set the
            normalisation (the training items).
        sources: the pair sources seen (``rater``, ``human`` ...).
    """

    pixels: np.ndarray
    queries: list[str]
    text_pooled: np.ndarray | None
    train: RewardPairs
    val: RewardPairs
    norm_items: np.ndarray
    sources: list[str] = field(default_factory=list)


def _pairs(rows: list[dict[str, Any]], q_index: dict[str, int],
           row_of: dict[str, int]) -> RewardPairs:
    return RewardPairs(
        np.array([q_index[r["query_id"]] for r in rows], np.int64),
        np.array([row_of[r["chosen_id"]] for r in rows], np.int64),
        np.array([row_of[r["rejected_id"]] for r in rows], np.int64),
        np.array([1.0 if r["weight"] is None else r["weight"] for r in rows], np.float32))


def prepare_reward_data(votes: str, corpus: str, queries: str, model: ModelSpec,
                        val_fraction: float = 0.1, seed: int = 0,
                        max_norm_items: int = 4096) -> tuple[RewardData, dict[str, Any]]:
    """Build :class:`RewardData` and the counts for the manifest.

    Raises:
        ValueError: no pairs, no training pairs, images missing from the corpus, a corpus
            without images, or pairs naming degraded copies (a reward model learns from
            corpus images only).
    """
    from aligner.retrieval.models import load_checkpoint, load_retriever
    from aligner.retrieval.textcache import cached_pooled_features

    t0 = time.time()
    prefs = read_preferences(votes)
    if prefs.num_rows == 0:
        raise ValueError(f"votes {votes} hold no pairs")
    rows = prefs.select(["query_id", "query", "chosen_id", "rejected_id", "source",
                         "weight"]).to_pylist()
    degraded = [r for r in rows if "~" in r["chosen_id"] or "~" in r["rejected_id"]]
    if degraded:
        raise ValueError(f"{len(degraded)} pairs name degraded copies (e.g. "
                         f"{degraded[0]['rejected_id']!r}): train a reward model on votes "
                         "about corpus images")
    if "image" not in corpus_columns(corpus):
        raise ValueError(f"corpus {corpus} has no image column")
    split = query_splits(queries, sorted({r["query_id"] for r in rows}), val_fraction, seed)
    kept: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    for r in rows:
        kept.setdefault(split.get(r["query_id"], "train"), []).append(r)
    dropped_queries = sum(len(v) for k, v in kept.items() if k not in ("train", "val"))
    held_out = 0
    if "split" in corpus_columns(corpus):
        test_ids = set(read_corpus(corpus, ["id"], split="test")["id"].to_pylist())
        for k in ("train", "val"):
            n = len(kept[k])
            kept[k] = [r for r in kept[k] if r["chosen_id"] not in test_ids
                       and r["rejected_id"] not in test_ids]
            held_out += n - len(kept[k])
    if not kept["train"]:
        raise ValueError(f"no votes in {votes} belong to training queries and images")

    ref = load_checkpoint(model.checkpoint, device="cpu") if model.checkpoint else \
        load_retriever(model, device="cpu")
    need = sorted({r[k] for s in ("train", "val") for r in kept[s]
                   for k in ("chosen_id", "rejected_id")})
    blobs_t = read_corpus(corpus, ["id", "image"], ids=need)
    blobs = dict(zip(blobs_t["id"].to_pylist(), blobs_t["image"].to_pylist(), strict=True))
    missing = [i for i in need if i not in blobs]
    if missing:
        raise ValueError(f"{len(missing)} voted images are not in the corpus, e.g. {missing[:3]}")
    row_of = {i: k for k, i in enumerate(need)}
    pixels = np.stack([decode_rgb(blobs[i], ref.image_size) for i in need])

    qids = sorted({r["query_id"] for s in ("train", "val") for r in kept[s]})
    qtext = {r["query_id"]: r["query"] for s in ("train", "val") for r in kept[s]}
    q_index = {q: k for k, q in enumerate(qids)}
    texts = [qtext[q] for q in qids]
    pooled = None
    if ref.is_builtin:  # the locked MiniLM: its pooled outputs once, from the cache
        pooled = cached_pooled_features(ref.model, ref.tokenizer, texts, progress=False)
    train = _pairs(kept["train"], q_index, row_of)
    val = _pairs(kept["val"], q_index, row_of)
    items = np.unique(np.concatenate([np.stack([train.query, train.chosen], 1),
                                      np.stack([train.query, train.rejected], 1)]), axis=0)
    rng = np.random.default_rng([seed, 23])
    if len(items) > max_norm_items:
        items = items[np.sort(rng.choice(len(items), max_norm_items, replace=False))]
    sources = sorted({r["source"] for r in kept["train"]})
    counts = {"train_pairs": len(train), "val_pairs": len(val), "queries": len(qids),
              "images": int(len(pixels)), "dropped_test_query_pairs": dropped_queries,
              "dropped_held_out_image_pairs": held_out, "sources": sources,
              "norm_items": int(len(items)), "prepare_seconds": round(time.time() - t0, 1)}
    log.info("reward data: %d train / %d validation pairs, %d queries, %d images in %.1f s",
             len(train), len(val), len(qids), len(pixels), time.time() - t0)
    return RewardData(pixels, texts, pooled, train, val, items, sources), counts


def votes_manifest(votes: str | Path) -> dict[str, Any]:
    """The votes directory's manifest ({} for a bare file); a local path or a URI."""
    return preferences_manifest(votes)
