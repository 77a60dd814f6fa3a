"""Repeats: the aligned model's comparisons over several training (and world) seeds.

One evaluation's confidence intervals cover the sampling of its queries only. A study runs the
same fine-tune (and its control) with several seeds and summarises, with the yardstick of
``docs/evaluation.md``:

* each comparison of the aligned model (:data:`STUDY_ROWS`: the primary nDCG@10 first, then
  beauty among the relevant results, the relevance guardrails, HPIR per aspect, and the
  diagnostic aesthetic@10 last): every run's mean and bootstrap CI, the mean over runs, the
  between-run standard deviation and range, and whether the CI excludes 0 in *every* run;
* the comparisons at equal relevance (:func:`summarise_equal_relevance`): per baseline family,
  aligned minus the setting chosen on val, nDCG@10 on test, with each run's chosen setting;
* the targets of ``docs/evaluation.md`` section 5 (:func:`check_targets`): each run's value,
  met or not, and whether it is met in every run.

Everything here is pure (metrics dicts in, plain data or text out); ``jobs.study`` runs the
seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PRIMARY = "ndcg@10"
DIAGNOSTIC = "(diagnostic: includes wrong-content results)"

#: (comparison, metric, label, scale) rows of the study table: a metric of ``metrics.json``'s
#: ``comparisons[<system>]``, i.e. aligned minus that system (printed times ``scale``).
STUDY_ROWS: tuple[tuple[str, str, str, float], ...] = (
    ("base", "ndcg@10_diff", "nDCG@10, aligned - base", 1.0),
    ("control", "ndcg@10_diff", "nDCG@10, aligned - control", 1.0),
    ("rephrase", "ndcg@10_diff", "nDCG@10, aligned - rephrase", 1.0),
    ("teacher_rerank", "ndcg@10_diff", "nDCG@10, aligned - teacher_rerank", 1.0),
    ("base", "beauty_relevant@10_diff", "beauty among relevant@10, aligned - base", 1.0),
    ("base", "precision@10_diff", "precision@10 points, aligned - base", 100.0),
    ("base", "recall@10_diff", "recall@10 points, aligned - base", 100.0),
    ("base", "hpir_aesthetics_diff", "HPIR-aesthetics points, aligned - base", 100.0),
    ("base", "hpir_accuracy_diff", "HPIR-accuracy points, aligned - base", 100.0),
    ("base", "aesthetic@10_diff", f"aesthetic@10, aligned - base {DIAGNOSTIC}", 1.0),
)

#: the baseline families compared at equal relevance, in table order
FAMILIES: tuple[str, ...] = ("cascade", "query_shift", "rephrase", "teacher_rerank")

_NAMES = {"ndcg@10_diff": "nDCG@10", "precision@10_diff": "precision@10"}
_EPS = 1e-9  # bounds such as "drop <= 1 point" are met on the bound itself


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x))


def _ci(d: Any) -> dict[str, float] | None:
    """``{mean, ci_low, ci_high}`` of a CI dict with a finite mean (None otherwise)."""
    if not isinstance(d, Mapping) or not _finite(d.get("mean")):
        return None
    return {k: float(d[k]) for k in ("mean", "ci_low", "ci_high") if _finite(d.get(k))}


def _spread(per: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Mean over runs, between-run sd and range, and the all-runs CI flags."""
    means = np.array([v["mean"] for v in per.values()])
    lows = [v.get("ci_low", np.nan) for v in per.values()]
    highs = [v.get("ci_high", np.nan) for v in per.values()]
    return {
        "n_runs": len(per), "mean": float(means.mean()),
        "sd": float(means.std(ddof=1)) if len(means) > 1 else 0.0,
        "min": float(means.min()), "max": float(means.max()),
        "ci_above_0_in_all": bool(all(lo > 0 for lo in lows)),
        "ci_below_0_in_all": bool(all(hi < 0 for hi in highs)),
        "ci_excludes_0_in_all": bool(all(lo > 0 or hi < 0
                                         for lo, hi in zip(lows, highs, strict=True))),
    }


def summarise_rows(metrics: Mapping[str, Mapping[str, Any]],
                   rows: Sequence[tuple[str, str, str, float]] = STUDY_ROWS) -> list[dict]:
    """The comparison rows over runs (see :func:`summarise_seeds`); a row no run has is
    skipped."""
    out = []
    for comp, key, label, scale in rows:
        per = {}
        for run, m in metrics.items():
            d = _ci(((m.get("comparisons") or {}).get(comp) or {}).get(key))
            if d is not None:
                per[run] = d
        if per:
            out.append({"label": label, "comparison": comp, "metric": key, "scale": scale,
                        "per_run": per, **_spread(per)})
    return out


