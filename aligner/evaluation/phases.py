"""The evaluation's phases, in order, each reading and filling one :class:`EvalState`.

:func:`aligner.evaluation.run.run_evaluation` calls them in this order (later phases read
what earlier ones wrote, and the systems' text-encoder caches carry from one phase to the
next, so the order is part of the result):

1. :func:`load_inputs` - the world (oracle) or corpus, the gallery, the held-out queries
   (reported on) and the selection queries (``sweep.select_split``: knob settings are chosen
   on them);
2. :func:`build` - base, baselines (the training teacher found through the aligned model's
   manifests, :mod:`aligner.evaluation.teacher_spec`) and trained models
   (:mod:`aligner.evaluation.build`);
3. :func:`search_and_time` - every system's top results, timed with cleared caches;
4. :func:`per_query_metrics` - aesthetic@K (oracle and scorer), precision@K per query;
5. :func:`caption_recall` - recall of held-out captions, the no-regression check;
6. :func:`hpir` - HPIR per aspect (aesthetics, accuracy), oracle and simulated-rater labels;
7. :func:`aligner.evaluation.equal_relevance.sweep_baselines` - knob sweeps, equal relevance
   (chosen on the selection queries, reported on the held-out ones);
8. :mod:`aligner.evaluation.assemble` - comparisons, teacher diagnostics and the premise,
   the metrics with their verdict, image grids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from aligner.evaluation.config import EvaluateConfig

if TYPE_CHECKING:
    from aligner.evaluation.build import BuiltSystems
    from aligner.evaluation.gallery import Gallery
    from aligner.evaluation.oracle import WorldEval
    from aligner.evaluation.systems import System
    from aligner.world import World

log = logging.getLogger(__name__)

NO_ORACLE_SKIPS = ("oracle aesthetic@K (no oracle outside the built-in world)",
                   "content precision@K (no query truth)", "HPIR-style agreement (no oracle)",
                   "teacher diagnostics (no oracle)", "the rephrasing premise (no oracle)")


@dataclass
class EvalState:
    """Everything the phases share: inputs, systems, per-query arrays, assembled metrics.

    Per-query arrays are ``[Q]`` over the held-out queries; recall hits are ``[C]`` over the
    held-out captions. ``sel_qids`` / ``sel_texts`` are the queries knob settings are chosen
    on (``sel_split``; the held-out queries themselves, with ``sel_fallback`` saying why,
    when that split has none). The held-out queries search the gallery split ``held_split``
    (indices ``held``: the test images, or every image with ``gallery=all``); the selection
    queries search ``sel_gallery`` (indices ``sel_subset``: the val images), so no choice
    sees a test image.
    """

    cfg: EvaluateConfig
    world: World | None = None
    gallery: Gallery | None = None
    qids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    sel_qids: list[str] = field(default_factory=list)
    sel_texts: list[str] = field(default_factory=list)
    sel_split: str = ""
    sel_fallback: str | None = None
    held_split: str | None = None
    sel_gallery: str | None = None
    held: np.ndarray | None = None
    sel_subset: np.ndarray | None = None
    built: BuiltSystems | None = None
    ev: WorldEval | None = None
    load_s: float = 0.0
    ks: list[int] = field(default_factory=list)
    kmax: int = 10
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tops: dict[str, np.ndarray] = field(default_factory=dict)
    timing: dict[str, dict[str, Any]] = field(default_factory=dict)
    per: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    hits: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    rec_gallery: np.ndarray | None = None
    rec_info: dict[str, Any] = field(default_factory=dict)
    cap_texts: list[str] | None = None
    targets: np.ndarray | None = None
    hpir: dict[str, dict] = field(default_factory=dict)
    hpir_info: dict[str, Any] = field(default_factory=dict)
    hpir_result: dict[str, Any] = field(default_factory=dict)
    frontier: dict[str, list[dict]] = field(default_factory=dict)
    equal_relevance: dict[str, Any] = field(default_factory=dict)
    out_systems: dict[str, dict] = field(default_factory=dict)
    comparisons: dict[str, dict] = field(default_factory=dict)
    pairwise: dict[str, dict] = field(default_factory=dict)
    premise: dict | None = None
    teacher: dict | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    grids: list = field(default_factory=list)

    @property
    def systems(self) -> dict[str, System]:
        return self.built.systems if self.built is not None else {}

    @property
    def aesthetic(self) -> np.ndarray:
        """The scorer's score of every gallery image."""
        return self.built.aesthetic

    @property
    def base(self) -> System:
        return self.systems[self.cfg.base_name]

    @property
    def primary(self) -> str:
        """The headline metric: nDCG@K with gain match x beauty (``docs/evaluation.md``), or
        the scorer's aesthetic@K without an oracle."""
        k = self.cfg.k
        return f"ndcg@{k}" if self.ev is not None else f"scorer_aesthetic@{k}"


