"""Write a suite run: ``results.json``, ``RESULTS.md`` (tables) and ``plots/*.png``.

    python bench/report.py bench/results.json            # re-render RESULTS.md and the plots

:func:`write_all` is what ``bench/run_all.py`` calls at the end of a run; the command line
re-renders from a saved ``results.json`` (its figures are derived again from the raw results).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from figures import derive  # noqa: E402 - bench/ is not a package
from plots import PLOTS, write_plots  # noqa: E402


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def machine_md(m: dict[str, Any], suite: dict[str, Any]) -> list[str]:
    v = m["versions"]
    gpu = m["gpu"]["name"] if m["gpu"]["cuda"] else "none"
    git = m["git"]["commit"] or "unknown"
    return [
        f"Measured on {m['cpu_count']} CPUs ({m['cpu_model']}), {m['ram_gb']} GiB RAM, GPU: "
        f"{gpu}; Python {m['python']}, torch {v['torch']}, faiss {v['faiss-cpu'] or v['faiss-gpu']}, "
        f"ray {v['ray']}, open_clip {v['open_clip_torch']}; {m['date']}, git "
        f"{git[:12]}{' (with uncommitted changes)' if m['git']['dirty'] else ''}. Load average "
        f"{m['load_average']} before, {m.get('load_average_after', 'n/a')} after (1, 5 and 15 "
        f"minutes). Scale `{suite['scale']}`, {suite.get('wall_s', 0) / 60:.1f} minutes: "
        f"`{suite['command']}`.",
        "",
        "Absolute times belong to this machine and its load; the ratios (each measured side by "
        "side within one step of one run) and the growth exponents are what carries over to "
        "another machine.",
    ]


def embed_md(f: dict[str, Any]) -> list[str]:
    out = [f"### Embedding ({f['runner']}; throughput at N={f['n']:,})", ""]
    out += _table(["setting", "rows/s", "vs plain loop"],
                  [[r["setting"], _f(r["rows_per_s"], 0), _x(r["vs_plain"])]
                   for r in f["throughput"]])
    out += ["", "How cost grows with N (each N its own process):", ""]
    out += _table(["N", "seconds", "after first rows s", "rows/s", "peak PSS MB", "peak RSS MB",
                   "failed"],
                  [[f"{p['n']:,}", _f(p["seconds"]), _f(p["after_first_rows_s"]),
                    _f(p["rows_per_s"], 0), _f(p["peak_pss_mb"], 0), _f(p["peak_rss_mb"], 0),
                    p["rows_failed"]] for p in f["series"]])
    s = f["slopes"]
    out += ["", f"Fitted exponents (log-log): time {_f(s['seconds'], 2)} whole run, "
            f"{_f(s['after_first_rows_s'], 2)} after the first rows (1 = linear; the fixed "
            f"start-up pulls the whole-run exponent below 1 at small N); peak memory "
            f"{_f(s['peak_pss_mb'], 2)} PSS, {_f(s['peak_rss_mb'], 2)} RSS (0 = flat): "
            f"{_x(f['memory_ratio_last_over_first'])} the memory for "
            f"{_x(f['size_ratio_last_over_first'])} the images."]
    return out


def index_md(f: dict[str, Any]) -> list[str]:
    out = ["### Index (faiss through `build_index` / `SearchIndex`)", ""]
    out += _table(["N", "index", "params", "build s", "x Flat", "MB", "x Flat", "QPS 1 thr",
                   "x Flat", "QPS all", "x Flat", "recall@10"],
                  [[f"{r['n']:,}", r["index"], r["params"], _f(r["build_s"]),
                    _x(r["build_vs_flat"]), _f(r["mb"]), _x(r["size_vs_flat"]),
                    _f(r["qps_1"], 0), _x(r["qps_1_vs_flat"]), _f(r["qps_all"], 0),
                    _x(r["qps_all_vs_flat"]), _f(r["recall_at_10"], 3)] for r in f["rows"]])
    for s in f["skipped_rows"]:
        out.append(f"\n{s['index']} at N={s['n']:,} skipped: {s['reason']}")
    slopes = ", ".join(f"{k} {_f(v, 2)}" for k, v in f["build_time_slopes"].items())
    out += ["", f"Build-time exponents against N: {slopes}. QPS ratios divide by Flat timed "
            "again right after each index was built (same batch, same load)."]
    return out


def align_md(f: dict[str, Any]) -> list[str]:
    out = [f"### Training throughput ({f['pairs_per_step']} pairs per step, {f['steps']} steps)",
           ""]
    out += _table(["setting", "steady pairs/s", "vs plain", "vs 1 worker", "whole run pairs/s",
                   "wall s"],
                  [[r["setting"], _f(r["steady_pairs_per_s"]), _x(r["vs_plain"]),
                    _x(r["vs_1_worker"]), _f(r["whole_run_pairs_per_s"]), _f(r["wall_s"])]
                   for r in f["rows"]])
    return out


def serve_md(f: dict[str, Any]) -> list[str]:
    ref = f["in_process"]
    out = [f"### Search through Serve (HTTP on 127.0.0.1, {f['client']})", ""]
    out += _table(["variant", "setting", "query log", "connections", "p50 ms", "p99 ms",
                   "req/s", "errors", "cache hits", "p50 vs in-process"],
                  [["-", "in-process (encode + search)", "cycle", 1, ref["p50_ms"],
                    ref["p99_ms"], ref["per_s"], 0, "", "1.00x"]]
                  + [[r["variant"], r["setting"], r["log"], r["concurrency"], r["p50_ms"],
                      r["p99_ms"], r["per_s"], r["errors"],
                      "" if r.get("cache_hit_rate") is None else f"{r['cache_hit_rate']:.2f}",
                      _x(r["p50_vs_in_process"])] for r in f["rows"]])
    out += ["", "Search vs Serve's floor (an echo deployment in the same run), per variant:", ""]
    out += _table(["variant", "p50 / floor p50 (fewest connections)",
                   "req/s / floor req/s (most connections)", "p99 ms at 8"],
                  [[name, _x(v["floor_p50_ratio"]), _x(v["floor_throughput_ratio"]),
                    v.get("p99_ms_c8", "")] for name, v in f["ratios"].items()])
    if f["zipf_lru_hit_rate_by_capacity"]:
        out += ["", "Query cache hit rate on the heavy-tailed log, by capacity: "
                + ", ".join(f"{c}: {h:.2f}" for c, h in
                            f["zipf_lru_hit_rate_by_capacity"].items()) + "."]
    return out


def reward_md(f: dict[str, Any]) -> list[str]:
    r = f["images_per_s"]
    return ["### Reward-model scoring", "",
            f"Batched {_f(r['batched'], 0)} img/s, one image at a time {_f(r['one_at_a_time'], 0)}"
            f" img/s: {_x(f['ratio_batched_over_one_at_a_time'])} ({f['images']} images; max "
            f"|difference| {f['max_abs_difference']:.1e})."]


def judge_md(f: dict[str, Any]) -> list[str]:
    out = [f"### Judge back ends ({f['pairs']} pairs of rows of {f['k']}, both orders)", ""]
    out += _table(["back end", "judge", "judgments/s", "vs proxy"],
                  [[r["backend"], r.get("judge", "skipped: " + r.get("skipped", "")),
                    _f(r.get("judgments_per_s"), 2), _x(r.get("vs_proxy"))] for r in f["rows"]])
    return out


def gpu_md(f: dict[str, Any]) -> list[str]:
    out = ["### GPU", ""]
    if "skipped" in f:
        a = f.get("anchor") or {}
        return out + [f"Skipped: {f['skipped']}. The anchor it would be divided by: "
                      f"{_f(a.get('images_per_s'), 0)} img/s ({a.get('what', '')})."]
    e = f["embed"]
    out.append(f"{e['model']} {e['dtype']} on {e.get('gpu', e['device'])}: "
               f"{_f(e['images_per_s'], 0)} img/s, {_x(e['ratio_to_anchor'])} the anchor "
               f"({_f(e['anchor']['images_per_s'], 0)} img/s: {e['anchor']['what']}).")
    fa = f["faiss"]
    if "skipped" in fa:
        out.append(f"\nfaiss GPU vs CPU skipped: {fa['skipped']}")
    else:
        out += [""] + _table(["N", "index", "CPU QPS", "GPU QPS", "GPU / CPU", "CPU build s",
                              "GPU build s", "recall CPU", "recall GPU"],
                             [[f"{r['n']:,}", r["index"], _f(r["cpu_qps"], 0),
                               _f(r["gpu_qps"], 0), _x(r["gpu_over_cpu_qps"]),
                               _f(r["cpu_build_s"]), _f(r["gpu_build_s"]),
                               _f(r["cpu_recall"], 3), _f(r["gpu_recall"], 3)]
                              for r in fa["rows"]])
    return out


SECTIONS = {"embed": embed_md, "index": index_md, "align": align_md, "serve": serve_md,
            "reward": reward_md, "judge": judge_md, "gpu": gpu_md}


def markdown(results: dict[str, Any], plots: list[Path]) -> str:
    """RESULTS.md: the machine, one section per step (or why it is missing), the plots."""
    lines = ["# Benchmark results", "",
             "Written by `python -m bench` (bench/run_all.py) from `results.json`; do not edit "
             "by hand.", "", *machine_md(results["machine"], results["suite"]), ""]
    figs = results["figures"]
    reused = sorted({r["from_run"] for r in results["steps"].values() if r.get("from_run")})
    if reused:
        lines += [f"Steps marked _measured in an earlier run_ were kept from these runs of the "
                  f"suite (`--reuse`): {'; '.join(reused)}; the header above describes the "
                  "last invocation.", ""]
    for name, rec in results["steps"].items():
        wall = f" ({rec['wall_s']:.0f} s)" if "wall_s" in rec else ""
        if name in figs and "error" not in figs[name]:
            lines += SECTIONS[name](figs[name])
            if rec.get("note"):
                lines.append(f"\n_{rec['note']}._")
            if rec.get("from_run"):
                lines.append(f"\n_measured in an earlier run of the suite: {rec['from_run']}._")
            lines.append(f"\n_step wall time{wall or ': n/a'}_")
        elif name in figs:
            lines += [f"### {name}", "", figs[name]["error"]]
        else:
            why = rec.get("reason") or rec.get("error") or rec["status"]
            lines += [f"### {name}", "", f"{rec['status']}: {why}{wall}"]
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    return "\n".join(lines)


def write_all(results: dict[str, Any], out: Path) -> list[Path]:
    """Derive the figures into ``results`` and write results.json, RESULTS.md and the plots
    under ``out`` (stale plots of steps without figures are removed)."""
    results["figures"] = derive(results["steps"])
    plot_dir = out / "plots"
    plots = write_plots(results["figures"], plot_dir)
    for name, _ in PLOTS.values():
        if plot_dir / name not in plots and (plot_dir / name).exists():
            (plot_dir / name).unlink()
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "RESULTS.md").write_text(markdown(results, plots))
    return [out / "results.json", out / "RESULTS.md", *plots]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a results.json written by bench/run_all.py")
    ap.add_argument("--out", default="", help="where to write (default: beside results.json)")
    args = ap.parse_args(argv)
    src = Path(args.results)
    results = json.loads(src.read_text())
    paths = write_all(results, Path(args.out) if args.out else src.parent)
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
