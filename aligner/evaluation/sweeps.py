"""Operating points of the query-time baselines, and comparisons at equal relevance.

A cascade re-ranker, a query shift, a query-time rephrase and the training teacher applied at
query time each trade relevance for aesthetics through one knob (the cascade's or the
teacher's weight, the shift weight, how much of the rephrased query is mixed in). One default
setting of each says little next to the aligned model: a larger weight always buys more
aesthetics with less relevance. So each baseline is swept over its knob (a *frontier*), and
the aligned model is compared with it *at equal or better relevance*: against the setting with
the highest aesthetic@K among those whose content precision@K, and caption recall@10, are at
least the aligned model's. The setting is *chosen* on validation queries (the aligned model's
precision measured on the same queries) and *reported* on the held-out test queries
(:func:`choose_and_report`), so the choice does not see the queries it is judged on. Picking
the best qualifying setting favours the baseline, so a win there is conservative.

Pure numpy over per-query arrays; the evaluation job computes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Default knob values per family.
#: Each grid starts at 0 (the base itself) and steps up slowly, so that some setting is as
#: relevant as an aligned model that loses no relevance: with a grid starting at 0.1 no
#: setting of any family qualified on the default world's dense val gallery.
DEFAULT_SWEEPS: dict[str, tuple[float, ...]] = {
    "cascade": (0.0, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 100.0),  # 100: an aesthetic re-sort
    "query_shift": (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
    "rephrase": (0.0, 0.05, 0.1, 0.25, 0.5, 1.0),
    "teacher_rerank": (0.0, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 100.0),  # the cascade's grid
}
KNOB = {"cascade": "w", "query_shift": "w", "rephrase": "mix", "teacher_rerank": "w"}


@dataclass
class Point:
    """One baseline setting's results on the held-out queries.

    Attributes:
        family: ``cascade``, ``query_shift`` or ``rephrase``.
        param: the knob's value.
        per_query: per-query arrays ``[Q]`` (``aesthetic@K``, ``precision@K`` ...).
        recall: per-caption recall@10 hits ``[C]``, or None when the setting does not change
            caption search (the rephrase: its recall is the inner model's).
    """

    family: str
    param: float
    per_query: dict[str, np.ndarray]
    recall: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        v = "inf" if math.isinf(self.param) else f"{self.param:g}"
        return f"{self.family} {KNOB.get(self.family, 'p')}={v}"

    def mean(self, key: str) -> float:
        if key == "recall@10":
            return float(np.mean(self.recall)) if self.recall is not None else float("nan")
        v = np.asarray(self.per_query[key], np.float64)
        v = v[np.isfinite(v)]
        return float(v.mean()) if len(v) else float("nan")


def qualifies(point: Point, precision: float, recall: float | None, precision_key: str,
              inner_recall: float | None = None, slack: float = 0.0) -> bool:
    """Whether a setting is at least as relevant as the target on both axes.

    ``recall`` None: only precision is compared. A point without its own recall uses
    ``inner_recall`` (its inner model's); unknown recall never disqualifies. ``slack``: a
    setting less than this much below the target (absolute, e.g. 0.01 = one point) still
    counts as equally relevant, since such differences are within the noise of a few hundred
    queries; it favours the baseline.
    """
    if not point.mean(precision_key) >= precision - slack:
        return False
    if recall is None:
        return True
    r = point.mean("recall@10") if point.recall is not None else inner_recall
    return r is None or not math.isfinite(r) or r >= recall - slack


def best_at_equal_relevance(points: Sequence[Point], primary: str, precision_key: str,
                            precision: float, recall: float | None = None,
                            inner_recall: float | None = None,
                            slack: float = 0.0) -> Point | None:
    """The qualifying setting (:func:`qualifies`) with the highest mean ``primary``; None if
    no setting is as relevant as the target."""
    ok = [p for p in points if qualifies(p, precision, recall, precision_key, inner_recall,
                                         slack)]
    if not ok:
        return None
    return max(ok, key=lambda p: (p.mean(primary), p.mean(precision_key)))


def choose_and_report(chosen_on: Sequence[Point], reported_on: Sequence[Point], primary: str,
                      precision_key: str, precision: float, recall: float | None = None,
                      inner_recall: float | None = None,
                      slack: float = 0.0) -> tuple[Point, Point] | None:
    """The best setting at equal relevance chosen on one query set, with its results on another.

    Args:
        chosen_on: each setting's results on the selection (validation) queries.
        reported_on: the same settings, in the same order, on the report (test) queries.
        precision, recall, inner_recall: the targets, measured on the selection queries (and
            the selection captions) like ``chosen_on``.

    Returns:
        (the chosen setting on the selection queries, the same setting on the report
        queries), or None when no setting is as relevant as the target.

    Raises:
        ValueError: the two lists do not hold the same settings.
    """
    if [(p.family, p.param) for p in chosen_on] != [(p.family, p.param) for p in reported_on]:
        raise ValueError("chosen_on and reported_on must hold the same settings in order")
    best = best_at_equal_relevance(chosen_on, primary, precision_key, precision, recall,
                                   inner_recall, slack)
    if best is None:
        return None
    return best, reported_on[next(i for i, p in enumerate(chosen_on) if p is best)]


def frontier_rows(points: Sequence[Point], primary: str, precision_key: str,
                  ci=None) -> list[dict]:
    """JSON rows of a sweep: label, knob, primary (with CI), precision, recall."""
    rows = []
    for p in points:
        a = np.asarray(p.per_query[primary], np.float64)
        rows.append({"setting": p.label, "param": None if math.isinf(p.param) else p.param,
                     primary: ci(a[np.isfinite(a)]) if ci else {"mean": p.mean(primary)},
                     precision_key: p.mean(precision_key),
                     "recall@10": None if p.recall is None else p.mean("recall@10")})
    return rows


def frontier_figure(frontier: dict[str, list[dict]], systems: dict[str, dict], primary: str,
                    precision_key: str, path, aligned: str = "aligned"):
    """``primary`` against ``precision_key`` and against recall@10: one line per baseline
    family (labelled settings), one marker per trained system or default setting."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.4))
    axes = fig.subplots(1, 2)
    for ax, xkey in zip(axes, (precision_key, "recall@10"), strict=True):
        for fam, rows in frontier.items():
            pts = [(r[xkey], r[primary]["mean"]) for r in rows
                   if r.get(xkey) is not None and r[primary].get("mean") is not None]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker=".", lw=1, label=f"{fam} (swept)")
            for r in rows:
                if r.get(xkey) is not None:
                    ax.annotate(r["setting"].split(" ", 1)[1], (r[xkey], r[primary]["mean"]),
                                fontsize=6, xytext=(2, 2), textcoords="offset points")
        for name, s in systems.items():
            y = (s.get(primary) or {}).get("mean")
            x = (s.get(xkey) or {}).get("mean") if xkey != "recall@10" else \
                ((s.get("recall") or {}).get("r@10") or {}).get("mean")
            if x is None or y is None:
                continue
            star = name == aligned
            ax.plot(x, y, "*" if star else "o", ms=13 if star else 6, label=name,
                    color="#c44e52" if star else None)
        ax.set(xlabel=xkey + (" (held-out captions)" if xkey == "recall@10" else
                              " (held-out queries)"), ylabel=primary,
               title=f"{primary} vs {xkey}: up and right is better")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    return path
