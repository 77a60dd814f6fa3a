"""The sweep phase: each baseline's knob swept over the held-out queries, and the aligned
model compared with each family's best setting at equal or better relevance (the pure parts:
:mod:`aligner.evaluation.sweeps`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from aligner.evaluation.phases import EvalState
from aligner.evaluation.systems import System

log = logging.getLogger(__name__)


def baseline_makers(st: EvalState) -> dict[str, tuple[list[float], Callable[[float], System]]]:
    """Per swept family: (knob values, knob -> system over the base)."""
    from aligner.evaluation.build import cascade_system, query_shift_system, rephrase_system

    cfg, base, aes = st.cfg, st.base, st.aesthetic
    sw, settings = cfg.sweep, cfg.baseline
    makers: dict[str, tuple[list[float], Callable[[float], System]]] = {
        "cascade": (sw.cascade_weights, lambda w: cascade_system(
            base, aes, settings, name=f"cascade w={w}", weight=w)),
        "query_shift": (sw.shift_weights, lambda w: query_shift_system(
            base, aes, settings, name=f"shift w={w}", weight=w)),
    }
    if "rephrase" in st.systems:
        table = st.systems["rephrase"].table
        makers["rephrase"] = (sw.rephrase_mixes, lambda m: rephrase_system(
            base, table, settings, name=f"rephrase mix={m}", mix=m))
    return makers


def sweep_baselines(st: EvalState) -> None:
    """Fill ``st.frontier`` and ``st.equal_relevance`` (needs the oracle and the aligned
    model; skipped with ``sweep.enabled=false``)."""
    cfg = st.cfg
    if not (cfg.sweep.enabled and st.ev is not None and cfg.aligned_name in st.systems):
        return
    from aligner.evaluation.oracle_metrics import aesthetic_at_k, paired_difference
    from aligner.evaluation.stats import ci_dict
    from aligner.evaluation.sweeps import Point, best_at_equal_relevance, frontier_rows
    from aligner.evaluation.systems import system_recall_hits

    ev, per, hits, k = st.ev, st.per, st.hits, cfg.k
    aligned, slack = cfg.aligned_name, cfg.sweep.equal_relevance_slack
    cap_texts = st.cap_texts if hits else None
    primary, prec = f"aesthetic@{k}", f"precision@{k}"
    t0 = time.time()
    frontier: dict[str, list[dict]] = {}
    iso: dict[str, dict[str, Any]] = {}
    a_prec = float(np.mean(per[aligned][prec]))
    a_rec = float(np.mean(hits[aligned]["r@10"])) if aligned in hits else None
    b_rec = float(np.mean(hits[cfg.base_name]["r@10"])) if cfg.base_name in hits else None
    for fam, (params, make) in baseline_makers(st).items():
        if fam not in cfg.baselines:
            continue
        points = []
        for w in params:
            s = make(float(w))
            _, top = s.search(st.texts, k, ids=st.qids)
            pq = {primary: aesthetic_at_k(ev.beauty, top, k),
                  prec: ev.relevance(st.qids, top[:, :k])}
            rec = None
            if cap_texts is not None and s.caption_transform != "n/a":
                rec = system_recall_hits(s, cap_texts, st.targets, subset=st.rec_gallery)["r@10"]
            points.append(Point(fam, float(w), pq, None if rec is None else rec.astype(float)))
        frontier[fam] = frontier_rows(points, primary, prec, ci_dict)
        best = best_at_equal_relevance(points, primary, prec, a_prec, a_rec, inner_recall=b_rec,
                                       slack=slack)
        if best is None:
            iso[fam] = {"setting": None, "note": (
                f"no {fam} setting is as relevant as {aligned} (precision@{k} >= "
                f"{a_prec - slack:.3f}" + (f", recall@10 >= {a_rec - slack:.3f})"
                                           if a_rec is not None else ")"))}
            continue
        iso[fam] = {"setting": best.label, f"{primary}_diff": paired_difference(
            per[aligned][primary], best.per_query[primary]),
            f"{prec}_diff": paired_difference(per[aligned][prec], best.per_query[prec]),
            primary: ci_dict(best.per_query[primary]), prec: best.mean(prec),
            "recall@10": best.mean("recall@10") if best.recall is not None else b_rec}
    log.info("swept %s in %.1f s", {f: len(v) for f, v in frontier.items()}, time.time() - t0)
    st.frontier = frontier
    st.equal_relevance = {"aligned": {prec: a_prec, "recall@10": a_rec}, "slack": slack,
                          "families": iso}