def load_inputs(st: EvalState) -> None:
    """The world (only without ``corpus``), the gallery and the held-out queries."""
    from aligner.evaluation.gallery import load_gallery, load_queries

    cfg = st.cfg
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    if cfg.corpus:
        if cfg.world:
            log.info("corpus given: evaluating %s without the world's oracle", cfg.corpus)
    else:
        from aligner.world import World

        st.world = World(cfg.world)
    st.load_s = time.time()
    if st.world is not None:
        st.gallery = load_gallery(world=cfg.world, which=cfg.gallery)
        st.qids, st.texts = load_queries(world=cfg.world, split=cfg.query_split,
                                         kind=cfg.query_kind)
    else:
        st.gallery = load_gallery(corpus=cfg.corpus, which=cfg.gallery)
        st.qids, st.texts = load_queries(queries=cfg.queries, split=cfg.query_split,
                                         kind=cfg.query_kind)
    g = st.gallery
    if cfg.gallery == "test" and g.has_split("test"):
        st.held_split = "test"
    st.held = g.indices(st.held_split)
    log.info("gallery: %d images (%s); %d held-out queries search %d %s images",
             len(g.ids), g.source, len(st.qids), len(st.held), st.held_split or "gallery")
    selection_queries(st)
    selection_gallery(st)


def selection_queries(st: EvalState) -> None:
    """The queries each baseline's knob setting is chosen on: ``sweep.select_split`` (same
    kind), never the held-out queries it is reported on. Without such queries (no split
    column, none of that split, or the split is the held-out one) the choice falls back to the
    held-out queries, with a warning and a note in the outputs."""
    from aligner.evaluation.gallery import load_queries

    cfg = st.cfg
    want = cfg.sweep.select_split
    st.sel_qids, st.sel_texts, st.sel_split = st.qids, st.texts, cfg.query_split
    if not cfg.sweep.enabled:
        return
    why = None
    if want == cfg.query_split:
        why = f"sweep.select_split={want} is the held-out split itself"
    elif st.world is None and not _has_split_column(cfg.queries):
        why = f"the queries table {cfg.queries} has no split column"
    else:
        try:
            if st.world is not None:
                ids, texts = load_queries(world=cfg.world, split=want, kind=cfg.query_kind)
            else:
                ids, texts = load_queries(queries=cfg.queries, split=want, kind=cfg.query_kind)
        except ValueError:
            ids, texts = [], []
        overlap = set(ids) & set(st.qids)
        if not ids:
            why = f"no {want} queries (kind={cfg.query_kind})"
        elif overlap:
            why = f"{len(overlap)} {want} query ids are also {cfg.query_split} queries"
        else:
            st.sel_qids, st.sel_texts, st.sel_split = ids, texts, want
            log.info("knob settings are chosen on %d %s queries, reported on %d %s queries",
                     len(ids), want, len(st.qids), cfg.query_split)
            return
    st.sel_fallback = (f"{why}: knob settings are chosen on the {cfg.query_split} queries they "
                       "are reported on (optimistic for the baselines)")
    log.warning("%s", st.sel_fallback)
    st.notes.append(st.sel_fallback)


