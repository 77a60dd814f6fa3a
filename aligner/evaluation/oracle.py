"""Evaluation on the built-in world (the only code that reads the oracle).

* caption recall: each held-out image's own caption retrieves it from the held-out gallery;
* paraphrases: queries in words no caption uses must find the right content in the top 10;
* aesthetic@K: the oracle's mean beauty of a query's top K;
* the rephrasing premise: adding good look words to a content-only query must raise the
  oracle score of its top K (a paired difference with a bootstrap CI).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from aligner.evaluation.stats import ci_dict
from aligner.retrieval.metrics import caption_recall_hits, topk
from aligner.world.generate import World
from aligner.world.vocab import GOOD_LOOK_ADJECTIVES, GOOD_LOOK_TAIL

EncodeTexts = Callable[[list[str]], np.ndarray]


def content_match(truth: dict, labels: pa.Table | dict[str, np.ndarray]) -> np.ndarray:
    """Which gallery images have the content a query asks for: ``[N]`` bool.

    ``truth``: one row of ``eval/query_truth.parquet`` (``count`` 0 / ``background`` "" = any).
    ``labels``: oracle columns ``shape``, ``colour``, ``count``, ``background`` as arrays.
    """
    col = labels if isinstance(labels, dict) else {c: np.asarray(labels[c].to_pylist())
                                                   for c in ("shape", "colour", "count",
                                                             "background")}
    ok = (col["shape"] == truth["shape"]) & (col["colour"] == truth["colour"])
    if truth["count"]:
        ok &= col["count"] == truth["count"]
    if truth["background"]:
        ok &= col["background"] == truth["background"]
    return ok


def with_good_looks(query: str) -> str:
    """The simplest aesthetic rephrase: the query plus good look words."""
    return f"a {GOOD_LOOK_ADJECTIVES} photo of {query} {GOOD_LOOK_TAIL}"


class WorldEval:
    """Gallery embeddings + oracle labels for one world, reusable across metrics."""

    def __init__(self, world: World, image_embeddings: np.ndarray, ids: list[str]) -> None:
        self.world = world
        oracle = world.oracle()
        pos = {i: k for k, i in enumerate(oracle["id"].to_pylist())}
        order = np.array([pos[i] for i in ids])
        self.ids = ids
        self.emb = image_embeddings
        self.labels = {c: np.asarray(oracle[c].to_pylist())[order]
                       for c in ("shape", "colour", "count", "background", "split")}
        self.beauty = np.asarray(oracle["beauty"].to_pylist(), np.float64)[order]
        truth = world.query_truth()
        self.truth = {r["query_id"]: r for r in truth.to_pylist()}
        all_beauty = np.asarray(oracle["beauty"].to_pylist(), np.float64)
        self._beauty_by_id = dict(zip(oracle["id"].to_pylist(), all_beauty.tolist(), strict=True))
        self._beauty_range = (float(all_beauty.min()), float(all_beauty.max()))

    def with_embeddings(self, image_embeddings: np.ndarray) -> WorldEval:
        """The same gallery (ids, labels, truth) with another model's ``[N, D]`` embeddings."""
        if image_embeddings.shape[0] != len(self.ids):
            raise ValueError(f"{image_embeddings.shape[0]} embeddings for {len(self.ids)} ids")
        other = copy.copy(self)
        other.emb = image_embeddings
        return other

    def content_matches(self, query_ids: list[str], top: np.ndarray) -> np.ndarray:
        """Per result: does gallery image ``top[i, j]`` have query i's content? ``[Q, M]`` bool."""
        return np.stack([content_match(self.truth[q], {c: v[top[i]] for c, v in
                                                       self.labels.items()})
                         for i, q in enumerate(query_ids)]) if len(query_ids) else \
            np.zeros((0, top.shape[1] if top.ndim == 2 else 0), bool)

    def beauty_of(self, ids: list[str]) -> np.ndarray:
        """Oracle beauty of any corpus ids (not only the gallery's); NaN for unknown ids."""
        return np.array([self._beauty_by_id.get(i, np.nan) for i in ids], np.float64)

    def utility_beauty(self, low: float = 0.1) -> np.ndarray:
        """Gallery beauty min-max normalised over the whole corpus into ``[low, 1]``: ``[N]``.

        The HPIR-style row utility (``mean(match * b')``) uses it so that a relevant image
        always counts more than an irrelevant one (which counts 0), however plain it is.
        """
        lo, hi = self._beauty_range
        return low + (1.0 - low) * (self.beauty - lo) / max(hi - lo, 1e-12)

    def subset(self, split: str | None) -> np.ndarray:
        """Gallery indices of one split (None: all)."""
        return np.arange(len(self.ids)) if split is None else np.flatnonzero(
            self.labels["split"] == split)

    def caption_recall(self, encode: EncodeTexts, captions: list[str], split: str = "test",
                       ks=(1, 5, 10)) -> dict[str, dict]:
        """Each ``split`` image's caption retrieves it among the ``split`` gallery."""
        g = self.subset(split)
        q = encode([captions[i] for i in g])
        hits = caption_recall_hits(q, self.emb[g], np.arange(len(g)), ks)
        out = {k: ci_dict(v.astype(float)) for k, v in hits.items()}
        out["chance@10"] = {"mean": min(1.0, 10 / max(1, len(g)))}
        return out

    def query_topk(self, encode: EncodeTexts, texts: list[str], k: int = 10,
                   split: str | None = None) -> np.ndarray:
        """Gallery indices ``[Q, k]`` of each text's top k (within ``split`` if given)."""
        g = self.subset(split)
        _, idx = topk(encode(texts), self.emb[g], k)
        return g[idx]

    def relevance(self, query_ids: list[str], top: np.ndarray) -> np.ndarray:
        """Fraction of each query's top-k with the asked-for content: ``[Q]``."""
        return np.array([content_match(self.truth[q], {c: v[top[i]] for c, v in
                                                       self.labels.items()}).mean()
                         for i, q in enumerate(query_ids)])

    def content_hits(self, encode: EncodeTexts, kind: str, k: int = 10,
                     split: str = "test") -> dict[str, dict]:
        """Does a query's top k contain the content it asks for? With the chance level.

        ``kind``: ``paraphrase`` (held-out words) or ``content`` (caption words). Chance is
        the hit rate of a random top k: ``1 - (1 - m/N)^k`` for m matching images of N.
        """
        q = self.world.queries(split=split, kind=kind)
        qids, texts = q["query_id"].to_pylist(), q["query"].to_pylist()
        top = self.query_topk(encode, texts, k)
        rel = self.relevance(qids, top)
        n = len(self.ids)
        match = np.array([content_match(self.truth[i], self.labels).sum() for i in qids])
        chance = 1.0 - (1.0 - match / n) ** k
        return {f"hit@{k}": ci_dict((rel > 0).astype(float)), f"precision@{k}": ci_dict(rel),
                f"hit@{k}_chance": {"mean": float(chance.mean())},
                f"precision@{k}_chance": {"mean": float((match / n).mean())}}

    def premise(self, encode: EncodeTexts, k: int = 10, split: str = "test",
                gallery_split: str | None = None) -> dict[str, dict]:
        """Does "query + good look words" retrieve more beautiful images than the query?

        Paired over ``split`` content queries: aesthetic@k (oracle mean beauty of the top k)
        of the looked-up query minus that of the plain query, with a bootstrap CI; also the
        change in content precision@k, so a gain bought with relevance is visible.
        """
        q = self.world.queries(split=split, kind="content")
        qids, texts = q["query_id"].to_pylist(), q["query"].to_pylist()
        plain = self.query_topk(encode, texts, k, gallery_split)
        looks = self.query_topk(encode, [with_good_looks(t) for t in texts], k, gallery_split)
        a_plain, a_looks = self.beauty[plain].mean(1), self.beauty[looks].mean(1)
        r_plain, r_looks = self.relevance(qids, plain), self.relevance(qids, looks)
        return {"aesthetic@10_plain": ci_dict(a_plain), "aesthetic@10_good_looks": ci_dict(a_looks),
                "aesthetic@10_gain": ci_dict(a_looks - a_plain),
                "precision@10_plain": ci_dict(r_plain), "precision@10_good_looks": ci_dict(r_looks),
                "gallery_best_aesthetic@10": {"mean": float(np.sort(self.beauty[
                    self.subset(gallery_split)])[-k:].mean())}}
