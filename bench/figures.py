"""Derived figures of a suite run: the ratios and growth exponents, from the raw step results.

Every ratio divides two numbers measured in the same run (side by side, under the same
machine load): they are what carries over to another machine, where absolute times do not.
A growth exponent is the slope of a least-squares line through ``log y`` against ``log N``:
1 means linear, 0 flat. Steps that did not run give no figures.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np


def loglog_slope(n: list[float], y: list[float]) -> float | None:
    """Slope of ``log y`` on ``log n`` (None with fewer than two distinct positive points)."""
    pts = [(a, b) for a, b in zip(n, y, strict=True) if a > 0 and b > 0]
    if len({a for a, _ in pts}) < 2:
        return None
    x, v = np.log([a for a, _ in pts]), np.log([b for _, b in pts])
    return float(np.polyfit(x, v, 1)[0])


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def embed_figures(r: dict[str, Any]) -> dict[str, Any]:
    """Throughput vs the plain loop at N, and the time / memory series with their slopes."""
    base = r["plain"]["rows_per_s"]
    job = r["job"]
    runner = r.get("runner", "ray job")
    rows = [{"setting": "plain loop (decode + preprocess + score + encode)",
             "rows_per_s": base, "vs_plain": 1.0},
            {"setting": "plain loop without the score",
             "rows_per_s": r["plain_no_score"]["rows_per_s"],
             "vs_plain": _ratio(r["plain_no_score"]["rows_per_s"], base)}]
    if runner == "ray job":
        whole = job["rows_in"] / job["pipeline_s"]
        rows += [{"setting": "Ray Data job, whole run (incl. start-up)", "rows_per_s": whole,
                  "vs_plain": _ratio(whole, base)},
                 {"setting": "Ray Data job, steady state (after the first rows)",
                  "rows_per_s": job["steady_rows_per_s"],
                  "vs_plain": _ratio(job["steady_rows_per_s"], base)}]
    s = r["series"]
    n = [p["n"] for p in s]
    return {
        "n": r["n"], "runner": runner, "throughput": rows, "series": s,
        "slopes": {"seconds": loglog_slope(n, [p["seconds"] for p in s]),
                   "after_first_rows_s": loglog_slope(n, [p["after_first_rows_s"] for p in s]),
                   "peak_pss_mb": loglog_slope(n, [p["peak_pss_mb"] for p in s]),
                   "peak_rss_mb": loglog_slope(n, [p["peak_rss_mb"] for p in s])},
        "memory_ratio_last_over_first": _ratio(s[-1]["peak_pss_mb"], s[0]["peak_pss_mb"]),
        "size_ratio_last_over_first": _ratio(s[-1]["n"], s[0]["n"]),
    }


def family(index: str) -> str:
    """The factory with its IVF list count written as ``{L}`` (L grows with N), so one
    factory's points at several N form one series."""
    return re.sub(r"IVF\d+", "IVF{L}", index)