def selection_gallery(st: EvalState) -> None:
    """The images the selection queries search: the val split's (the val gallery), never the
    test images; with ``gallery=all`` the whole corpus (the deployment view). A test gallery
    without val images falls back to the held-out images, with a note."""
    g, want = st.gallery, st.sel_split
    if st.held_split is None:
        st.sel_gallery = None
    elif st.sel_qids is st.qids:
        st.sel_gallery = st.held_split
    elif g.has_split(want):
        st.sel_gallery = want
    else:
        st.sel_gallery = st.held_split
        why = (f"the gallery has no {want} images: the {want} queries choose knob settings "
               f"over the {st.held_split} images they are reported on (optimistic for the "
               "baselines)")
        log.warning("%s", why)
        st.notes.append(why)
        st.sel_fallback = (st.sel_fallback + "; " if st.sel_fallback else "") + why
    st.sel_subset = g.indices(st.sel_gallery)
    if st.sel_qids is not st.qids:
        log.info("selection: %d %s queries search %d %s images", len(st.sel_qids), st.sel_split,
                 len(st.sel_subset), st.sel_gallery or "gallery")


def _has_split_column(path: str) -> bool:
    from aligner.data.queries import read_queries

    try:
        return "split" in read_queries(path).column_names
    except (FileNotFoundError, ValueError):
        return False


def _other_queries(st: EvalState) -> tuple[list[str], list[str]]:
    """The selection queries that are not held-out queries (their rephrasings are looked up
    too)."""
    held = set(st.qids)
    pairs = [(q, t) for q, t in zip(st.sel_qids, st.sel_texts, strict=True) if q not in held]
    return [q for q, _ in pairs], [t for _, t in pairs]


def _rephrasings(path: str, st: EvalState):
    """The rephrasings of the held-out queries (their counts are reported) plus those of the
    selection queries (counted apart)."""
    from aligner.evaluation.build import load_rephrasings

    reph = load_rephrasings(path, st.qids, st.texts)
    ids, texts = _other_queries(st)
    if ids:
        sel = load_rephrasings(path, ids, texts)
        reph.table.update(sel.table)
        reph.counts["selection_queries"] = {"split": st.sel_split, "used": sel.counts["used"],
                                            "missing": sel.counts["missing"]}
    return reph


def build(st: EvalState) -> None:
    """Build every system; set up the oracle's view of the gallery (the base's embeddings)."""
    from aligner.evaluation.build import build_systems

    cfg = st.cfg
    reph = treph = teacher = None
    if cfg.rephrased and {"rephrase", "teacher_rerank"} & set(cfg.baselines):
        reph = _rephrasings(cfg.rephrased, st)
    if "teacher_rerank" in cfg.baselines:
        from aligner.evaluation.teacher_spec import resolve_teacher

        teacher, notes = resolve_teacher(cfg.baseline, cfg.model_dirs().get(cfg.aligned_name))
        st.notes += [n for n in notes if not n.startswith("teacher_rerank skipped")]
        if teacher is not None and teacher.needs_rephrase and reph is None and teacher.queries:
            try:  # the builder's own rephrasings, when the evaluation was given none
                treph = _rephrasings(teacher.queries, st)
                st.notes.append(f"teacher_rerank: rephrasings from the builder's queries "
                                f"{teacher.queries} (rephrased= not given)")
            except (FileNotFoundError, ValueError) as e:
                st.notes.append(f"teacher_rerank: the builder's queries {teacher.queries} "
                                f"unusable ({e})")
    st.built = build_systems(st.gallery, cfg.base_checkpoint, cfg.model_dirs(),
                             cfg.embedding_dirs(), cfg.baseline, cfg.baselines, reph,
                             cfg.base_name, cfg.base_embeddings, cfg.batch_size, teacher, treph)
    st.notes += st.built.notes
    if teacher is not None and "teacher_rerank" in st.systems:
        for n in teacher.notes:
            st.notes.append(f"teacher_rerank: {n}")
    st.load_s = time.time() - st.load_s
    st.ks = sorted({cfg.k, *cfg.also_ks})
    st.kmax = max(st.ks + [cfg.grid_k, 10])
    if st.world is not None:
        from aligner.evaluation.oracle import WorldEval

        st.ev = WorldEval(st.world, st.base.gallery, st.gallery.ids)
    else:
        st.skipped += list(NO_ORACLE_SKIPS)


