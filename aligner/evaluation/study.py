"""Repeats: the aligned model's comparisons over several training (and world) seeds.

One evaluation's confidence intervals cover the sampling of its queries only. A study runs the
same fine-tune (and its control) with several seeds and summarises each comparison of the
aligned model (``aligned - base``, ``aligned - control`` ...): every seed's mean and bootstrap
CI, the mean over seeds, the between-seed standard deviation and range, and whether the CI
excludes 0 (or meets a target) in *every* seed. :func:`summarise_seeds` is pure (metrics dicts
in, a summary dict out); ``jobs.study`` runs the seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: (comparison, metric, label, scale) rows of the study table: a metric of ``metrics.json``'s
#: ``comparisons[<system>]``, i.e. aligned minus that system.
STUDY_ROWS: tuple[tuple[str, str, str, float], ...] = (
    ("base", "aesthetic@10_diff", "aesthetic@10, aligned - base", 1.0),
    ("base", "recall@10_diff", "recall@10 points, aligned - base", 100.0),
    ("base", "hpir_diff", "HPIR points, aligned - base", 100.0),
    ("control", "aesthetic@10_diff", "aesthetic@10, aligned - control", 1.0),
    ("control", "recall@10_diff", "recall@10 points, aligned - control", 100.0),
    ("rephrase", "aesthetic@10_diff", "aesthetic@10, aligned - rephrase", 1.0),
    ("teacher_rerank", "aesthetic@10_diff", "aesthetic@10, aligned - teacher_rerank", 1.0),
)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and np.isfinite(x)


def summarise_seeds(metrics: Mapping[str, Mapping[str, Any]],
                    rows: Sequence[tuple[str, str, str, float]] = STUDY_ROWS) -> dict[str, Any]:
    """Summarise the same comparisons over runs.

    Args:
        metrics: run name (``"world0/seed1"``) -> that run's ``metrics.json`` dict.
        rows: (comparison, metric, label, scale) to summarise; a row no run has is skipped.

    Returns:
        ``{"runs": [...], "rows": [{label, comparison, metric, scale, per_run: {run: {mean,
        ci_low, ci_high}}, mean, sd, min, max, n_runs, ci_excludes_0_in_all,
        ci_above_0_in_all, ci_below_0_in_all}]}``; values in the metric's own units (multiply
        by ``scale`` to print).
    """
    runs = list(metrics)
    out_rows = []
    for comp, key, label, scale in rows:
        per = {}
        for run in runs:
            d = ((metrics[run].get("comparisons") or {}).get(comp) or {}).get(key)
            if d and _finite(d.get("mean")):
                per[run] = {k: float(d[k]) for k in ("mean", "ci_low", "ci_high") if k in d}
        if not per:
            continue
        means = np.array([v["mean"] for v in per.values()])
        lows = [v.get("ci_low", np.nan) for v in per.values()]
        highs = [v.get("ci_high", np.nan) for v in per.values()]
        out_rows.append({
            "label": label, "comparison": comp, "metric": key, "scale": scale,
            "per_run": per, "n_runs": len(per), "mean": float(means.mean()),
            "sd": float(means.std(ddof=1)) if len(means) > 1 else 0.0,
            "min": float(means.min()), "max": float(means.max()),
            "ci_above_0_in_all": bool(all(lo > 0 for lo in lows)),
            "ci_below_0_in_all": bool(all(hi < 0 for hi in highs)),
            "ci_excludes_0_in_all": bool(all(lo > 0 or hi < 0
                                             for lo, hi in zip(lows, highs, strict=True))),
        })
    return {"runs": runs, "rows": out_rows}


def study_table(summary: Mapping[str, Any]) -> str:
    """The summary as a fixed-width table: one line per comparison, each run's mean [CI]."""
    runs = summary["runs"]
    head = f"{'comparison':<42} {'mean':>8} {'sd':>7}  " + "  ".join(f"{r:>24}" for r in runs)
    lines = [head, "-" * len(head)]
    for row in summary["rows"]:
        s = row["scale"]
        cells = []
        for r in runs:
            v = row["per_run"].get(r)
            cells.append(f"{'n/a':>24}" if v is None else
                         f"{s * v['mean']:+8.3f} [{s * v['ci_low']:+.3f}, {s * v['ci_high']:+.3f}]"
                         .rjust(24))
        flag = " *" if row["ci_excludes_0_in_all"] else ""
        lines.append(f"{row['label']:<42} {s * row['mean']:+8.3f} {s * row['sd']:7.3f}  "
                     + "  ".join(cells) + flag)
    lines.append("* the 95% CI excludes 0 in every run")
    return "\n".join(lines)


def study_figure(summary: Mapping[str, Any], path: str) -> None:
    """One panel per comparison: each run's mean and 95% CI, the mean over runs dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    if not rows:
        return
    cols = min(4, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows, strict=False):  # extra axes are switched off
        s = row["scale"]
        names = list(row["per_run"])
        m = np.array([row["per_run"][n]["mean"] for n in names]) * s
        lo = np.array([row["per_run"][n].get("ci_low", np.nan) for n in names]) * s
        hi = np.array([row["per_run"][n].get("ci_high", np.nan) for n in names]) * s
        x = np.arange(len(names))
        ax.errorbar(x, m, yerr=[m - lo, hi - m], fmt="o", capsize=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.axhline(row["mean"] * s, color="tab:red", ls="--", lw=0.8)
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        ax.set_title(row["label"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
