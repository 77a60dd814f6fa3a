"""The last phases: per-system metrics and comparisons, teacher diagnostics and the
rephrasing premise, the metrics with their verdict, and image grids of top results."""

from __future__ import annotations

import numpy as np

from aligner.evaluation.gallery import GALLERY_VIEWS
from aligner.evaluation.phases import EvalState


def compare(st: EvalState) -> None:
    """Per system: metrics with CIs and paired differences against the base; the aligned
    model against every other system; all pairs on the primary metric."""
    from aligner.evaluation.hpir import paired_aspect_difference
    from aligner.evaluation.oracle_metrics import paired_difference
    from aligner.evaluation.stats import ci_dict, finite_ci_dict

    cfg, per, hits = st.cfg, st.per, st.hits
    base, aligned = cfg.base_name, cfg.aligned_name
    for name, s in st.systems.items():
        m = {"kind": s.kind, "describe": s.describe(), "timing": st.timing[name]}
        if name in st.built.info:
            m["model"] = st.built.info[name]
        if name in hits:
            m["recall"] = {k: ci_dict(v.astype(float)) for k, v in hits[name].items()}
            m["recall"]["transform"] = (f"n/a: {s.inner.name}'s recall (rephrasing applies to "
                                        "queries only)" if s.caption_transform == "n/a"
                                        else s.caption_transform)
        for key, v in per[name].items():
            m[key] = finite_ci_dict(v)
            if name != base and key.startswith(("ndcg@", "beauty_relevant@", "aesthetic@",
                                                "scorer_aesthetic@")):
                m[f"{key}_vs_base"] = paired_difference(v, per[base][key])
        if name in hits and name != base:
            m["recall@10_vs_base"] = paired_difference(hits[name]["r@10"].astype(float),
                                                       hits[base]["r@10"].astype(float))
        m.update(st.hpir.get(name, {}))
        st.out_systems[name] = m
    if aligned in st.systems:
        for other in st.systems:
            if other == aligned:
                continue
            c = {f"{key}_diff": paired_difference(per[aligned][key], per[other][key])
                 for key in per[aligned]}
            if aligned in hits and other in hits:
                c["recall@10_diff"] = paired_difference(hits[aligned]["r@10"].astype(float),
                                                        hits[other]["r@10"].astype(float))
            for aspect in st.hpir_result:
                c[f"hpir_{aspect}_diff"] = paired_aspect_difference(st.hpir_result, aspect,
                                                                    aligned, other)
            st.comparisons[other] = c
    else:
        st.notes.append(f"no system named {aligned!r}: no comparisons (models=NAME=CKPT, "
                        "aligned_name=...)")
    primary = st.primary
    st.pairwise = {a: {b: paired_difference(per[a][primary], per[b][primary])
                       for b in st.systems if b != a} for a in st.systems}


def teacher_diagnostics(path: str, ev) -> dict:
    """How a preference table agrees with the oracle (``{"error": ...}`` if unreadable)."""
    from aligner.data.preferences import read_preferences
    from aligner.evaluation.oracle_metrics import teacher_diagnostics as diagnose

    try:
        t = read_preferences(path)
    except (FileNotFoundError, ValueError) as e:
        return {"error": str(e)}
    w = np.asarray(t["weight"].to_pylist(), np.float64)
    src = t["source"].to_pylist()
    return diagnose(t["chosen_id"].to_pylist(), t["rejected_id"].to_pylist(),
                    np.nan_to_num(w, nan=1.0), [s or "" for s in src], ev.beauty_of,
                    t["query_id"].to_pylist())


def teacher_and_premise(st: EvalState) -> None:
    """The rephrasing premise (the base's encoder) and each preference table's diagnostics
    (both need the oracle)."""
    cfg, ev = st.cfg, st.ev
    if ev is not None:
        st.premise = ev.premise(st.base.encode, k=cfg.k, split=cfg.query_split,
                                gallery_split=st.held_split)
        st.teacher = {name: teacher_diagnostics(path, ev)
                      for name, path in cfg.preference_dirs().items()}
    elif cfg.preferences:
        st.notes.append("preference tables given but not diagnosed: no oracle")


def gallery_info(st: EvalState) -> dict:
    """The galleries searched and, with the oracle, how many relevant images each query has
    in its gallery (held-out and selection), a distribution summary."""
    from aligner.world.generate import relevant_distribution

    cfg, g = st.cfg, st.gallery
    info = {"source": g.source, "which": cfg.gallery, "view": GALLERY_VIEWS[cfg.gallery],
            "images": len(g.ids), "held_out": {"split": st.held_split, "images": len(st.held)},
            "selection": {"split": st.sel_gallery, "images": len(st.sel_subset)}}
    if st.ev is not None:
        info["held_out"]["relevant_per_query"] = relevant_distribution(
            st.ev.relevant_counts(st.qids, st.held_split))
        if st.sel_qids is not st.qids:
            info["selection"]["relevant_per_query"] = relevant_distribution(
                st.ev.relevant_counts(st.sel_qids, st.sel_gallery))
    return info