def search_and_time(st: EvalState) -> None:
    """Every system's top ``kmax`` per query, timed (encode + search, caches cleared)."""
    from aligner.evaluation.systems import timed_search

    encoders, n = st.built.encoders, len(st.qids)
    for enc in encoders:  # the first call of a torch model pays one-off costs: not query time
        enc.encode(["warm up"])
    for name, s in st.systems.items():
        for enc in encoders:
            enc.clear()
        top, secs = timed_search(s, st.texts, st.kmax, ids=st.qids, subset=st.held)
        st.tops[name] = top
        st.timing[name] = {"seconds": round(secs, 4), "ms_per_query": 1000 * secs / n,
                           "queries": n}
    if "rephrase" in st.timing:
        st.timing["rephrase"]["note"] = "encoding each query's rephrasing and searching"
        _add_llm_time(st, "rephrase", st.cfg.rephrased)
    tr = st.systems.get("teacher_rerank")
    if tr is not None:
        extra = [w for w, need in (("rephrasing", tr.need_reph), ("bad rephrase", tr.need_bad))
                 if need]
        st.timing["teacher_rerank"]["note"] = (
            f"encoding each query{''.join(f' and its {w}' for w in extra)} and scoring the "
            "top N with the teacher")
        if tr.need_reph:
            _add_llm_time(st, "teacher_rerank",
                          (st.built.info.get("teacher_rerank") or {}).get("rephrasings"))
    log.info("searched %d queries with %d systems: %s", n, len(st.systems),
             ", ".join(f"{k} {t['ms_per_query']:.1f} ms/query" for k, t in st.timing.items()))


def _add_llm_time(st: EvalState, name: str, source: str | None) -> None:
    """Add the query-time LLM call to ``name``'s ms/query: the rephraser that wrote
    ``source`` (a ``jobs.rephrase`` output), rebuilt here and timed one query per call
    (:func:`aligner.rephrase.latency.query_latency`, ``docs/evaluation.md`` §6). Measured once
    per source; a back end that cannot be timed here is said so in the note."""
    from aligner.rephrase.latency import query_latency

    t = st.timing[name]
    if not source or st.cfg.llm_latency_queries <= 0:
        t["note"] += ("; the LLM call is not included (latency not measured: "
                      f"{'llm_latency_queries=0' if source else 'no rephrasings source'})")
        return
    cache = st.__dict__.setdefault("_llm_latency", {})
    if source not in cache:
        cache[source] = query_latency(source, st.texts, n=st.cfg.llm_latency_queries)
        log.info("query-time rephrasing %s: %s", source, cache[source])
    lat = cache[source]
    t["llm"] = lat
    if lat.get("measured"):
        t["ms_per_query_search"] = t["ms_per_query"]
        t["ms_per_query"] = t["ms_per_query"] + float(lat["ms_per_query"])
        t["note"] += (f"; plus the query-time LLM call, {lat['backend']}: "
                      f"{lat['ms_per_query']:.0f} ms per query (median of {lat['n']}, "
                      f"{lat.get('where', 'this machine')})")
    else:
        t["note"] += (f"; the LLM call ({lat.get('backend') or 'unknown back end'}) is NOT "
                      f"included: {lat.get('why', 'not measured')}")