def summarise_equal_relevance(metrics: Mapping[str, Mapping[str, Any]],
                              metric: str = f"{PRIMARY}_diff",
                              families: Sequence[str] = FAMILIES) -> list[dict]:
    """Per baseline family: aligned minus the setting chosen on val, ``metric`` on test.

    Returns:
        One row per family some run has: ``{family, metric, label, scale, chosen_on,
        reported_on, per_run: {run: {mean, ci_low, ci_high, setting}} or {run: {"setting":
        None, "note": why}}}`` plus, over the runs with a value, :func:`summarise_rows`'s
        ``n_runs, mean, sd, min, max`` and CI flags (``n_runs`` 0 and no mean when none has).
    """
    out = []
    for fam in families:
        per: dict[str, dict[str, Any]] = {}
        chosen_on, reported_on = set(), set()
        for run, m in metrics.items():
            r = (((m.get("equal_relevance") or {}).get("families")) or {}).get(fam)
            if not isinstance(r, Mapping):
                continue
            chosen_on.add(str(r.get("chosen_on") or "val"))
            reported_on.add(str(r.get("reported_on") or "test"))
            d = _ci(r.get(metric)) if r.get("setting") else None
            if d is None:
                per[run] = {"setting": r.get("setting"),
                            "note": str(r.get("note") or f"no {metric} for {fam}")}
            else:
                per[run] = {**d, "setting": str(r["setting"])}
        if not per:
            continue
        have = {k: v for k, v in per.items() if "mean" in v}
        row: dict[str, Any] = {
            "family": fam, "metric": metric, "scale": 1.0,
            "label": f"{_NAMES.get(metric, metric)}, aligned - {fam}",
            "chosen_on": ", ".join(sorted(chosen_on)),
            "reported_on": ", ".join(sorted(reported_on)), "per_run": per}
        row.update(_spread(have) if have else {"n_runs": 0})
        out.append(row)
    return out


@dataclass(frozen=True)
class Target:
    """One target of docs/evaluation.md section 5, checked on one run's metrics."""

    key: str
    target: str
    value: Callable[[Mapping[str, Any]], dict[str, Any] | None]  # the CI dict checked
    met: Callable[[Mapping[str, float]], bool]
    scale: float = 1.0
    unit: str = ""


def _comparison(metric: str, other: str = "base"):
    def get(m: Mapping[str, Any]) -> dict[str, Any] | None:
        return _ci(((m.get("comparisons") or {}).get(other) or {}).get(metric))
    return get


def _equal_relevance(family: str, metric: str = f"{PRIMARY}_diff"):
    def get(m: Mapping[str, Any]) -> dict[str, Any] | None:
        r = (((m.get("equal_relevance") or {}).get("families")) or {}).get(family)
        if not isinstance(r, Mapping):
            return None
        if not r.get("setting") or _ci(r.get(metric)) is None:
            return {"na": str(r.get("note") or f"no qualifying {family} setting")}
        return {**_ci(r.get(metric)), "setting": str(r["setting"])}
    return get


def _lo(d: Mapping[str, float]) -> float:
    return d.get("ci_low", np.nan)


def _hi(d: Mapping[str, float]) -> float:
    return d.get("ci_high", np.nan)


#: the targets of docs/evaluation.md section 5, in its order
TARGETS: tuple[Target, ...] = (
    Target("ndcg@10", "aligned - base nDCG@10: CI above 0",
           _comparison("ndcg@10_diff"), lambda d: _lo(d) > 0),
    Target("beauty_relevant@10", "aligned - base beauty among relevant@10: CI above 0",
           _comparison("beauty_relevant@10_diff"), lambda d: _lo(d) > 0),
    Target("precision@10", "precision@10: drop's upper bound <= 1 point",
           _comparison("precision@10_diff"), lambda d: _lo(d) >= -0.01 - _EPS, 100.0, " pt"),
    Target("recall@10", "caption recall@10: drop's upper bound <= 1 point",
           _comparison("recall@10_diff"), lambda d: _lo(d) >= -0.01 - _EPS, 100.0, " pt"),
    Target("hpir_aesthetics", "HPIR-aesthetics (oracle): >= +10 points, CI above 0",
           _comparison("hpir_aesthetics_diff"),
           lambda d: d["mean"] >= 0.10 - _EPS and _lo(d) > 0, 100.0, " pt"),
    Target("hpir_accuracy", "HPIR-accuracy (oracle): mean >= -2 points",
           _comparison("hpir_accuracy_diff"), lambda d: d["mean"] >= -0.02 - _EPS, 100.0, " pt"),
    Target("equal_relevance:teacher_rerank",
           "equal relevance vs teacher_rerank: nDCG@10 diff CI reaches 0",
           _equal_relevance("teacher_rerank"), lambda d: _hi(d) >= 0),
    Target("equal_relevance:rephrase", "equal relevance vs rephrase: nDCG@10 diff CI reaches 0",
           _equal_relevance("rephrase"), lambda d: _hi(d) >= 0),
)


