"""Driver-side preparation of :class:`aligner.training.align.AlignData` (everything frozen, computed once).

Reads the preference pairs, the queries table (for each query's split), and the corpus
(images and captions), each a local path or an ``s3://`` / ``gs://`` URI (the readers of
:mod:`aligner.data`; only the driver reads them: the Ray Train workers get the arrays); decodes every image a step can touch into one uint8 array (degraded
copies are made here from their originals, deterministically, never stored on disk); caches
the locked text tower's pooled outputs; and scores every pair under the frozen reference
model, so the reference never runs inside the training loop.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from aligner.data.corpus import corpus_columns, read_corpus
from aligner.data.images import decode_rgb
from aligner.data.preferences import preferences_manifest, read_preferences
from aligner.data.queries import query_splits
from aligner.retrieval.models import ModelSpec
from aligner.training.align import AlignData, PairSet

log = logging.getLogger(__name__)

PREF_COLUMNS = ("query_id", "query", "chosen_id", "rejected_id", "source", "weight")


def degrade_seed_of(preferences: str | Path) -> int:
    """The seed the preference builder made its degraded copies with (its manifest's
    ``degrade.seed``; 0 when there is no manifest), so the trainer materialises the same
    pixels the builder meant, whatever the training seed. A local path or a URI."""
    return int((preferences_manifest(preferences).get("degrade") or {}).get("seed", 0))


def prepare_align_data(preferences: str, corpus: str, queries: str, model: ModelSpec,
                       val_fraction: float = 0.1, seed: int = 0,
                       max_caption_images: int = 0) -> tuple[AlignData, dict]:
    """Build :class:`AlignData` and the counts for the manifest."""
    import torch
    import torch.nn.functional as F

    from aligner.preferences.degrade import materialise, original_id, parse_degraded_id
    from aligner.retrieval.models import load_checkpoint, load_retriever, to_pixels
    from aligner.retrieval.textcache import cached_pooled_features

    t0 = time.time()
    prefs = read_preferences(preferences)
    if prefs.num_rows == 0:
        raise ValueError(f"preferences {preferences} has no pairs")
    rows = prefs.select(list(PREF_COLUMNS)).to_pylist()
    degrade_seed = degrade_seed_of(preferences)
    split = query_splits(queries, sorted({r["query_id"] for r in rows}), val_fraction, seed)
    kept = {"train": [], "val": []}
    dropped = 0
    for r in rows:
        s = split.get(r["query_id"], "train")
        if s in kept:
            kept[s].append(r)
        else:
            dropped += 1  # pairs of test queries never train nor select
    names = corpus_columns(corpus)
    for c in ("id", "image", "caption"):
        if c not in names:
            raise ValueError(f"corpus {corpus} lacks column {c!r} (the contrastive term needs "
                             "images with captions)")
    held_out = 0
    if "split" in names:  # a pair naming a test-split image never trains (e.g. page votes)
        test_ids = set(read_corpus(corpus, ["id"], split="test")["id"].to_pylist())
        for s in kept:
            n = len(kept[s])
            kept[s] = [r for r in kept[s] if original_id(r["chosen_id"]) not in test_ids
                       and original_id(r["rejected_id"]) not in test_ids]
            held_out += n - len(kept[s])
        if held_out:
            log.warning("%d preference pairs name test-split images: dropped (held out)",
                        held_out)
    if not kept["train"]:
        raise ValueError("no preference pairs belong to training queries (and training "
                         "images)")
    meta_cols = ["id", "caption"]
    if "split" in names:
        cap = read_corpus(corpus, meta_cols, split="train")
        val = read_corpus(corpus, meta_cols, split="val")
    else:
        allc = read_corpus(corpus, meta_cols)
        h = np.array([zlib.crc32(f"{seed}:{i}".encode()) / 2**32 for i in allc["id"].to_pylist()])
        cap, val = allc.filter(pa.array(h >= 0.05)), allc.filter(pa.array(h < 0.05))
    captions, val_captions = cap["caption"].to_pylist(), val["caption"].to_pylist()
    cap_ids, val_ids = cap["id"].to_pylist(), val["id"].to_pylist()

    pref_ids = {r[k] for s in kept.values() for r in s for k in ("chosen_id", "rejected_id")}
    base_of = {i: (parse_degraded_id(i) or (i, None))[0] for i in pref_ids}
    n_cap = len(cap_ids) if not max_caption_images else min(max_caption_images, len(cap_ids))
    need = set(base_of.values()) | set(cap_ids[:n_cap]) | set(val_ids)
    blobs_t = read_corpus(corpus, ["id", "image"], ids=sorted(need))
    blobs = dict(zip(blobs_t["id"].to_pylist(), blobs_t["image"].to_pylist(), strict=True))
    missing = sorted(i for i in set(base_of.values()) if i not in blobs)
    if missing:
        raise ValueError(f"{len(missing)} preference images are not in the corpus, e.g. "
                         f"{missing[:3]}")

    ref = load_checkpoint(model.checkpoint, device="cpu") if model.checkpoint else \
        load_retriever(model, device="cpu")
    size = ref.image_size
    row_of: dict[str, int] = {}
    pixels: list[np.ndarray] = []
    originals: dict[str, np.ndarray] = {}

    def add(image_id: str) -> int:
        if image_id not in row_of:
            base = base_of.get(image_id, image_id)
            if base not in originals:
                originals[base] = decode_rgb(blobs[base], size)
            arr = originals[base] if base == image_id else materialise(originals[base],
                                                                       image_id, degrade_seed)
            row_of[image_id] = len(pixels)
            pixels.append(arr)
        return row_of[image_id]

    for i in sorted(pref_ids):
        add(i)
    cap_rows = np.array([add(i) for i in cap_ids[:n_cap]], np.int64)
    val_rows = np.array([add(i) for i in val_ids], np.int64)
    pix = np.stack(pixels)
    log.info("decoded %d images (%d preference, %d caption, %d validation) in %.1f s",
             len(pix), len(pref_ids), n_cap, len(val_rows), time.time() - t0)

    qids = sorted({r["query_id"] for s in kept.values() for r in s})
    qtext = {r["query_id"]: r["query"] for s in kept.values() for r in s}
    q_index = {q: k for k, q in enumerate(qids)}
    query_strings = [qtext[q] for q in qids]
    cached = hasattr(ref.model, "text") and hasattr(ref.model.text, "transformer")
    if cached:  # same list and order as pre-training's: a cache hit after it
        feats = cached_pooled_features(ref.model, ref.tokenizer, captions + val_captions)
        cap_text, val_text = feats[:len(captions)][:n_cap], feats[len(captions):]
        q_pooled = cached_pooled_features(ref.model, ref.tokenizer, query_strings)
        with torch.no_grad():
            q_ref = F.normalize(ref.model.text.proj(torch.from_numpy(q_pooled)), dim=-1).numpy()
    else:
        cap_text = val_text = q_pooled = None
        q_ref = ref.encode_texts(query_strings)

    pref_rows = np.array(sorted({row_of[i] for i in pref_ids}), np.int64)
    mean, std = ref.preprocess_cfg["mean"], ref.preprocess_cfg["std"]
    img_ref = np.zeros((len(pix), q_ref.shape[1]), np.float32)
    for lo in range(0, len(pref_rows), 1024):
        r = pref_rows[lo:lo + 1024]
        img_ref[r] = ref.encode_images(to_pixels(pix[r], mean, std))
    sources = sorted({r["source"] for s in kept.values() for r in s})

    def pairset(rs: list[dict]) -> PairSet:
        q = np.array([q_index[r["query_id"]] for r in rs], np.int64)
        c = np.array([row_of[r["chosen_id"]] for r in rs], np.int64)
        j = np.array([row_of[r["rejected_id"]] for r in rs], np.int64)
        w = np.array([r["weight"] if r["weight"] is not None else 1.0 for r in rs], np.float32)
        return PairSet(q, c, j, w, (q_ref[q] * img_ref[c]).sum(1).astype(np.float32),
                       (q_ref[q] * img_ref[j]).sum(1).astype(np.float32),
                       np.array([sources.index(r["source"]) for r in rs], np.int64))

    train, valp = pairset(kept["train"]), pairset(kept["val"])
    ref_scale = float(ref.model.logit_scale.detach().exp())
    data = AlignData(pix, q_pooled, query_strings, train, valp, cap_rows, cap_text, captions[:n_cap],
                     val_rows, val_text, val_captions, sources, ref_scale)
    by_source = {s: int((train.source == k).sum()) for k, s in enumerate(sources)}
    counts = {"train_pairs": len(train), "val_pairs": len(valp), "dropped_test_pairs": dropped,
              "dropped_held_out_image_pairs": held_out,
              "train_pairs_by_source": by_source, "queries": len(qids),
              "caption_images": int(n_cap), "val_images": len(val_rows),
              "images": int(len(pix)), "ref_logit_scale": ref_scale,
              "ref_train_pair_acc": float((train.ref_chosen > train.ref_rejected).mean()),
              "prepare_seconds": round(time.time() - t0, 1)}
    log.info("prepared %d train / %d validation pairs over %d queries in %.1f s",
             len(train), len(valp), len(qids), time.time() - t0)
    return data, counts