def per_query_metrics(st: EvalState) -> None:
    """Per system and query over the held-out gallery: the scorer's aesthetic@K and, with the
    oracle, nDCG@K (gain match x beauty), beauty among the relevant results, precision@K and
    aesthetic@K (a diagnostic), ``docs/evaluation.md`` §2."""
    from aligner.evaluation.oracle_metrics import aesthetic_at_k

    k, ev = st.cfg.k, st.ev
    for name, top in st.tops.items():
        p = {f"scorer_aesthetic@{kk}": aesthetic_at_k(st.aesthetic, top, kk) for kk in st.ks}
        if ev is not None:
            for kk in st.ks:
                g = ev.graded(st.qids, top, kk, st.held_split)
                p.update(g if kk == k else {key: v for key, v in g.items()
                                            if key.startswith(("ndcg@", "aesthetic@"))})
        st.per[name] = p


def caption_recall(st: EvalState) -> None:
    """Recall@1/5/10 of held-out captions among the test split (else the whole gallery; a
    seeded sample of at most ``max_recall_queries``, default 2000, there)."""
    from aligner.evaluation.systems import system_recall_hits

    cfg, gallery = st.cfg, st.gallery
    st.rec_gallery, where = gallery.recall_split()
    st.rec_info = {"gallery": where, "gallery_size": int(len(st.rec_gallery))}
    if gallery.captions is None:
        st.skipped.append("caption recall (the corpus has no captions)")
        return
    caps = [gallery.captions[i] or "" for i in st.rec_gallery]
    keep = np.flatnonzero([bool(c) for c in caps])
    cap_limit = cfg.max_recall_queries or (0 if where == "test split" else 2000)
    if cap_limit and len(keep) > cap_limit:
        keep = np.sort(np.random.default_rng([cfg.seed, 5]).choice(keep, cap_limit, False))
    st.targets = st.rec_gallery[keep]
    st.cap_texts = [caps[i] for i in keep]
    st.rec_info["captions"] = int(len(keep))
    t0 = time.time()
    secs = {}
    for name, s in st.systems.items():
        if s.caption_transform == "n/a":
            continue
        t1 = time.time()
        st.hits[name] = system_recall_hits(s, st.cap_texts, st.targets, subset=st.rec_gallery)
        secs[name] = round(time.time() - t1, 1)
    for name, s in st.systems.items():
        if s.caption_transform == "n/a":
            st.hits[name] = st.hits[s.inner.name]
    log.info("caption recall: %d captions among %d images, %d systems in %.1f s (%s)",
             len(keep), len(st.rec_gallery), len(st.hits), time.time() - t0,
             ", ".join(f"{n} {v} s" for n, v in secs.items()))


def hpir(st: EvalState) -> None:
    """HPIR per aspect (:mod:`aligner.evaluation.hpir`): row pairs from the base's top
    ``hpir.pool`` over the held-out gallery, labelled by the oracle and by simulated raters;
    each system's preference from its own scores (needs the oracle)."""
    from aligner.evaluation.hpir import hpir_aspects, hpir_summary

    cfg, ev, h = st.cfg, st.ev, st.cfg.hpir
    if ev is None:
        return
    _, pool = st.base.search(st.texts, h.pool, ids=st.qids, subset=st.held)
    match = ev.content_matches(st.qids, pool)
    scores = {name: s.score(s.encode(st.texts, st.qids), pool, st.held)
              for name, s in st.systems.items()}
    st.hpir_result = hpir_aspects(match, ev.beauty[pool], scores, h.pairs_per_query,
                                  h.row_size, h.tie, cfg.seed, h.rater_agreement)
    summary = hpir_summary(st.hpir_result)
    for name in st.systems:
        st.hpir[name] = {f"hpir_{a}": res["systems"][name] for a, res in summary.items()}
    st.hpir_info = {"pool": f"{cfg.base_name} top {h.pool}", "row_size": h.row_size,
                    "pairs_per_query": h.pairs_per_query,
                    "aspects": {a: {k: v for k, v in res.items() if k != "systems"}
                                for a, res in summary.items()},
                    "pairs": int(sum(res["pairs"] for res in summary.values()))}
    log.info("HPIR: %s row pairs scored by %d systems",
             {a: res["pairs"] for a, res in summary.items()}, len(st.systems))
    for a, res in summary.items():
        if not res["pairs"]:
            st.notes.append(f"HPIR-{a}: no row pair could be drawn; no agreement computed")
