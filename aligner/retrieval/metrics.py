"""Retrieval metrics, one definition each (numpy; the torch twin for training validation).

Three different things are called "recall" in retrieval; here each has one name:

* **caption recall@k** (:func:`caption_recall_hits`, :func:`caption_recall`): each query is
  the caption of one gallery image, its *target*; a hit at k when fewer than k gallery images
  are strictly more similar to the query than the target (a tie with the target counts for
  it). This is the no-regression check of alignment (the paper's MSCOCO / Flickr R@K).
* **system recall** (``aligner.evaluation.systems.system_recall_hits``): the same question
  asked of a whole retrieval system (a cascade re-ranks, a query shift moves the query), so
  a hit means the target is in the system's own top k.
* **neighbour recall** (:func:`neighbour_recall`): how much of the exact top k an approximate
  index (IVF-PQ, HNSW) returns - a property of the index, not of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

KS = (1, 5, 10)


def topk(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k: ``queries [Q, D]``, ``gallery [N, D]`` (normalised).

    Returns:
        (scores ``[Q, k]``, indices ``[Q, k]``), best first (``k`` is capped at N).
    """
    k = min(k, gallery.shape[0])
    sim = queries @ gallery.T
    idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(sim, idx, axis=1)
    order = np.argsort(-part, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(idx, order, axis=1)


def caption_recall_hits(queries: np.ndarray, gallery: np.ndarray, targets: np.ndarray,
                        ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """Per query: is its target (``targets[i]``, an index into ``gallery``) in the top k?

    Args:
        queries: ``[Q, D]`` normalised query (caption) vectors.
        gallery: ``[N, D]`` normalised image vectors.
        targets: ``[Q]`` gallery index of each query's own image.

    Returns:
        ``{"r@k": bool [Q]}``; the mean is caption recall@k.
    """
    sim = queries @ gallery.T
    tgt = sim[np.arange(len(targets)), targets][:, None]
    rank = (sim > tgt).sum(1)
    return {f"r@{k}": rank < k for k in ks}


def caption_recall(image_features: torch.Tensor, text_features: torch.Tensor,
                   ks: Sequence[int] = KS) -> dict[str, float]:
    """Caption recall@k where text row i's target is image row i (``[M, D]`` each, torch).

    Same definition as :func:`caption_recall_hits`, averaged; used inside training loops.
    """
    sim = text_features @ image_features.T
    target = sim.diagonal().unsqueeze(1)
    rank = (sim > target).sum(1)
    return {f"r@{k}": float((rank < k).float().mean()) for k in ks}


def caption_hits(image_features: torch.Tensor, text_features: torch.Tensor,
                 k: int = 10) -> np.ndarray:
    """Per caption (text row i, target image row i): is its image in the top ``k``? ``bool [M]``.

    The per-query outcomes behind :func:`caption_recall`, for paired comparisons of two
    models on the same captions (see :func:`paired_drop_se`).
    """
    sim = text_features @ image_features.T
    rank = (sim > sim.diagonal().unsqueeze(1)).sum(1)
    return (rank < k).cpu().numpy()


def paired_drop_se(start_hits: np.ndarray, hits: np.ndarray) -> float:
    """Standard error of ``mean(hits) - mean(start_hits)`` paired over the same captions.

    ``sd(d) / sqrt(n)`` for ``d_i = hits_i - start_hits_i`` in {-1, 0, 1}: only captions whose
    outcome changed add to it, so two close models get a small SE even when each recall alone
    is uncertain. 0 for fewer than two captions.
    """
    a = np.asarray(start_hits, np.float64)
    b = np.asarray(hits, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired hits differ in shape: {a.shape} vs {b.shape}")
    if len(a) < 2:
        return 0.0
    return float(np.std(b - a, ddof=1) / np.sqrt(len(a)))


def neighbour_recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of ``|found ∩ truth| / |truth|`` for ``[B, k]`` position arrays.

    ``found`` is an approximate index's top k, ``truth`` the exact top k; ``-1`` entries (no
    hit) never count as found.
    """
    hits = 0
    total = 0
    for f, t in zip(np.asarray(found), np.asarray(truth), strict=True):
        t = t[t >= 0]
        hits += len(np.intersect1d(f[f >= 0], t))
        total += len(t)
    return hits / total if total else 1.0


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def aesthetic_direction(vectors: np.ndarray, aesthetic: np.ndarray,
                        quantile: float = 0.1) -> np.ndarray:
    """Normalised mean embedding ``[D]`` of the top ``quantile`` of images by aesthetic score
    (clip-retrieval's aesthetic query shift adds ``w`` times it to a query).

    Raises:
        ValueError: no finite aesthetic score.
    """
    a = np.asarray(aesthetic, np.float64)
    ok = np.isfinite(a)
    if not ok.any():
        raise ValueError("no aesthetic scores: cannot build the query-shift direction")
    cut = np.quantile(a[ok], 1.0 - quantile)
    sel = ok & (a >= cut)
    return normalise(np.asarray(vectors, np.float32)[sel].mean(0))
