"""PNG plots of a suite run's figures (matplotlib, Agg backend: no display needed).

* ``embed_scaling.png`` - embedding time and peak memory against N, log-log, with the fitted
  exponents in the legends (time ~ N^1 is linear, memory ~ N^0 is flat);
* ``index_scaling.png`` - build time, one-thread QPS and recall@10 against N per index;
* ``align_throughput.png`` - training pairs/s: plain loop, Ray Train 1 and 2 workers;
* ``serve_latency.png`` - p50 / p99 latency and requests/s against client concurrency.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend


def _slope(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _save(f: Any, path: Path) -> Path:
    """Lay out, write and close a figure; returns its path."""
    f.tight_layout()
    f.savefig(path, dpi=110)
    plt.close(f)
    return path


def embed_plot(fig: dict[str, Any], path: Path) -> Path:
    s = fig["series"]
    n = [p["n"] for p in s]
    f, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.loglog(n, [p["seconds"] for p in s], "o-",
             label=f"whole run (slope {_slope(fig['slopes']['seconds'])})")
    a.loglog(n, [p["after_first_rows_s"] for p in s], "s--",
             label=f"after the first rows (slope {_slope(fig['slopes']['after_first_rows_s'])})")
    a.set(xlabel="images N", ylabel="seconds", title=f"embedding time ({fig['runner']})")
    b.loglog(n, [p["peak_pss_mb"] for p in s], "o-",
             label=f"peak PSS (slope {_slope(fig['slopes']['peak_pss_mb'])})")
    b.loglog(n, [p["peak_rss_mb"] for p in s], "s--",
             label=f"peak RSS sum (slope {_slope(fig['slopes']['peak_rss_mb'])})")
    b.set(xlabel="images N", ylabel="MB", title="peak memory, all processes")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(f, path)


def index_plot(fig: dict[str, Any], path: Path) -> Path:
    rows = fig["rows"]
    f, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    builds: dict[str, dict[int, float]] = {}
    for r in rows:
        builds.setdefault(r["family"], {})[r["n"]] = r["build_s"]
    for name, pts in builds.items():
        xs = sorted(pts)
        slope = fig["build_time_slopes"].get(name)
        axes[0].loglog(xs, [pts[x] for x in xs], "o-", label=f"{name} (slope {_slope(slope)})")
    settings: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = r["family"] + ("" if r["params"] == "-" else f" {r['params']}")
        settings.setdefault(label, []).append(r)
    for label, rs in settings.items():
        rs = sorted(rs, key=lambda r: r["n"])
        axes[1].loglog([r["n"] for r in rs], [r["qps_1"] for r in rs], "o-", label=label)
        axes[2].semilogx([r["n"] for r in rs], [r["recall_at_10"] for r in rs], "o-",
                         label=label)
    axes[0].set(xlabel="vectors N", ylabel="seconds", title="index build time")
    axes[1].set(xlabel="vectors N", ylabel="queries/s", title="QPS, one thread")
    axes[2].set(xlabel="vectors N", ylabel="recall@10 vs Flat", title="recall@10", ylim=(0, 1.02))
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=6, loc="lower left")
    return _save(f, path)


def align_plot(fig: dict[str, Any], path: Path) -> Path:
    rows = fig["rows"]
    f, ax = plt.subplots(figsize=(7, 4))
    names = [r["setting"] for r in rows]
    vals = [r["steady_pairs_per_s"] for r in rows]
    bars = ax.bar(range(len(rows)), vals, color=["#888", "#4a7", "#27a"][: len(rows)])
    for bar, r in zip(bars, rows, strict=True):
        ax.annotate(f"{r['vs_plain']:.2f}x plain" if r["vs_plain"] else "",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set(ylabel="steady pairs/s", title=f"preference fine-tune throughput "
           f"({fig['pairs_per_step']} pairs/step, {fig['steps']} steps)")
    return _save(f, path)


def serve_plot(fig: dict[str, Any], path: Path) -> Path:
    f, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    by: dict[str, list[dict[str, Any]]] = {}
    for r in fig["rows"]:
        if r.get("log", "cycle") == "cycle":
            by.setdefault(f"{r.get('variant', '')}: {r['setting']}", []).append(r)
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r["concurrency"])
        c = [r["concurrency"] for r in rs]
        line = a.plot(c, [r["p50_ms"] for r in rs], "o-", label=f"{name} p50")[0]
        a.plot(c, [r["p99_ms"] for r in rs], "x:", color=line.get_color(), label=f"{name} p99")
        b.plot(c, [r["per_s"] for r in rs], "o-", label=name)
    a.axhline(fig["in_process"]["p50_ms"], color="k", lw=0.8, ls="--",
              label="in-process p50 (C=1)")
    a.set(xscale="log", yscale="log", xlabel="connections (wrk)", ylabel="ms",
          title="latency through Serve (HTTP)")
    b.set(xscale="log", xlabel="connections (wrk)", ylabel="requests/s", title="throughput")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(f, path)


PLOTS = {"embed": ("embed_scaling.png", embed_plot), "index": ("index_scaling.png", index_plot),
         "align": ("align_throughput.png", align_plot),
         "serve": ("serve_latency.png", serve_plot)}


def write_plots(figures: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per step with figures (steps that failed or did not run give none)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for step, (name, plot) in PLOTS.items():
        fig = figures.get(step)
        if fig and "error" not in fig and "skipped" not in fig:
            paths.append(plot(fig, out / name))
    return paths
