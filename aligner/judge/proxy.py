"""Proxy judges: stand-ins for the LMM judge that need no vision-language model.

Each one says it is a proxy in its name (``proxy:...``), and that name goes into every output
(the judgments table, the summary, the serving API), because a proxy's verdict is not
evidence of human preference.

* :class:`ProxyJudge` (``proxy:scorer+similarity``): accuracy is the rows' mean cosine
  similarity to the query under a reference retriever, aesthetics the aesthetic scorer's mean
  score of the images, diversity the mean pairwise cosine *distance* within a row; each aspect
  is "similar" below its margin, and the overall winner is the majority of the decided
  aspects (accuracy breaks a tie).
* :class:`RewardProxyJudge` (``proxy:reward``): any reward model with ``score(prompt, images)
  -> [n] rewards`` (e.g. the ImageReward-style model of :mod:`aligner.reward`, duck-typed);
  the row with the higher mean reward wins overall when the difference reaches the margin.
  A reward model scores text-image preference as one number, so it judges no aspect.
* :class:`RowViewer` turns a query and a row's encoded images into the :class:`RowView` the
  scorer + similarity proxy reads (a reference retriever and the low-level scorer), for jobs
  that have images rather than an index's vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from aligner.judge.protocol import Judgment, Side


@dataclass
class RowView:
    """What the scorer + similarity proxy sees of one row.

    Attributes:
        similarity: ``[n]`` cosine of each image with the query (reference retriever).
        aesthetic: ``[n]`` the scorer's score of each image (NaN: unknown).
        vectors: ``[n, D]`` normalised image vectors (diversity), or None.
    """

    similarity: np.ndarray
    aesthetic: np.ndarray
    vectors: np.ndarray | None = None


def _side(x: float, y: float, margin: float) -> Side:
    if not (np.isfinite(x) and np.isfinite(y)) or abs(x - y) < margin:
        return "similar"
    return "a" if x > y else "b"


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def diversity(vectors: np.ndarray | None) -> float:
    """Mean pairwise cosine distance within a row (NaN with fewer than two vectors)."""
    if vectors is None or len(vectors) < 2:
        return float("nan")
    v = np.asarray(vectors, np.float64)
    sim = v @ v.T
    n = len(v)
    return float(1.0 - (sim.sum() - np.trace(sim)) / (n * (n - 1)))


@dataclass
class ProxyJudge:
    """Scorer + reference-similarity judge (see the module docstring).

    Attributes:
        accuracy_margin: cosine difference below which accuracy is "similar".
        aesthetic_margin: scorer difference below which aesthetics is "similar".
        diversity_margin: distance difference below which diversity is "similar".
    """

    accuracy_margin: float = 0.02
    aesthetic_margin: float = 0.2
    diversity_margin: float = 0.02
    name: str = "proxy:scorer+similarity"

    def __call__(self, a: RowView, b: RowView) -> Judgment:
        means = {
            "accuracy": (_nanmean(a.similarity), _nanmean(b.similarity), self.accuracy_margin),
            "aesthetics": (_nanmean(a.aesthetic), _nanmean(b.aesthetic), self.aesthetic_margin),
            "diversity": (diversity(a.vectors), diversity(b.vectors), self.diversity_margin),
        }
        aspects = {k: _side(x, y, m) for k, (x, y, m) in means.items()}
        wins = {s: sum(v == s for v in aspects.values()) for s in ("a", "b")}
        if wins["a"] != wins["b"]:
            winner: Side = "a" if wins["a"] > wins["b"] else "b"
        else:
            winner = aspects["accuracy"]
        rationale = "; ".join(f"{k}: {x:.3f} vs {y:.3f} -> {aspects[k]}"
                              for k, (x, y, _) in means.items())
        details = {k: [x, y] for k, (x, y, _) in means.items()}
        return Judgment(winner, aspects, rationale, details)


class RewardScorer(Protocol):
    """What :class:`RewardProxyJudge` needs of a reward model."""

    def score(self, prompt: str, images: list[Any]) -> np.ndarray: ...


@dataclass
class RewardRow:
    """What the reward proxy sees of one row: the query and the row's images (whatever the
    reward model's ``score`` accepts: encoded bytes, PIL images or arrays). ``reward`` is the
    row's mean reward once scored (so the swapped order does not score it again)."""

    query: str
    images: list[Any]
    reward: float | None = None