def assemble(st: EvalState) -> None:
    """``st.metrics``: setup, systems, comparisons, frontier, teacher, premise, verdict."""
    from aligner.evaluation.report import verdict_sentences

    cfg, gallery, primary = st.cfg, st.gallery, st.primary
    aligned = cfg.aligned_name
    rec = st.rec_info
    searched = f"{st.held_split} images" if st.held_split else "images"
    metrics = {
        "title": f"{aligned} vs the alternatives",
        "setup": (f"Gallery: {len(st.held)} {searched} searched by the held-out queries "
                  f"({gallery.source}, gallery={cfg.gallery}: {GALLERY_VIEWS[cfg.gallery]}); "
                  f"{len(st.qids)} held-out queries (split={cfg.query_split}, "
                  f"kind={cfg.query_kind}); recall among the {rec['gallery']} "
                  f"({rec['gallery_size']} images)."
                  + (f" Baseline knob settings chosen on {len(st.sel_qids)} {st.sel_split} "
                     f"queries over {len(st.sel_subset)} "
                     f"{(st.sel_gallery or 'gallery') + ' images'}, reported on the "
                     f"{cfg.query_split} queries." if st.equal_relevance else "")
                  + (f" Primary metric: {primary} with gain match x beauty "
                     "(docs/evaluation.md)." if st.ev is not None else "")),
        "k": cfg.k, "also_ks": [k for k in st.ks if k != cfg.k], "primary": primary,
        "base_name": cfg.base_name, "aligned_name": aligned, "oracle": st.ev is not None,
        "gallery": gallery_info(st),
        "queries": {"split": cfg.query_split, "kind": cfg.query_kind, "n": len(st.qids),
                    "selection": {"split": st.sel_split, "n": len(st.sel_qids),
                                  "fallback": st.sel_fallback}},
        "teacher_rerank": st.built.info.get("teacher_rerank"),
        "recall": rec, "hpir": st.hpir_info, "systems": st.out_systems,
        "comparisons": st.comparisons, "pairwise": {primary: st.pairwise},
        "teacher": st.teacher or {}, "premise": st.premise,
        "frontier": st.frontier, "equal_relevance": st.equal_relevance,
        "skipped": st.skipped, "notes": st.notes,
    }
    metrics["verdict"] = verdict_sentences(metrics, cfg.recall_tolerance)
    reph = st.systems.get("rephrase")
    if reph is not None and reph.missing:
        st.notes.append(f"rephrase: {len(reph.missing)} queries had no rephrasing "
                        "and were searched with their plain text")
    tr = st.systems.get("teacher_rerank")
    if tr is not None and tr.missing:
        st.notes.append(f"teacher_rerank: {len(tr.missing)} queries had no rephrasing; the "
                        "teacher used the query itself as its good side (as the builder does)")
    st.metrics = metrics


def grids(st: EvalState) -> None:
    """``st.grids``: ``[(query, [(system, items)])]`` for a seeded choice of queries."""
    cfg, ev, qids = st.cfg, st.ev, st.qids
    if cfg.grid_queries <= 0:
        return
    names = cfg.grid_systems or [cfg.base_name, cfg.aligned_name, "cascade", "teacher_rerank",
                                 "rephrase"]
    names = [n for n in dict.fromkeys(names) if n in st.systems]
    rng = np.random.default_rng([cfg.seed, 11])
    chosen = np.sort(rng.choice(len(qids), min(cfg.grid_queries, len(qids)), replace=False))
    for qi in chosen:
        rows = []
        for name in names:
            top = st.tops[name][qi, :cfg.grid_k]
            match = ev.content_matches([qids[qi]], top[None, :])[0] if ev is not None else None
            items = []
            for r, j in enumerate(top):
                if ev is not None:
                    label = (f"#{r + 1} beauty {ev.beauty[j]:+.2f}\n"
                             f"{'match' if match[r] else 'OFF-content'}")
                else:
                    label = f"#{r + 1} scorer {st.aesthetic[j]:+.2f}"
                items.append({"image": st.gallery.images[j], "label": label,
                              "match": None if match is None else bool(match[r])})
            rows.append((name, items))
        st.grids.append((st.texts[qi], rows))
