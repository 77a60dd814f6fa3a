"""Query-time retrieval systems: what a user would otherwise pick instead of an aligned model.

Every system maps query texts to top-k gallery indices over one shared gallery (the same image
ids in the same order for all systems), and can score any given candidates the way it ranks
them, so the evaluation can compare systems on the same results:

* :class:`EncoderSystem` - a retriever's text encoder and its own gallery embeddings (the base,
  the aligned model, a contrastive-only control, teacher variants ...): cosine similarity.
* :class:`CascadeSystem` - what search engines bolt on: the inner system's top ``n`` re-ranked
  by an aesthetic score, ``final = z(sim) + w * z(aesthetic)`` with both z-scored within the
  query's top ``n`` (``w = inf``: a pure aesthetic re-sort of the top ``n``).
* :class:`QueryShiftSystem` - clip-retrieval's aesthetic query shift (its ``aesthetic_score`` /
  ``aesthetic_weight`` options): ``q' = normalise(q + w * e)`` where ``e`` is the normalised
  mean embedding of the gallery images the scorer rates highest.
* :class:`RephraseSystem` - the LLM rephrase at query time: each query text is replaced by its
  rephrasing from a table keyed by ``query_id`` (the LLM's generation time is not part of the
  system's measured latency: the table is computed offline).
* :class:`TeacherRerankSystem` - the preference *teacher* that trained the aligned model,
  applied at query time: the inner system's top ``n`` re-ranked by
  ``z(sim) + w * z(teacher aesthetic)``, the teacher's score computed per query exactly as the
  preference builder computes it (:mod:`aligner.preferences.teacher`), the top ``n`` playing
  the role of the builder's pool. Its latency includes the teacher's extra text encodings
  (the good and the bad rephrase of every query).

Systems are pure numpy over precomputed gallery embeddings plus an ``encode(texts) -> [Q, D]``
callable, so they are cheap to test with hand-made vectors.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from aligner.preferences.teacher import (
    TEACHER_COMPONENTS,
    RephraseBatch,
    aesthetic_score,
    teacher_components,
    teacher_name,
    template_rephraser,
    zscore,
)
from aligner.retrieval.metrics import aesthetic_direction, normalise, topk

log = logging.getLogger(__name__)

EncodeTexts = Callable[[list[str]], np.ndarray]


class CachedEncoder:
    """A text encoder with a per-text cache (query sets are encoded many times in evaluation).

    ``calls`` / ``encoded`` count the calls and the texts actually encoded; :meth:`clear` empties
    the cache (the evaluation clears it before timing a system).
    """

    def __init__(self, encode: EncodeTexts) -> None:
        self.encode = encode
        self.cache: dict[str, np.ndarray] = {}
        self.calls = 0
        self.encoded = 0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if todo:
            emb = np.asarray(self.encode(todo), np.float32)
            self.cache.update(zip(todo, emb, strict=True))
            self.encoded += len(todo)
        if not len(texts):
            return np.zeros((0, 0), np.float32)
        return np.stack([self.cache[t] for t in texts])

    def clear(self) -> None:
        self.cache.clear()


class System:
    """A retrieval system over a gallery ``[N, D]`` (L2-normalised image embeddings).

    Attributes:
        name: shown in metrics and the report.
        kind: ``model``, ``cascade``, ``query_shift``, ``rephrase`` or ``teacher_rerank``.
        gallery: ``[N, D]`` image embeddings the system searches.
        caption_transform: how caption recall is measured: ``same`` (the system as it is),
            ``rerank`` / ``shift`` (the system's transform applied to caption queries) or
            ``n/a`` (not applicable: recall is the inner system's).
        needs_ids: the system needs query ids (not only texts).
    """

    kind = "model"
    caption_transform = "same"
    needs_ids = False

    def __init__(self, name: str, gallery: np.ndarray) -> None:
        self.name = name
        self.gallery = np.asarray(gallery, np.float32)

    def encode(self, texts: Sequence[str], ids: Sequence[str] | None = None) -> np.ndarray:
        """Query texts -> ``[Q, D]`` the embeddings the system searches with (a system may
        stack several vectors per query, e.g. :class:`TeacherRerankSystem`'s ``[Q, 3D]``: only
        its own :meth:`search_embeddings` and :meth:`score` read them)."""
        raise NotImplementedError

    def score(self, q: np.ndarray, cand: np.ndarray,
              subset: np.ndarray | None = None) -> np.ndarray:
        """The system's ranking score of candidate gallery indices ``cand [Q, M]``: ``[Q, M]``.

        ``q``: ``[Q, D]`` from :meth:`encode`; ``subset``: the gallery indices searched (a
        re-ranker's per-query statistics come from its top ``n`` there). Default: cosine
        similarity.
        """
        return np.einsum("qd,qmd->qm", q, self.gallery[cand])

    def search_embeddings(self, q: np.ndarray, k: int,
                          subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top k for query embeddings ``q [Q, D]``: (scores ``[Q, k]``, gallery indices ``[Q, k]``).

        ``subset``: search only these gallery indices (returned indices are still into the
        whole gallery).
        """
        g = self.gallery if subset is None else self.gallery[subset]
        s, idx = topk(q, g, k)
        return s, (idx if subset is None else np.asarray(subset)[idx])

    def search(self, texts: Sequence[str], k: int, ids: Sequence[str] | None = None,
               subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (scores ``[Q, k]``, gallery indices ``[Q, k]``), best first."""
        return self.search_embeddings(self.encode(texts, ids), k, subset)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "caption_transform": self.caption_transform}


class EncoderSystem(System):
    """A retriever: its text encoder plus its gallery embeddings; cosine similarity."""

    def __init__(self, name: str, encode: EncodeTexts, gallery: np.ndarray,
                 description: dict | None = None) -> None:
        super().__init__(name, gallery)
        self._encode = encode
        self.description = description or {}

    def encode(self, texts: Sequence[str], ids: Sequence[str] | None = None) -> np.ndarray:
        return np.asarray(self._encode(list(texts)), np.float32)

    def describe(self) -> dict:
        return {**super().describe(), **self.description}


def _z(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return np.where(std > 1e-12, (x - mean) / np.maximum(std, 1e-12), 0.0)


def cascade_scores(sim: np.ndarray, aes: np.ndarray, weight: float,
                   ref_sim: np.ndarray | None = None,
                   ref_aes: np.ndarray | None = None) -> np.ndarray:
    """The cascade's final score: ``z(sim) + weight * z(aesthetic)``, ``[Q, M]``.

    z-scores use the mean and standard deviation of each query's reference set
    (``ref_sim`` / ``ref_aes [Q, n]``: its top n; default the candidates themselves). A missing
    aesthetic (NaN) counts as the reference mean. ``weight = inf`` re-sorts purely by aesthetic
    (similarity only breaks ties).
    """
    ref_sim = sim if ref_sim is None else ref_sim
    ref_aes = aes if ref_aes is None else ref_aes
    zs = _z(sim, ref_sim.mean(1, keepdims=True), ref_sim.std(1, keepdims=True))
    ra = np.where(np.isfinite(ref_aes), ref_aes, np.nan)
    with warnings.catch_warnings():  # a query whose reference set has no score: all-NaN row
        warnings.simplefilter("ignore", RuntimeWarning)
        am = np.nan_to_num(np.nanmean(ra, 1, keepdims=True))
        asd = np.nan_to_num(np.nanstd(ra, 1, keepdims=True))
    za = _z(np.where(np.isfinite(aes), aes, am), am, asd)
    if np.isinf(weight):
        return za + 1e-6 * zs
    return zs + weight * za


class CascadeSystem(System):
    """The inner system's top ``n`` re-ranked by ``z(sim) + weight * z(aesthetic)``.

    Args:
        name: system name.
        inner: the first stage (the base model).
        aesthetic: ``[N]`` the scorer's score of every gallery image (NaN: unknown).
        n: candidates re-ranked per query.
        weight: aesthetic weight (``inf``: pure aesthetic re-sort of the top n).
    """

    kind = "cascade"
    caption_transform = "rerank"

    def __init__(self, name: str, inner: System, aesthetic: np.ndarray, n: int = 50,
                 weight: float = 1.0) -> None:
        super().__init__(name, inner.gallery)
        if len(aesthetic) != len(inner.gallery):
            raise ValueError(f"{len(aesthetic)} aesthetic scores for {len(inner.gallery)} images")
        self.inner = inner
        self.aesthetic = np.asarray(aesthetic, np.float64)
        self.n = int(n)
        self.weight = float(weight)
        self.needs_ids = inner.needs_ids

    def encode(self, texts: Sequence[str], ids: Sequence[str] | None = None) -> np.ndarray:
        return self.inner.encode(texts, ids)

    def search_embeddings(self, q: np.ndarray, k: int,
                          subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        sim, idx = self.inner.search_embeddings(q, max(self.n, k), subset)
        final = cascade_scores(sim, self.aesthetic[idx], self.weight)
        order = np.argsort(-final, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(final, order, 1), np.take_along_axis(idx, order, 1)

    def score(self, q: np.ndarray, cand: np.ndarray,
              subset: np.ndarray | None = None) -> np.ndarray:
        """Final scores of any candidates, z-scored with the query's top-n statistics."""
        ref_sim, ref_idx = self.inner.search_embeddings(q, self.n, subset)
        sim = self.inner.score(q, cand, subset)
        return cascade_scores(sim, self.aesthetic[cand], self.weight, ref_sim,
                              self.aesthetic[ref_idx])

    def describe(self) -> dict:
        return {**super().describe(), "inner": self.inner.name, "n": self.n,
                "weight": self.weight}


class QueryShiftSystem(System):
    """clip-retrieval's aesthetic query shift: ``q' = normalise(q + weight * e)``.

    ``e`` is :func:`aesthetic_direction` over the inner system's gallery, or over the images
    ``direction_from`` when given (the evaluation passes the non-test images, so no test
    image shapes a setting chosen on validation); clip-retrieval precomputes one such mean
    embedding per aesthetic level, ``aesthetic_weight`` defaults to 0.5 in its front end.
    """

    kind = "query_shift"
    caption_transform = "shift"

    def __init__(self, name: str, inner: System, aesthetic: np.ndarray, quantile: float = 0.1,
                 weight: float = 0.5, direction_from: np.ndarray | None = None) -> None:
        super().__init__(name, inner.gallery)
        self.inner = inner
        self.quantile = float(quantile)
        self.weight = float(weight)
        src = np.arange(len(inner.gallery)) if direction_from is None else \
            np.asarray(direction_from, np.int64)
        self.direction_from = None if direction_from is None else src
        self.direction = aesthetic_direction(inner.gallery[src], np.asarray(aesthetic)[src],
                                             quantile)
        self.needs_ids = inner.needs_ids

    def shift(self, q: np.ndarray) -> np.ndarray:
        return normalise(q + self.weight * self.direction[None, :])

    def encode(self, texts: Sequence[str], ids: Sequence[str] | None = None) -> np.ndarray:
        return self.shift(self.inner.encode(texts, ids))

    def describe(self) -> dict:
        return {**super().describe(), "inner": self.inner.name, "quantile": self.quantile,
                "weight": self.weight}


def rephrase_texts(ids: Sequence[str], texts: Sequence[str], table: dict[str, str],
                   on_missing: str = "plain") -> tuple[list[str], list[str]]:
    """Replace each query by its rephrasing from ``table`` (``query_id -> rephrased``).

    Args:
        on_missing: ``plain`` keeps the query of an id without a (non-empty) rephrasing;
            ``error`` raises.

    Returns:
        (texts, ids of the queries that kept their plain text).

    Raises:
        KeyError: a missing id with ``on_missing="error"``.
    """
    out, missing = [], []
    for qid, text in zip(ids, texts, strict=True):
        r = table.get(qid)
        if r:
            out.append(r)
        else:
            missing.append(qid)
            out.append(text)
    if missing and on_missing == "error":
        raise KeyError(f"{len(missing)} queries have no rephrasing, e.g. {missing[:5]} "
                       "(rephrase_missing=plain keeps their plain text)")
    return out, missing


class RephraseSystem(System):
    """The inner system searching with each query's LLM rephrasing (looked up by query id).

    ``mix`` < 1 searches with ``normalise((1 - mix) * q + mix * q_rephrased)``, a knob from
    the plain query (0) to the rephrasing alone (1, the default). ``missing`` collects the ids
    that had no rephrasing (kept plain) over all calls.
    """

    kind = "rephrase"
    caption_transform = "n/a"
    needs_ids = True

    def __init__(self, name: str, inner: System, table: dict[str, str],
                 on_missing: str = "plain", mix: float = 1.0) -> None:
        super().__init__(name, inner.gallery)
        if on_missing not in ("plain", "error"):
            raise ValueError("on_missing must be 'plain' or 'error'")
        if not 0.0 <= mix <= 1.0:
            raise ValueError("mix must be in [0, 1]")
        self.inner = inner
        self.table = table
        self.on_missing = on_missing
        self.mix = float(mix)
        self.missing: set[str] = set()

    def encode(self, texts: Sequence[str], ids: Sequence[str] | None = None) -> np.ndarray:
        if ids is None:
            raise ValueError(f"{self.name}: the rephrase system needs query ids")
        new, missing = rephrase_texts(ids, texts, self.table, self.on_missing)
        self.missing.update(missing)
        q = self.inner.encode(new)
        if self.mix < 1.0:
            q = normalise((1.0 - self.mix) * self.inner.encode(list(texts)) + self.mix * q)
        return q

    def describe(self) -> dict:
        return {**super().describe(), "inner": self.inner.name, "rephrasings": len(self.table),
                "missing": len(self.missing), "mix": self.mix}


class TeacherRerankSystem(System):
    """The training teacher at query time: the inner system's top ``n`` re-ranked by
    ``z(sim) + weight * z(teacher aesthetic)`` (:func:`cascade_scores`).

    The teacher aesthetic of each of a query's top ``n`` is
    :func:`aligner.preferences.teacher.aesthetic_score` of
    :func:`aligner.preferences.teacher.teacher_components` over that top ``n`` (the builder's
    pool): ``scorer`` (the gallery's aesthetic column), ``rephrase`` and ``contrast`` from the
    query's rephrasing (looked up by query id; the query itself where there is none, as in the
    builder) and its bad rephrase (``bad_rephrase`` of the original query text).

    :meth:`encode` returns ``[Q, 3D]``: the query, the rephrasing and the bad rephrase
    encoded by the inner system, side by side (a component that needs neither leaves the
    query's own vector in their place, encoding nothing). Every text is encoded at query
    time through the inner system's (cached) encoder, so a timed search with cleared caches
    pays for the two extra encodings per query; the rephrasing itself is a table lookup (the
    LLM's time is not counted, as for :class:`RephraseSystem`). Caption queries (no ids) have
    no rephrasing: the caption is its own good side.

    Args:
        name: system name.
        inner: the first stage (the base model, an :class:`EncoderSystem`).
        aesthetic: ``[N]`` the gallery's aesthetic column (NaN: unknown).
        table: ``query_id -> rephrased``.
        components, component_weights: the teacher's components and weights.
        bad_rephrase: texts -> bad rephrases (default the builder's,
            ``template_rephraser()``).
        n: candidates re-ranked per query (the teacher's pool).
        weight: teacher weight (``inf``: a pure teacher sort of the top n).
        on_missing: a query id without a rephrasing: ``plain`` (its own text) | ``error``.
    """

    kind = "teacher_rerank"
    caption_transform = "rerank"
    needs_ids = True

    def __init__(self, name: str, inner: System, aesthetic: np.ndarray,
                 table: dict[str, str], components: Sequence[str],
                 component_weights: Sequence[float], bad_rephrase: RephraseBatch | None = None,
                 n: int = 50, weight: float = 1.0, on_missing: str = "plain",
                 reward: Any = None, reward_gallery: np.ndarray | None = None) -> None:
        super().__init__(name, inner.gallery)
        if "reward" in components and (reward is None or reward_gallery is None):
            raise ValueError("a teacher with a 'reward' component needs the reward model and "
                             "its embeddings of the gallery")
        if len(aesthetic) != len(inner.gallery):
            raise ValueError(f"{len(aesthetic)} aesthetic scores for {len(inner.gallery)} images")
        unknown = [c for c in components if c not in TEACHER_COMPONENTS]
        if unknown or not components:
            raise ValueError(f"teacher components {list(components)}: one or more of "
                             f"{list(TEACHER_COMPONENTS)}")
        if len(components) != len(component_weights):
            raise ValueError(f"{len(components)} teacher components but "
                             f"{len(component_weights)} weights")
        if on_missing not in ("plain", "error"):
            raise ValueError("on_missing must be 'plain' or 'error'")
        self.inner = inner
        self.aesthetic = np.asarray(aesthetic, np.float64)
        self.table = table
        self.components = list(components)
        self.component_weights = [float(w) for w in component_weights]
        self.bad_rephrase = bad_rephrase or template_rephraser()
        self.n = int(n)
        self.weight = float(weight)
        self.on_missing = on_missing
        self.need_reph = bool({"rephrase", "contrast"} & set(self.components))
        self.need_bad = "contrast" in self.components
        self.reward = reward if "reward" in self.components else None
        self.reward_gallery = reward_gallery if self.reward is not None else None
        self.missing: set[str] = set()

    @property
    def teacher(self) -> str:
        return teacher_name(self.components, self.component_weights)

    def reweighted(self, weight: float, name: str | None = None) -> TeacherRerankSystem:
        """The same teacher and pool with another weight (a sweep's setting)."""
        return TeacherRerankSystem(name or self.name, self.inner, self.aesthetic, self.table,
                                   self.components, self.component_weights, self.bad_rephrase,
                                   self.n, weight, self.on_missing, self.reward,
                                   self.reward_gallery)

    def encode(self, texts: Sequence[str], ids: Sequence[str] | None = None) -> np.ndarray:
        texts = list(texts)
        q = self.inner.encode(texts, ids)
        q_reph = q_bad = q
        if self.need_reph and ids is not None:
            reph, missing = rephrase_texts(ids, texts, self.table, self.on_missing)
            self.missing.update(missing)
            if reph != texts:  # as the builder: no rephrasing anywhere, no second encoding
                q_reph = self.inner.encode(reph, ids)
        if self.need_bad:
            q_bad = self.inner.encode(list(self.bad_rephrase(texts)), ids)
        parts = [q, q_reph, q_bad]
        if self.reward is not None:  # the reward model's own text vector, after the three
            parts.append(self.reward.encode_texts(texts))
        return np.concatenate(parts, axis=1).astype(np.float32)

    def split(self, qq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``[Q, 3D (+ Dr)]`` from :meth:`encode` -> (query, rephrasing, bad rephrase)
        ``[Q, D]`` (the reward text vector, if any, is :meth:`reward_part`)."""
        d = self.gallery.shape[1]
        return qq[:, :d], qq[:, d:2 * d], qq[:, 2 * d:3 * d]

    def reward_part(self, qq: np.ndarray) -> np.ndarray:
        """The reward model's text vectors ``[Q, Dr]`` of :meth:`encode`'s output."""
        return qq[:, 3 * self.gallery.shape[1]:]

    def _components(self, q: np.ndarray, q_reph: np.ndarray, q_bad: np.ndarray,
                    cand: np.ndarray, q_reward: np.ndarray | None = None
                    ) -> dict[str, np.ndarray]:
        reward = None
        if self.reward is not None and q_reward is not None:
            img = self.reward_gallery[cand]
            reward = self.reward.rewards_from_features(np.repeat(q_reward[None], len(cand), 0),
                                                       img)
        comps = teacher_components(
            self.gallery[cand], q, q_reph if self.need_reph else None,
            q_bad if self.need_bad else None,
            self.aesthetic[cand] if "scorer" in self.components else None, reward)
        comps.pop("sem")
        return comps

    def teacher_scores(self, qq: np.ndarray, pool: np.ndarray) -> np.ndarray:
        """The teacher's aesthetic of each query's pool ``[Q, M]`` (gallery indices), z-scored
        within the pool as the builder does: ``[Q, M]``."""
        q, q_reph, q_bad = self.split(qq)
        q_rw = self.reward_part(qq)
        out = np.zeros(pool.shape, np.float32)
        for b in range(len(pool)):
            comps = self._components(q[b], q_reph[b], q_bad[b], pool[b], q_rw[b])
            out[b] = aesthetic_score(comps, self.components, self.component_weights)
        return out

    def search_embeddings(self, q: np.ndarray, k: int,
                          subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        sim, idx = self.inner.search_embeddings(self.split(q)[0], max(self.n, k), subset)
        final = cascade_scores(sim, self.teacher_scores(q, idx), self.weight)
        order = np.argsort(-final, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(final, order, 1), np.take_along_axis(idx, order, 1)

    def score(self, q: np.ndarray, cand: np.ndarray,
              subset: np.ndarray | None = None) -> np.ndarray:
        """Final scores of any candidates ``[Q, M]``: each teacher component z-scored with the
        statistics of the query's top ``n`` (the pool, within ``subset``), then both terms
        z-scored with the top n's statistics, as :meth:`search_embeddings` ranks them (equal
        on the top n)."""
        qo, q_reph, q_bad = self.split(q)
        q_rw = self.reward_part(q)
        ref_sim, ref_idx = self.inner.search_embeddings(qo, self.n, subset)
        ref_aes = self.teacher_scores(q, ref_idx)
        aes = np.zeros(cand.shape, np.float32)
        for b in range(len(cand)):
            pool = self._components(qo[b], q_reph[b], q_bad[b], ref_idx[b], q_rw[b])
            mine = self._components(qo[b], q_reph[b], q_bad[b], cand[b], q_rw[b])
            total = None
            for name, w in zip(self.components, self.component_weights, strict=True):
                z = float(w) * zscore(mine[name], pool[name])
                total = z if total is None else total + z
            aes[b] = total
        return cascade_scores(self.inner.score(qo, cand, subset), aes, self.weight, ref_sim,
                              ref_aes)

    def describe(self) -> dict:
        return {**super().describe(), "inner": self.inner.name, "n": self.n,
                "weight": self.weight, "teacher": self.teacher,
                "rephrasings": len(self.table), "missing": len(self.missing)}


def system_recall_hits(system: System, texts: Sequence[str], targets: np.ndarray,
                subset: np.ndarray | None = None, ks: Sequence[int] = (1, 5, 10),
                ids: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per query: is gallery index ``targets[i]`` in the system's top k (within ``subset``)?

    Returns:
        ``{"r@k": bool [Q]}`` (the mean is recall@k).
    """
    _, idx = system.search(texts, max(ks), ids=ids, subset=subset)
    found = idx == np.asarray(targets)[:, None]
    return {f"r@{k}": found[:, :k].any(1) for k in ks}


def timed_search(system: System, texts: Sequence[str], k: int,
                 ids: Sequence[str] | None = None,
                 subset: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Search (within ``subset``) and return (gallery indices ``[Q, k]``, seconds for encode +
    search)."""
    t0 = time.perf_counter()
    _, idx = system.search(texts, k, ids=ids, subset=subset)
    return idx, time.perf_counter() - t0