@dataclass
class RewardProxyJudge:
    """The row with the higher mean reward wins (see the module docstring).

    Attributes:
        model: any object with ``score(prompt, images) -> [n] rewards``.
        margin: mean-reward difference below which the rows are "similar".
        name: ``proxy:reward`` (a suffix may name the model: ``proxy:reward:<model>``).
    """

    model: RewardScorer
    margin: float = 0.05
    name: str = "proxy:reward"

    def __post_init__(self) -> None:
        if not callable(getattr(self.model, "score", None)):
            raise TypeError(f"a reward proxy needs an object with score(prompt, images); got "
                            f"{type(self.model).__name__}")
        if not self.name.startswith("proxy:"):
            raise ValueError(f"a proxy judge's name starts with 'proxy:', not {self.name!r}")

    def _rewards(self, query: str, images: list[Any]) -> np.ndarray:
        r = np.asarray(self.model.score(query, list(images)), np.float64).reshape(-1)
        if r.size != len(images):
            raise ValueError(f"the reward model returned {r.size} rewards for {len(images)} "
                             "images")
        return r

    def score_rows(self, rows: Sequence[RewardRow]) -> None:
        """Score rows that are not scored yet, one model call per query (batched), and keep
        each row's mean reward in ``row.reward``.

        Raises:
            ValueError: the model returned a number of rewards other than the images given.
        """
        by_query: dict[str, list[RewardRow]] = {}
        for row in rows:
            if row.reward is None:
                by_query.setdefault(row.query, []).append(row)
        for query, todo in by_query.items():
            r = self._rewards(query, [im for row in todo for im in row.images])
            lo = 0
            for row in todo:
                row.reward = _nanmean(r[lo:lo + len(row.images)])
                lo += len(row.images)

    def mean_reward(self, row: RewardRow) -> float:
        """The model's mean reward of a row's images for its query (scored once per row).

        Raises:
            ValueError: the model returned a number of rewards other than the row's images.
        """
        if row.reward is None:
            self.score_rows([row])
        return float(row.reward)

    def __call__(self, a: RewardRow, b: RewardRow) -> Judgment:
        ra, rb = self.mean_reward(a), self.mean_reward(b)
        winner = _side(ra, rb, self.margin)
        return Judgment(winner, {}, f"mean reward {ra:.3f} vs {rb:.3f} -> {winner}",
                        {"reward": [ra, rb]})


class RowViewer:
    """Builds :class:`RowView` s from encoded images: a reference retriever's cosine to the
    query and image vectors, and an aesthetic scorer on the decoded pixels.

    Args:
        retriever: an :class:`aligner.retrieval.models.Retriever` (``encode_texts``,
            ``encode_pil``).
        scorer: an aesthetic scorer (:func:`aligner.aesthetics.scorer.make_scorer`); a
            ``pixels`` scorer is run on the images, an ``embedding`` scorer on the vectors.
        max_side: images are shrunk to this side before the pixel scorer (as the embed job).
    """

    def __init__(self, retriever: Any, scorer: Any, max_side: int = 256) -> None:
        self.retriever, self.scorer, self.max_side = retriever, scorer, max_side
        self._cache: dict[bytes, tuple[np.ndarray, float]] = {}

    def _encode(self, images: Sequence[bytes]) -> None:
        from aligner.data.images import decode_image, to_uint8

        todo = [b for b in dict.fromkeys(images) if b not in self._cache]
        if not todo:
            return
        pil = [decode_image(b).convert("RGB") for b in todo]
        vecs = self.retriever.encode_pil(pil)
        if getattr(self.scorer, "needs", "pixels") == "pixels":
            aes = np.asarray(self.scorer.score([to_uint8(p, self.max_side) for p in pil]),
                             np.float64)
        else:
            aes = np.asarray(self.scorer.score(vecs), np.float64)
        for b, v, s in zip(todo, vecs, aes, strict=True):
            self._cache[b] = (v, float(s))
        if len(self._cache) > 50_000:  # a long job: keep memory bounded
            self._cache.clear()

    def views(self, query: str, rows: Sequence[Sequence[bytes]]) -> list[RowView]:
        """One view per row of encoded images, for ``query``.

        Raises:
            aligner.data.images.ImageError: an image that cannot be decoded.
        """
        self._encode([b for row in rows for b in row])
        q = self.retriever.encode_texts([query])[0]
        out = []
        for row in rows:
            vecs = np.stack([self._cache[b][0] for b in row])
            aes = np.array([self._cache[b][1] for b in row], np.float64)
            out.append(RowView(vecs @ q, aes, vecs))
        return out
