"""Pairwise judging of two result rows, order-consistent (the paper's LMM-judge protocol).

A judge compares two rows of images for one query on three aspects, as the paper's LMM judge
and its HPIR raters did: **accuracy** (do the images show what the query asks for),
**aesthetics** and **diversity**. The paper found order effects in LMM judges, so every pair
is judged twice with the rows swapped; a row wins only when both orders agree, otherwise the
result is "similar" (:func:`order_consistent`).

:class:`ProxyJudge` is the judge available without a vision-language model, and says so in
its name: accuracy is the rows' mean cosine similarity to the query under a reference
retriever, aesthetics the aesthetic scorer's mean score of the images, diversity the mean
pairwise cosine *distance* within a row; each aspect is "similar" below its margin, and the
overall winner is the majority of the decided aspects (accuracy breaks a tie). It is a
stand-in for the LMM judge, not evidence of human preference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Side = Literal["a", "b", "similar"]
ASPECTS = ("accuracy", "aesthetics", "diversity")


@dataclass
class RowView:
    """What a judge sees of one row.

    Attributes:
        similarity: ``[n]`` cosine of each image with the query (reference retriever).
        aesthetic: ``[n]`` the scorer's score of each image (NaN: unknown).
        vectors: ``[n, D]`` normalised image vectors (diversity), or None.
    """

    similarity: np.ndarray
    aesthetic: np.ndarray
    vectors: np.ndarray | None = None


@dataclass
class Judgment:
    """A judge's decision on rows a and b."""

    winner: Side
    aspects: dict[str, Side] = field(default_factory=dict)
    rationale: str = ""


def _side(x: float, y: float, margin: float) -> Side:
    if not (np.isfinite(x) and np.isfinite(y)) or abs(x - y) < margin:
        return "similar"
    return "a" if x > y else "b"


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
            "accuracy": (float(np.nanmean(a.similarity)), float(np.nanmean(b.similarity)),
                         self.accuracy_margin),
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
        return Judgment(winner, aspects, rationale)


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _swap(s: Side) -> Side:
    return {"a": "b", "b": "a", "similar": "similar"}[s]


def order_consistent(judge: Callable[[RowView, RowView], Judgment], a: RowView,
                     b: RowView) -> tuple[Judgment, bool]:
    """Judge (a, b) and (b, a); a side wins (overall and per aspect) only when both orders
    agree, else "similar". Returns the combined judgment and whether the orders agreed."""
    first = judge(a, b)
    second = judge(b, a)
    agree = first.winner == _swap(second.winner)
    aspects = {k: (v if _swap(second.aspects.get(k, "similar")) == v else "similar")
               for k, v in first.aspects.items()}
    winner: Side = first.winner if agree else "similar"
    rationale = first.rationale + ("" if agree else " | swapped order disagreed: similar")
    return Judgment(winner, aspects, rationale), agree
