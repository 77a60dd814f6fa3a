"""Evaluation on the built-in world (the only code that reads the oracle).

* caption recall: each held-out image's own caption retrieves it from the held-out gallery;
* paraphrases: queries in words no caption uses must find the right content in the top 10;
* aesthetic@K: the oracle's mean beauty of a query's top K;
* the rephrasing premise: adding generic good-photo words (:func:`with_good_looks`) to a
  content-only query must raise the oracle score of its top K (a paired difference with a
  bootstrap CI).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from aligner.evaluation.stats import ci_dict
from aligner.rephrase.template import TemplateRephraser
from aligner.retrieval.metrics import caption_recall_hits, topk
from aligner.world.generate import World, content_matches

EncodeTexts = Callable[[list[str]], np.ndarray]


def content_match(truth: dict, labels: pa.Table | dict[str, np.ndarray]) -> np.ndarray:
    """Which gallery images have the content a query asks for: ``[N]`` bool
    (:func:`aligner.world.generate.content_matches`; ``labels`` may be the oracle table)."""
    col = labels if isinstance(labels, dict) else {c: np.asarray(labels[c].to_pylist())
                                                   for c in ("shape", "colour", "count",
                                                             "background")}
    return content_matches(truth, col)


#: The premise's rephraser: generic photographic words, none of the world's vocabulary.
_GOOD_LOOKS = TemplateRephraser(style="reorg", polarity="good")


def with_good_looks(query: str) -> str:
    """The simplest aesthetic rephrase: the template rephraser's good ``reorg`` rendering,
    generic photographic words for real photographs ("a high-quality, in-focus, ... photo of
    <query> in good natural light"), sharing no word with the world's vocabulary or taste.

    (Before, it used the world's own look phrases and taste, "crisp, clean, well-lit, vivid,
    centred ... with warm golden tones"; premise gains measured with those are not comparable.)
    """
    return _GOOD_LOOKS.rephrase_one(query)


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

    def beauty_range(self, split: str | None) -> tuple[float, float]:
        """Min and max oracle beauty over the gallery searched (``split`` None: all of it)."""
        b = self.beauty[self.subset(split)]
        return (float(b.min()), float(b.max())) if len(b) else (0.0, 1.0)

    def relevant_counts(self, query_ids: list[str], split: str | None) -> np.ndarray:
        """How many images of the searched gallery have each query's content: ``[Q]``."""
        g = self.subset(split)
        sub = {c: v[g] for c, v in self.labels.items()}
        return np.array([int(content_match(self.truth[q], sub).sum()) for q in query_ids])

    def _idcg(self, query_ids: list[str], split: str | None, k: int) -> np.ndarray:
        """Ideal DCG@k per query over the searched gallery (cached per query, split, k)."""
        from aligner.evaluation.oracle_metrics import ideal_dcg, minmax01

        cache = self.__dict__.setdefault("_idcg_cache", {})
        todo = [q for q in query_ids if (q, split, k) not in cache]
        if todo:
            g = self.subset(split)
            sub = {c: v[g] for c, v in self.labels.items()}
            b01 = minmax01(self.beauty[g], *self.beauty_range(split))
            vals = ideal_dcg([b01[content_match(self.truth[q], sub)] for q in todo], k)
            cache.update({(q, split, k): float(v) for q, v in zip(todo, vals, strict=True)})
        return np.array([cache[(q, split, k)] for q in query_ids])

    def graded(self, query_ids: list[str], top: np.ndarray, k: int,
               split: str | None) -> dict[str, np.ndarray]:
        """What a person sees in each query's top ``k`` (``top [Q, >=k]`` gallery indices, all
        within the gallery ``split``), per query ``[Q]`` (``docs/evaluation.md`` §2):

        * ``ndcg@k``: nDCG with gain ``match x b01``, ``b01`` the oracle beauty min-max
          normalised over the searched gallery, the ideal ranking its relevant images by
          beauty (NaN for a query with no relevant image there);
        * ``beauty_relevant@k``: mean oracle beauty of the relevant results (NaN: none);
        * ``precision@k``: the share of results with the asked-for content;
        * ``aesthetic@k``: mean oracle beauty of every result, wrong content included
          (a diagnostic).
        """
        from aligner.evaluation.oracle_metrics import (
            beauty_among_relevant,
            minmax01,
            ndcg_at_k,
        )

        t = np.asarray(top)[:, :k]
        match = self.content_matches(query_ids, t)
        b = self.beauty[t]
        gains = match * minmax01(b, *self.beauty_range(split))
        return {f"ndcg@{k}": ndcg_at_k(gains, self._idcg(query_ids, split, k), k),
                f"beauty_relevant@{k}": beauty_among_relevant(b, match),
                f"precision@{k}": match.mean(1) if t.shape[1] else np.zeros(len(t)),
                f"aesthetic@{k}": b.mean(1)}

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
        """Does "query + good look words" retrieve more beautiful relevant images?

        Paired over ``split`` content queries searching the gallery ``gallery_split``: the
        gain in nDCG@k (gain match x beauty) and in beauty among the relevant results of the
        looked-up query over the plain one, with bootstrap CIs; the change in precision@k, so
        a gain bought with relevance is visible; aesthetic@k (every result) as a diagnostic.
        """
        from aligner.evaluation.oracle_metrics import paired_difference
        from aligner.evaluation.stats import finite_ci_dict

        q = self.world.queries(split=split, kind="content")
        qids, texts = q["query_id"].to_pylist(), q["query"].to_pylist()
        plain = self.graded(qids, self.query_topk(encode, texts, k, gallery_split), k,
                            gallery_split)
        looks = self.graded(qids, self.query_topk(encode, [with_good_looks(t) for t in texts],
                                                  k, gallery_split), k, gallery_split)
        out: dict[str, dict] = {}
        for key in (f"ndcg@{k}", f"beauty_relevant@{k}", f"precision@{k}", f"aesthetic@{k}"):
            out[f"{key}_plain"] = finite_ci_dict(plain[key])
            out[f"{key}_good_looks"] = finite_ci_dict(looks[key])
            out[f"{key}_gain"] = paired_difference(looks[key], plain[key])
        return out