def _shown(d: Mapping[str, Any], scale: float, unit: str = "") -> str:
    f = ".1f" if scale >= 100 else ".3f"  # points to one decimal
    s = f"{scale * d['mean']:+{f}}"
    if "ci_low" in d and "ci_high" in d:
        s += f" [{scale * d['ci_low']:+{f}}, {scale * d['ci_high']:+{f}}]"
    return s + unit


def run_targets(m: Mapping[str, Any],
                targets: Sequence[Target] = TARGETS) -> list[dict[str, Any]]:
    """The targets on one run's ``metrics.json``: ``[{key, target, value, met, shown}]``.

    ``value`` is the CI dict checked (``setting`` added for equal relevance; ``shown`` is it
    as printed, points for precision, recall and HPIR); ``met`` is
    True / False, or None ("n/a") when the run lacks the measure or, at equal relevance, has
    no qualifying setting (its ``note`` then says why) - never counted as met.
    """
    out = []
    for t in targets:
        d = t.value(m)
        if d is None:
            out.append({"key": t.key, "target": t.target, "value": None, "met": None,
                        "shown": "missing"})
        elif "na" in d:
            out.append({"key": t.key, "target": t.target, "value": None, "met": None,
                        "shown": "n/a", "note": d["na"]})
        else:
            out.append({"key": t.key, "target": t.target, "value": d,
                        "met": bool(t.met(d)), "shown": _shown(d, t.scale, t.unit)})
    return out


def check_targets(metrics: Mapping[str, Mapping[str, Any]],
                  targets: Sequence[Target] = TARGETS) -> list[dict[str, Any]]:
    """The targets of docs/evaluation.md section 5 over runs.

    Args:
        metrics: run name -> that run's ``metrics.json`` dict.

    Returns:
        One row per target: ``{key, target, per_run: {run: {value, met, shown[, note]}},
        n_met, met_in_all}``; ``met`` per run is True / False / None (n/a: missing, or no
        qualifying setting), and ``met_in_all`` is True only when every run met it (an n/a
        run does not count as met).
    """
    per_run = {run: run_targets(m, targets) for run, m in metrics.items()}
    rows = []
    for i, t in enumerate(targets):
        per = {run: {k: v for k, v in res[i].items() if k not in ("key", "target")}
               for run, res in per_run.items()}
        n_met = sum(v["met"] is True for v in per.values())
        rows.append({"key": t.key, "target": t.target, "per_run": per, "n_met": n_met,
                     "met_in_all": bool(per) and n_met == len(per)})
    return rows


def summarise_seeds(metrics: Mapping[str, Mapping[str, Any]],
                    rows: Sequence[tuple[str, str, str, float]] = STUDY_ROWS) -> dict[str, Any]:
    """Summarise the same comparisons over runs.

    Args:
        metrics: run name (``"world0/seed1"``) -> that run's ``metrics.json`` dict.
        rows: (comparison, metric, label, scale) to summarise; a row no run has is skipped.

    Returns:
        ``{"runs": [...], "primary": "ndcg@10", "rows": [{label, comparison, metric, scale,
        per_run: {run: {mean, ci_low, ci_high}}, mean, sd, min, max, n_runs,
        ci_excludes_0_in_all, ci_above_0_in_all, ci_below_0_in_all}], "equal_relevance":
        [...] (:func:`summarise_equal_relevance`), "targets": [...] (:func:`check_targets`)}``;
        values in the metric's own units (multiply by ``scale`` to print).
    """
    primaries = {str(m.get("primary")) for m in metrics.values() if m.get("primary")}
    return {"runs": list(metrics),
            "primary": ", ".join(sorted(primaries)) if primaries else PRIMARY,
            "rows": summarise_rows(metrics, rows),
            "equal_relevance": summarise_equal_relevance(metrics),
            "targets": check_targets(metrics)}


def _cell(v: Mapping[str, float] | None, s: float, width: int) -> str:
    if v is None or "mean" not in v:
        return "n/a".rjust(width)
    return (f"{s * v['mean']:+8.3f} [{s * v.get('ci_low', np.nan):+.3f}, "
            f"{s * v.get('ci_high', np.nan):+.3f}]").rjust(width)


def _label_width(rows: Sequence[Mapping[str, Any]], first: str) -> int:
    return max([len(first)] + [len(r["label"]) for r in rows])


