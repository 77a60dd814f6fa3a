"""The sweep phase: each baseline's knob swept, the setting chosen at equal or better relevance
on the selection queries (``sweep.select_split``, validation) and the aligned model compared
with it on the held-out queries (the pure parts: :mod:`aligner.evaluation.sweeps`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from aligner.evaluation.phases import EvalState
from aligner.evaluation.systems import System

log = logging.getLogger(__name__)


def baseline_makers(st: EvalState) -> dict[str, tuple[list[float], Callable[[float], System]]]:
    """Per swept family: (knob values, knob -> system over the base)."""
    from aligner.evaluation.build import (
        cascade_system,
        direction_images,
        query_shift_system,
        rephrase_system,
    )

    cfg, base, aes = st.cfg, st.base, st.aesthetic
    sw, settings = cfg.sweep, cfg.baseline
    makers: dict[str, tuple[list[float], Callable[[float], System]]] = {
        "cascade": (sw.cascade_weights, lambda w: cascade_system(
            base, aes, settings, name=f"cascade w={w}", weight=w)),
        "query_shift": (sw.shift_weights, lambda w: query_shift_system(
            base, aes, settings, name=f"shift w={w}", weight=w,
            direction_from=direction_images(st.gallery))),
    }
    if "rephrase" in st.systems:
        table = st.systems["rephrase"].table
        makers["rephrase"] = (sw.rephrase_mixes, lambda m: rephrase_system(
            base, table, settings, name=f"rephrase mix={m}", mix=m))
    if "teacher_rerank" in st.systems:
        teacher = st.systems["teacher_rerank"]
        makers["teacher_rerank"] = (sw.teacher_weights, lambda w: teacher.reweighted(
            w, name=f"teacher_rerank w={w}"))
    return makers


@dataclass
class QuerySet:
    """Queries and captions a setting is measured on (the selection or the held-out ones).

    Attributes:
        split: the queries' split.
        qids, texts: the queries.
        cap_texts, targets, subset: caption recall (captions, their gallery indices, the
            gallery indices searched); ``cap_texts`` None: no recall.
        recall_on: which captions, in words.
        gallery_split: the gallery split the queries search (None: every image).
        searched: its gallery indices.
    """

    split: str
    qids: list[str]
    texts: list[str]
    cap_texts: list[str] | None
    targets: np.ndarray | None
    subset: np.ndarray | None
    recall_on: str
    gallery_split: str | None = None
    searched: np.ndarray | None = None


def held_out_set(st: EvalState) -> QuerySet:
    """The held-out queries and captions every result is reported on."""
    cap = st.cap_texts if st.hits else None
    return QuerySet(st.cfg.query_split, st.qids, st.texts, cap, st.targets, st.rec_gallery,
                    f"{st.rec_info.get('gallery', '')} captions" if cap is not None else "none",
                    st.held_split, st.held)


def selection_set(st: EvalState, held: QuerySet) -> QuerySet:
    """The selection queries (:func:`aligner.evaluation.phases.selection_queries`), searching
    the selection gallery (:func:`aligner.evaluation.phases.selection_gallery`: the val
    images), and the captions of the gallery's images of the same split (at most
    ``max_recall_queries``, default 2000, seeded); a gallery without such images keeps the
    held-out captions (said in ``recall_on``)."""
    cfg, g = st.cfg, st.gallery
    if st.sel_qids is st.qids:
        return held
    cap, targets, subset, where = held.cap_texts, held.targets, held.subset, held.recall_on
    if cap is not None and g.captions is not None:
        idx = (np.flatnonzero(g.split == st.sel_split) if g.split is not None
               else np.zeros(0, int))
        caps = [g.captions[i] or "" for i in idx]
        keep = np.flatnonzero([bool(c) for c in caps])
        if len(keep):
            limit = cfg.max_recall_queries or 2000
            if len(keep) > limit:
                keep = np.sort(np.random.default_rng([cfg.seed, 6]).choice(keep, limit, False))
            cap, targets, subset = [caps[i] for i in keep], idx[keep], idx
            where = f"{st.sel_split} split captions ({len(keep)} among {len(idx)} images)"
        else:
            where += f" (the gallery has no {st.sel_split} images with captions)"
    return QuerySet(st.sel_split, st.sel_qids, st.sel_texts, cap, targets, subset, where,
                    st.sel_gallery, st.sel_subset)


def sweep_baselines(st: EvalState) -> None:
    """Fill ``st.frontier`` and ``st.equal_relevance`` (needs the oracle and the aligned
    model; skipped with ``sweep.enabled=false``).

    Every setting is measured on the selection queries and on the held-out ones; the best
    setting at equal or better relevance is chosen on the selection queries (the aligned
    model's precision and recall measured there too) and reported on the held-out queries
    (:func:`aligner.evaluation.sweeps.choose_and_report`).
    """
    cfg = st.cfg
    if not (cfg.sweep.enabled and st.ev is not None and cfg.aligned_name in st.systems):
        return
    from aligner.evaluation.oracle_metrics import paired_difference
    from aligner.evaluation.stats import ci_dict, finite_ci_dict
    from aligner.evaluation.sweeps import Point, choose_and_report, frontier_rows
    from aligner.evaluation.systems import system_recall_hits

    ev, per, hits, k = st.ev, st.per, st.hits, cfg.k
    aligned, slack = cfg.aligned_name, cfg.sweep.equal_relevance_slack
    primary, prec = st.primary, f"precision@{k}"
    held = held_out_set(st)
    sel = selection_set(st, held)
    same_q, same_c = sel.qids is held.qids, sel.cap_texts is held.cap_texts

    def query_metrics(s: System, qs: QuerySet) -> dict[str, np.ndarray]:
        _, top = s.search(qs.texts, k, ids=qs.qids, subset=qs.searched)
        g = ev.graded(qs.qids, top, k, qs.gallery_split)
        return {primary: g[primary], prec: g[prec]}

    def recall(s: System, qs: QuerySet) -> np.ndarray | None:
        if qs.cap_texts is None or s.caption_transform == "n/a":
            return None
        return system_recall_hits(s, qs.cap_texts, qs.targets,
                                  subset=qs.subset)["r@10"].astype(float)

    def mean(x: np.ndarray | None) -> float | None:
        return None if x is None else float(np.mean(x))

    t0 = time.time()
    a_prec = float(np.mean(per[aligned][prec]))
    a_rec = mean(hits[aligned]["r@10"]) if aligned in hits else None
    b_rec = mean(hits[cfg.base_name]["r@10"]) if cfg.base_name in hits else None
    a_sys, b_sys = st.systems[aligned], st.base
    a_prec_sel = a_prec if same_q else float(np.mean(query_metrics(a_sys, sel)[prec]))
    a_rec_sel = a_rec if same_c else mean(recall(a_sys, sel))
    b_rec_sel = b_rec if same_c else mean(recall(b_sys, sel))
    frontier: dict[str, list[dict]] = {}
    iso: dict[str, dict[str, Any]] = {}
    for fam, (params, make) in baseline_makers(st).items():
        if fam not in cfg.baselines:
            continue
        rep_pts, sel_pts = [], []
        for w in params:
            s = make(float(w))
            pq_rep, rec_rep = query_metrics(s, held), recall(s, held)
            pq_sel = pq_rep if same_q else query_metrics(s, sel)
            rec_sel = rec_rep if same_c else recall(s, sel)
            rep_pts.append(Point(fam, float(w), pq_rep, rec_rep))
            sel_pts.append(Point(fam, float(w), pq_sel, rec_sel))
        rows = frontier_rows(rep_pts, primary, prec, ci_dict)
        for row, p in zip(rows, sel_pts, strict=True):
            row["selection"] = {"split": sel.split, primary: p.mean(primary),
                                prec: p.mean(prec), "recall@10": mean(p.recall)}
        frontier[fam] = rows
        chosen = choose_and_report(sel_pts, rep_pts, primary, prec, a_prec_sel, a_rec_sel,
                                   inner_recall=b_rec_sel, slack=slack)
        if chosen is None:
            iso[fam] = {"setting": None, "chosen_on": sel.split, "note": (
                f"no {fam} setting is as relevant as {aligned} on the {sel.split} queries "
                f"(precision@{k} >= {a_prec_sel - slack:.3f}"
                + (f", recall@10 >= {a_rec_sel - slack:.3f})" if a_rec_sel is not None
                   else ")"))}
            continue
        p_sel, best = chosen
        iso[fam] = {
            "setting": best.label, "param": None if np.isinf(best.param) else best.param,
            "chosen_on": sel.split, "reported_on": held.split,
            f"{primary}_diff": paired_difference(per[aligned][primary], best.per_query[primary]),
            "chosen_by": (f"the highest {sel.split} {primary} over the {sel.gallery_split or 'whole'} "
                          f"gallery among settings as relevant as {aligned} there"),
            f"{prec}_diff": paired_difference(per[aligned][prec], best.per_query[prec]),
            primary: finite_ci_dict(best.per_query[primary]), prec: best.mean(prec),
            "recall@10": best.mean("recall@10") if best.recall is not None else b_rec,
            "selection": {primary: p_sel.mean(primary), prec: p_sel.mean(prec),
                          "recall@10": (p_sel.mean("recall@10") if p_sel.recall is not None
                                        else b_rec_sel)}}
    log.info("swept %s in %.1f s (chosen on %d %s queries, reported on %d %s queries)",
             {f: len(v) for f, v in frontier.items()}, time.time() - t0, len(sel.qids),
             sel.split, len(held.qids), held.split)
    st.frontier = frontier
    st.equal_relevance = {
        "chosen_on": sel.split, "reported_on": held.split, "fallback": st.sel_fallback,
        "selection": {"queries": len(sel.qids), "recall": sel.recall_on},
        "aligned": {prec: a_prec, "recall@10": a_rec},
        "aligned_selection": {prec: a_prec_sel, "recall@10": a_rec_sel},
        "slack": slack, "families": iso}