def index_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per index and search setting: ratios to Flat at the same N; build-time exponents."""
    flat = {r["n"]: r for r in rows if r["index"] == "Flat"}
    table, skipped = [], []
    for r in rows:
        if "skipped" in r:
            skipped.append({"n": r["n"], "index": r["index"], "reason": r["skipped"]})
            continue
        f = flat[r["n"]]
        table.append({
            "n": r["n"], "index": r["index"], "family": family(r["index"]),
            "params": r["params"], "build_s": r["build_s"],
            "build_vs_flat": _ratio(r["build_s"], f["build_s"]), "mb": r["bytes"] / 1e6,
            "size_vs_flat": _ratio(r["bytes"], f["bytes"]), "qps_1": r["qps_1"],
            "qps_all": r["qps_all"], "qps_1_vs_flat": _ratio(r["qps_1"], r["flat_qps_1"]),
            "qps_all_vs_flat": _ratio(r["qps_all"], r["flat_qps_all"]),
            "recall_at_10": r["recall"]})
    growth = {}
    for name in dict.fromkeys(t["family"] for t in table):
        builds = {t["n"]: t["build_s"] for t in table if t["family"] == name}
        growth[name] = loglog_slope(list(builds), list(builds.values()))
    return {"rows": table, "skipped_rows": skipped, "build_time_slopes": growth}


def align_figures(r: dict[str, Any]) -> dict[str, Any]:
    """Steady pairs/s per setting, against the plain loop and against 1 worker."""
    res = r["results"]
    plain = next(v for k, v in res.items() if k.startswith("plain"))["steady_pairs_per_s"]
    one = next((v for k, v in res.items() if "1 worker" in k), {}).get("steady_pairs_per_s")
    rows = [{"setting": k, "steady_pairs_per_s": v["steady_pairs_per_s"],
             "whole_run_pairs_per_s": v["whole_run_pairs_per_s"], "wall_s": v["wall_s"],
             "vs_plain": _ratio(v["steady_pairs_per_s"], plain),
             "vs_1_worker": _ratio(v["steady_pairs_per_s"], one)} for k, v in res.items()]
    return {"steps": r["args"]["steps"], "pairs_per_step": r["args"]["pairs"], "rows": rows}


def serve_figures(r: dict[str, Any]) -> dict[str, Any]:
    """Latency / throughput per variant, setting, query log and connections (wrk); each
    variant's ratios to its own floor; the query cache's simulated hit rates."""
    ref = r["in_process"]
    rows = [{**h, "p50_vs_in_process": _ratio(h["p50_ms"], ref["p50_ms"])}
            for v in r["variants"] for h in v["rows"]]
    return {"in_process": ref, "rows": rows, "client": r.get("client", "wrk"),
            "ratios": {v["variant"]: v["ratios"] for v in r["variants"] if "ratios" in v},
            "failed": [v["variant"] for v in r["variants"] if "ratios" not in v],
            "zipf_lru_hit_rate_by_capacity": r.get("zipf_lru_hit_rate_by_capacity", {})}


def reward_figures(r: dict[str, Any]) -> dict[str, Any]:
    return {"images": r["images"], "images_per_s": r["images_per_s"],
            "ratio_batched_over_one_at_a_time": r["ratio_batched_over_one_at_a_time"],
            "max_abs_difference": r["max_abs_difference"]}


def judge_figures(r: dict[str, Any]) -> dict[str, Any]:
    """Judgments/s per back end and its ratio to the default proxy's."""
    res = r["results"]
    proxy = res.get("proxy", {}).get("judgments_per_s")
    rows = []
    for name, v in res.items():
        if "skipped" in v:
            rows.append({"backend": name, "skipped": v["skipped"]})
        else:
            rows.append({"backend": name, "judge": v["judge"],
                         "judgments_per_s": v["judgments_per_s"],
                         "vs_proxy": _ratio(v["judgments_per_s"], proxy)})
    return {"pairs": r["pairs"], "k": r["k"], "rows": rows}


def gpu_figures(r: dict[str, Any]) -> dict[str, Any]:
    if "skipped" in r:
        return {"skipped": r["skipped"], "anchor": r.get("anchor")}
    return {"embed": r["embed"], "faiss": r["faiss"]}


DERIVE = {"embed": embed_figures, "index": index_figures, "align": align_figures,
          "serve": serve_figures, "reward": reward_figures, "judge": judge_figures,
          "gpu": gpu_figures}


def derive(steps: dict[str, Any]) -> dict[str, Any]:
    """Figures of every step that produced a result (a step whose result cannot be read is
    recorded with the reason instead of stopping the report)."""
    out = {}
    for name, rec in steps.items():
        if "result" not in rec or name not in DERIVE:
            continue
        try:
            out[name] = DERIVE[name](rec["result"])
        except (KeyError, TypeError, ValueError, StopIteration) as e:
            out[name] = {"error": f"cannot read the {name} result: {type(e).__name__}: {e}"}
    return out