def _rows_table(rows: Sequence[Mapping[str, Any]], runs: Sequence[str], first: str,
                width: int = 26) -> list[str]:
    lw = _label_width(rows, first)
    head = f"{first:<{lw}} {'mean':>8} {'sd':>7}  " + "  ".join(f"{r:>{width}}" for r in runs)
    lines = [head, "-" * len(head)]
    for row in rows:
        s = row["scale"]
        cells = "  ".join(_cell(row["per_run"].get(r), s, width) for r in runs)
        mean = (f"{s * row['mean']:+8.3f} {s * row['sd']:7.3f}" if row.get("n_runs")
                else f"{'n/a':>8} {'':7}")
        flag = " *" if row.get("n_runs") and row["ci_excludes_0_in_all"] else ""
        lines.append(f"{row['label']:<{lw}} {mean}  {cells}{flag}")
    return lines


def study_table(summary: Mapping[str, Any]) -> str:
    """The summary as text: the comparisons (one line each, each run's mean [CI]), the
    comparisons at equal relevance with each run's chosen setting, and the targets."""
    runs = summary["runs"]
    lines = [f"Primary: {summary.get('primary') or PRIMARY} (gain match x beauty); aligned "
             "minus each system, mean [95% CI] per run", ""]
    lines += _rows_table(summary["rows"], runs, "comparison")
    lines.append("* the 95% CI excludes 0 in every run")

    eq = summary.get("equal_relevance") or []
    if eq:
        chosen = ", ".join(sorted({r["chosen_on"] for r in eq}))
        reported = ", ".join(sorted({r["reported_on"] for r in eq}))
        lines += ["", f"At equal relevance: aligned - the setting chosen on {chosen}, "
                      f"reported on {reported}", ""]
        table = _rows_table(eq, runs, "equal relevance")
        lines += table[:2]
        notes: list[str] = []
        lw = _label_width(eq, "equal relevance")
        for row, line in zip(eq, table[2:], strict=True):
            lines.append(line)
            settings = []
            for r in runs:
                v = row["per_run"].get(r)
                if v is None:
                    settings.append("")
                elif v.get("setting") and "mean" in v:
                    settings.append(str(v["setting"]))
                else:
                    notes.append(f"{r}, {row['family']}: {v.get('note') or 'no setting'}")
                    settings.append(f"n/a (note {len(notes)})")
            lines.append(f"{'  setting':<{lw}} {'':8} {'':7}  "
                         + "  ".join(f"{s:>26}" for s in settings))
        lines += [f"note {i}: {n}" for i, n in enumerate(notes, 1)]

    targets = summary.get("targets") or []
    if targets:
        lines += ["", "Targets (docs/evaluation.md, section 5): each run's value, met or not "
                      "(equal relevance: the settings above)", ""]
        tw = max(len(t["target"]) for t in targets)
        cw = max([len(r) for r in runs]
                 + [len(v["shown"]) + 8 for t in targets for v in t["per_run"].values()])
        head = (f"{'target':<{tw}}  " + "  ".join(f"{r:>{cw}}" for r in runs)
                + "  all runs")
        lines += [head, "-" * len(head)]
        for t in targets:
            cells = []
            for r in runs:
                v = t["per_run"].get(r)
                if v is None:
                    cells.append(f"{'missing':>{cw}}")
                    continue
                verdict = {True: "met", False: "NOT met", None: ""}[v["met"]]
                cells.append(f"{v['shown']} {verdict}".rstrip().rjust(cw))
            n = len(t["per_run"])
            all_runs = "met" if t["met_in_all"] else f"NOT met ({t['n_met']}/{n} runs)"
            lines.append(f"{t['target']:<{tw}}  " + "  ".join(cells) + f"  {all_runs}")
        tnotes = [f"{r}, {t['key']}: {v['note']}" for t in targets
                  for r, v in t["per_run"].items() if v.get("note")]
        if tnotes:
            lines.append("n/a (not counted as met): " + "; ".join(tnotes))
    return "\n".join(lines)


def study_figure(summary: Mapping[str, Any], path: str) -> None:
    """One panel per comparison (and per family at equal relevance): each run's mean and 95%
    CI, the mean over runs dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [*summary["rows"],
            *[{**r, "label": f"{r['label']} (equal relevance)"}
              for r in summary.get("equal_relevance") or [] if r.get("n_runs")]]
    if not rows:
        return
    cols = min(4, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows, strict=False):  # extra axes are switched off
        s = row["scale"]
        names = [n for n, v in row["per_run"].items() if "mean" in v]
        m = np.array([row["per_run"][n]["mean"] for n in names]) * s
        lo = np.array([row["per_run"][n].get("ci_low", np.nan) for n in names]) * s
        hi = np.array([row["per_run"][n].get("ci_high", np.nan) for n in names]) * s
        x = np.arange(len(names))
        ax.errorbar(x, m, yerr=[m - lo, hi - m], fmt="o", capsize=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.axhline(row["mean"] * s, color="tab:red", ls="--", lw=0.8)
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        ax.set_title(_wrap(row["label"]), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _wrap(label: str, width: int = 40) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(label, width))
