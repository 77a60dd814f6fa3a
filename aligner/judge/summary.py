"""The judge's summary: win rates of system b over system a with bootstrap CIs over queries.

From a judgments table (:mod:`aligner.data.judgments`; failed rows are counted, not used):

* ``win`` - the share of queries where system b's row won (both orders agreed);
* ``loss`` - where system a's row won; ``similar`` - the rest;
* ``win_plus_half_similar`` - ``win + similar / 2``, the paper's tie-splitting score (0.5:
  no preference);

overall and per aspect, each with a percentile bootstrap 95% CI that resamples *queries*
(all rows of a drawn query together), plus how often the two orders agreed and how the
decisions were read. A proxy judge is named as a proxy in the summary and its sentence.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from aligner.data.judgments import ASPECT_COLUMNS


def query_bootstrap(values: np.ndarray, groups: np.ndarray, n_boot: int = 2000,
                    alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """Mean of ``values`` with a percentile bootstrap CI resampling whole ``groups``.

    Returns:
        ``{"mean", "ci_low", "ci_high", "n", "queries"}`` (NaN with no rows).

    Raises:
        ValueError: values and groups of different lengths.
    """
    v = np.asarray(values, np.float64)
    g = np.asarray(groups)
    if v.shape != g.shape:
        raise ValueError(f"values {v.shape} and groups {g.shape} differ")
    if v.size == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
                "n": 0, "queries": 0}
    _, inv = np.unique(g, return_inverse=True)
    n_g = int(inv.max()) + 1
    count = np.bincount(inv, minlength=n_g).astype(np.float64)
    total = np.bincount(inv, weights=v, minlength=n_g)
    idx = np.random.default_rng(seed).integers(0, n_g, (n_boot, n_g))
    means = total[idx].sum(1) / count[idx].sum(1)
    return {"mean": float(v.mean()), "ci_low": float(np.quantile(means, alpha / 2)),
            "ci_high": float(np.quantile(means, 1 - alpha / 2)), "n": int(v.size),
            "queries": n_g}


def rates(sides: list[str], groups: list[str], n_boot: int = 2000,
          seed: int = 0) -> dict[str, dict[str, Any]]:
    """``win`` / ``loss`` / ``similar`` / ``win_plus_half_similar`` of side b, with CIs."""
    s = np.asarray(sides, dtype=object)
    g = np.asarray(groups, dtype=object)
    win, loss = (s == "b").astype(float), (s == "a").astype(float)
    sim = (s == "similar").astype(float)
    return {"win": query_bootstrap(win, g, n_boot, seed=seed),
            "loss": query_bootstrap(loss, g, n_boot, seed=seed),
            "similar": query_bootstrap(sim, g, n_boot, seed=seed),
            "win_plus_half_similar": query_bootstrap(win + sim / 2, g, n_boot, seed=seed)}


def _fmt(d: dict[str, Any]) -> str:
    return f"{d['mean']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


def summarise_judgments(table: pa.Table, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The summary of a judgments table (see the module docstring).

    Raises:
        ValueError: rows of more than one pair of systems or more than one judge.
    """
    rows = table.to_pylist()
    pairs = {(r["system_a"], r["system_b"]) for r in rows}
    judges = {(r["judge"], bool(r["proxy"]), r["style"], r["prompt"]) for r in rows}
    if len(pairs) > 1 or len(judges) > 1:
        raise ValueError(f"a summary covers one pair of systems and one judge; found "
                         f"{sorted(pairs)} and {sorted(judges)}")
    system_a, system_b = pairs.pop() if pairs else ("", "")
    judge, proxy, style, prompt = judges.pop() if judges else ("", False, "", "")
    ok = [r for r in rows if r["status"] == "ok"]
    failed = Counter(str(r["error"]).split(":", 1)[0] for r in rows if r["status"] != "ok")
    groups = [r["query_id"] for r in ok]
    out: dict[str, Any] = {
        "system_a": system_a, "system_b": system_b, "judge": judge, "proxy": proxy,
        "style": style, "prompt": prompt, "pairs": len(rows), "judged": len(ok),
        "failed": sum(failed.values()), "failed_by_reason": dict(failed.most_common()),
        "queries": len(set(groups)),
        "overall": rates([r["winner"] for r in ok], groups, n_boot, seed),
        "aspects": {}, "decision": dict(Counter(r["decision"] for r in ok).most_common()),
        "orders_agree": (float(np.mean([bool(r["orders_agree"]) for r in ok])) if ok
                         else float("nan")),
        "ci": "percentile bootstrap 95%, resampling queries",
    }
    for a in ASPECT_COLUMNS:
        have = [r for r in ok if r[a]]
        if have:
            out["aspects"][a] = rates([r[a] for r in have], [r["query_id"] for r in have],
                                      n_boot, seed)
    who = f"{judge} (a proxy, not an LMM)" if proxy else judge
    if ok:
        o = out["overall"]
        out["sentence"] = (f"{system_b} vs {system_a}, judged by {who} on {out['queries']} "
                           f"queries: win rate {_fmt(o['win'])}, win + similar/2 "
                           f"{_fmt(o['win_plus_half_similar'])} (orders agreed on "
                           f"{out['orders_agree']:.0%}).")
    else:
        out["sentence"] = f"{system_b} vs {system_a}: no pair could be judged by {who}."
    return out
