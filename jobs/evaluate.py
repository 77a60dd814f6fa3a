"""Evaluate the aligned retriever against the systems a user would otherwise pick; write a report.

    python -m jobs.evaluate --config jobs/configs/evaluate.yaml world=out/world \\
        base_checkpoint=out/base/checkpoint \\
        models=control=out/control/checkpoint,aligned=out/aligned/checkpoint \\
        rephrased=out/rephrase preferences=grid=out/preferences output=out/evaluate

Systems (all search the same gallery: the whole world corpus by default, as a deployed search
would): ``base``; ``cascade`` (base top-N re-ranked by the low-level aesthetic scorer);
``query_shift`` (clip-retrieval's aesthetic query shift); ``rephrase`` (the base with the LLM
rephrasing of each query, from a table); and every ``models`` entry (aligned, control,
teacher variants). Metrics over the held-out content queries, with bootstrap 95% CIs: recall
of held-out captions (the no-regression check), oracle aesthetic@K and its paired difference
against the base and between systems, content precision@K, the scorer's aesthetic@K,
HPIR-style row agreement with the oracle, timing; teacher diagnostics for preference tables;
the rephrasing premise. Writes ``metrics.json``, ``per_query.parquet``, ``report.html``,
``report.png``, ``config.yaml`` and ``manifest.json`` to ``output``.

The oracle is read only through ``aligner.evaluation.oracle`` and only for the built-in world
(``world``). With ``corpus`` (+ ``queries``) instead, only the metrics that need no oracle
are computed (recall if captions exist, the scorer's aesthetic@K, timing) and the report says
which were skipped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aligner.evaluation.sweeps import DEFAULT_SWEEPS
from aligner.runtime.config import dump_yaml, load_config, save_config, to_dict
from aligner.runtime.logs import setup_logging
from aligner.runtime.manifest import write_manifest

log = logging.getLogger("jobs.evaluate")
DEFAULT_YAML = Path(__file__).parent / "configs" / "evaluate.yaml"
BASELINES = ("cascade", "query_shift", "rephrase")


def parse_named(items: list[str], what: str) -> dict[str, str]:
    """``["name=path", ...]`` -> ``{name: path}`` (ValueError on a bad or repeated name)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"{what}: {item!r} is not name=path")
        if name.strip() in out:
            raise ValueError(f"{what}: name {name.strip()!r} given twice")
        out[name.strip()] = path.strip()
    return out


@dataclass
class EvaluateConfig:
    """Aligned retriever vs base, cascade re-ranking, query shift and LLM rephrasing."""

    world: str = field(default="out/world", metadata={
        "help": "built-in world directory (the oracle is read only for it, only to evaluate)"})
    corpus: str = field(default="", metadata={
        "help": "other corpus: Parquet dir with id, image[, caption, split] (wins over world; "
                "no oracle metrics)"})
    queries: str = field(default="", metadata={
        "help": "with corpus: Parquet file/dir with query_id, query[, split, kind]"})
    output: str = field(default="out/evaluate", metadata={"help": "output directory"})
    base_name: str = field(default="base", metadata={"help": "name of the base system"})
    aligned_name: str = field(default="aligned", metadata={
        "help": "which system is 'the aligned model' in comparisons and the verdict"})
    base_checkpoint: str = field(default="out/base/checkpoint", metadata={
        "help": "the base retriever (also the first stage of cascade/query_shift/rephrase)"})
    base_embeddings: str = field(default="", metadata={
        "help": "jobs.embed output of the base over the gallery (reused if ids and checkpoint "
                "match; its 'aesthetic' column gives the scorer's scores)"})
    models: list[str] = field(default_factory=list, metadata={
        "help": "trained systems, name=checkpoint_dir (aligned=..., control=..., scorer_only=...)"})
    embeddings: list[str] = field(default_factory=list, metadata={
        "help": "precomputed gallery embeddings, name=embeddings_dir (else embedded in-process)"})
    baselines: list[str] = field(default_factory=lambda: list(BASELINES), metadata={
        "help": "query-time systems over the base: cascade, query_shift, rephrase"})
    cascade_n: int = field(default=50, metadata={"help": "cascade: base candidates re-ranked"})
    cascade_weight: float = field(default=1.0, metadata={
        "help": "cascade: final = z(sim) + w * z(aesthetic) in the top N (inf: aesthetic sort)"})
    shift_quantile: float = field(default=0.1, metadata={
        "help": "query shift: direction = mean embedding of this top fraction by aesthetic"})
    shift_weight: float = field(default=0.5, metadata={
        "help": "query shift: q' = normalise(q + w e) (clip-retrieval's aesthetic_weight)"})
    sweep: bool = field(default=True, metadata={
        "help": "sweep each baseline's knob and compare at equal or better relevance"})
    cascade_weights: list[float] = field(default_factory=lambda: list(DEFAULT_SWEEPS["cascade"]),
                                         metadata={"help": "sweep: cascade weights (.inf ok)"})
    shift_weights: list[float] = field(default_factory=lambda: list(
        DEFAULT_SWEEPS["query_shift"]), metadata={"help": "sweep: query shift weights"})
    rephrase_mixes: list[float] = field(default_factory=lambda: list(
        DEFAULT_SWEEPS["rephrase"]), metadata={"help": "sweep: share of the rephrased query"})
    equal_relevance_slack: float = field(default=0.01, metadata={
        "help": "sweep: a baseline setting within this much (absolute) of the aligned model's "
                "precision and recall counts as equally relevant"})
    rephrased: str = field(default="", metadata={
        "help": "rephrase: dir with queries.parquet (query_id, query, rephrased) or a file; "
                "'' skips the rephrase system"})
    rephrase_missing: str = field(default="plain", metadata={
        "help": "a query without rephrasing: plain (keep it, counted) | error"})
    scorer: str = field(default="lowlevel", metadata={"help": "aesthetic scorer (cascade, shift)"})
    gallery: str = field(default="all", metadata={
        "help": "gallery every system searches: all (the whole corpus) | test"})
    query_split: str = field(default="test", metadata={"help": "held-out query split"})
    query_kind: str = field(default="content", metadata={"help": "query kind (content queries)"})
    k: int = field(default=10, metadata={"help": "K of aesthetic@K and precision@K (main)"})
    also_ks: list[int] = field(default_factory=lambda: [5], metadata={
        "help": "further K for aesthetic@K"})
    hpir_pool: int = field(default=50, metadata={"help": "HPIR: rows drawn from base top-N"})
    hpir_row_size: int = field(default=5, metadata={"help": "HPIR: images per row"})
    hpir_pairs_per_query: int = field(default=4, metadata={"help": "HPIR: row pairs per query"})
    hpir_tie: float = field(default=0.02, metadata={
        "help": "HPIR: pairs with |utility difference| below this are dropped as ties"})
    preferences: list[str] = field(default_factory=list, metadata={
        "help": "teacher diagnostics: name=preferences dir or file"})
    recall_tolerance: float = field(default=0.02, metadata={
        "help": "recall@10 drop (fraction) the verdict flags as a regression"})
    grid_queries: int = field(default=4, metadata={"help": "queries shown as image grids"})
    grid_k: int = field(default=5, metadata={"help": "results per system in a grid"})
    grid_systems: list[str] = field(default_factory=list, metadata={
        "help": "systems in the grids ([]: base, aligned, cascade, rephrase where present)"})
    max_recall_queries: int = field(default=0, metadata={
        "help": "corpus without splits: caption queries for recall (0: 2000)"})
    batch_size: int = field(default=256, metadata={"help": "encoder batch size"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})
    seed: int = field(default=0, metadata={"help": "seed of HPIR rows, grid queries, bootstrap"})

    def __post_init__(self) -> None:
        if not (self.world or self.corpus):
            raise ValueError("set world (built-in world) or corpus")
        if self.corpus and not self.queries:
            raise ValueError("corpus needs queries (a Parquet file/dir with query_id, query)")
        if not self.base_checkpoint:
            raise ValueError("base_checkpoint is required")
        if self.gallery not in ("all", "test"):
            raise ValueError("gallery must be 'all' or 'test'")
        bad = set(self.baselines) - set(BASELINES)
        if bad:
            raise ValueError(f"unknown baselines {sorted(bad)}; known: {list(BASELINES)}")
        if self.cascade_n < 1 or self.k < 1 or any(k < 1 for k in self.also_ks):
            raise ValueError("cascade_n, k and also_ks must be >= 1")
        if not 0 < self.shift_quantile < 1 or self.shift_weight < 0 or self.cascade_weight < 0:
            raise ValueError("shift_quantile in (0, 1); shift_weight, cascade_weight >= 0")
        if not 0 <= self.equal_relevance_slack < 0.5:
            raise ValueError("equal_relevance_slack must be in [0, 0.5)")
        if any(w < 0 for w in self.cascade_weights + self.shift_weights) or \
                any(not 0 <= m <= 1 for m in self.rephrase_mixes):
            raise ValueError("sweep weights must be >= 0 and rephrase_mixes in [0, 1]")
        if self.rephrase_missing not in ("plain", "error"):
            raise ValueError("rephrase_missing must be 'plain' or 'error'")
        if self.hpir_row_size < 1 or self.hpir_pairs_per_query < 1 or \
                self.hpir_pool < 2 * self.hpir_row_size:
            raise ValueError("hpir_pool must hold two rows of hpir_row_size >= 1")
        if self.base_name == self.aligned_name:
            raise ValueError("base_name and aligned_name must differ")
        models = parse_named(self.models, "models")
        parse_named(self.preferences, "preferences")
        emb = parse_named(self.embeddings, "embeddings")
        taken = {self.base_name, *self.baselines}
        clash = taken & set(models)
        if clash:
            raise ValueError(f"models may not be named {sorted(clash)} (base / baseline names)")
        unknown = set(emb) - set(models) - {self.base_name}
        if unknown:
            raise ValueError(f"embeddings for unknown systems {sorted(unknown)}")


# --------------------------------------------------------------------------- gallery and queries

@dataclass
class Gallery:
    """The images every system searches (same ids, same order for all)."""

    ids: list[str]
    images: list[bytes]
    captions: list[str] | None
    split: np.ndarray | None
    source: str
    _decoded: list[np.ndarray] | None = None

    def decoded(self) -> list[np.ndarray]:
        """``[H, W, 3]`` uint8 per image (decoded once, on first use)."""
        if self._decoded is None:
            from aligner.data.images import decode_rgb

            t0 = time.time()
            self._decoded = [decode_rgb(b) for b in self.images]
            log.info("decoded %d gallery images in %.1f s", len(self.images), time.time() - t0)
        return self._decoded

    def recall_split(self) -> tuple[np.ndarray, str]:
        """Gallery indices recall is measured among: the test split, else every image."""
        if self.split is not None and (self.split == "test").any():
            return np.flatnonzero(self.split == "test"), "test split"
        return np.arange(len(self.ids)), "whole gallery (no test split)"


def read_table(path: str | Path, preferred: str | None = None):
    """A Parquet file or directory (:func:`aligner.data.io.read_parquet`)."""
    from aligner.data.io import read_parquet

    return read_parquet(path, "table", preferred=preferred)


def load_gallery(cfg: EvaluateConfig, world) -> Gallery:
    if world is not None:
        t = world.corpus(["id", "image", "caption", "split"],
                         split=None if cfg.gallery == "all" else "test")
        return Gallery(t["id"].to_pylist(), t["image"].to_pylist(), t["caption"].to_pylist(),
                       np.asarray(t["split"].to_pylist()), f"world {cfg.world}")
    t = read_table(cfg.corpus)
    if "id" not in t.column_names or "image" not in t.column_names:
        raise ValueError(f"corpus {cfg.corpus} needs columns id and image (encoded bytes); it has "
                         f"{t.column_names} (for uri corpora, run jobs.embed and pass embeddings)")
    split = np.asarray(t["split"].to_pylist()) if "split" in t.column_names else None
    if split is not None and cfg.gallery == "test":
        t = t.filter(np.asarray(split == "test"))
        split = np.asarray(t["split"].to_pylist())
    caps = t["caption"].to_pylist() if "caption" in t.column_names else None
    return Gallery(t["id"].to_pylist(), t["image"].to_pylist(), caps, split, f"corpus {cfg.corpus}")


def load_queries(cfg: EvaluateConfig, world) -> tuple[list[str], list[str]]:
    """(query ids, texts) of the held-out queries."""
    if world is not None:
        q = world.queries(split=cfg.query_split, kind=cfg.query_kind)
    else:
        q = read_table(cfg.queries)
        for col, want in (("split", cfg.query_split), ("kind", cfg.query_kind)):
            if col in q.column_names and want:
                q = q.filter(np.asarray(q[col].to_pylist()) == want)
    if q.num_rows == 0:
        raise ValueError(f"no queries with split={cfg.query_split!r} kind={cfg.query_kind!r}")
    return q["query_id"].to_pylist(), q["query"].to_pylist()


def load_rephrasings(path: str, qids: list[str], texts: list[str]) -> tuple[dict[str, str], dict]:
    """``query_id -> rephrased`` for the evaluation queries, and counts (missing, mismatched)."""
    from aligner.data.queries import read_rephrasings

    return read_rephrasings(path, qids, texts)


# --------------------------------------------------------------------------- models and systems

def embed_gallery(retriever, gallery: Gallery, batch_size: int = 256) -> np.ndarray:
    """Embed every gallery image in-process (decoded once; the model's eval transform)."""
    import torch

    from aligner.retrieval.models import to_pixels

    ims = gallery.decoded()
    size = retriever.image_size
    same = all(im.shape == (size, size, 3) for im in ims)
    pre = retriever.preprocess_cfg
    out = []
    step = max(batch_size, 512)
    for i in range(0, len(ims), step):
        if same and "mean" in pre:  # fast path (the built-in world): no PIL round trip
            px = to_pixels(np.stack(ims[i:i + step]), pre["mean"], pre["std"])
        else:
            from PIL import Image

            px = torch.stack([retriever.preprocess(Image.fromarray(im)) for im in ims[i:i + step]])
        out.append(retriever.encode_images(px, batch_size))
    return np.concatenate(out) if out else np.zeros((0, retriever.embed_dim), np.float32)


def read_gallery_embeddings(emb_dir: str, ids: list[str], checkpoint_hash: str | None,
                            scorer: str) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Precomputed embeddings in gallery order, the scorer's scores, and why not (if None)."""
    from aligner.data.embeddings import embedding_matrix, read_embeddings

    man = Path(emb_dir) / "manifest.json"
    meta = json.loads(man.read_text()) if man.is_file() else {}
    made_by = (meta.get("model") or {}).get("checkpoint_hash")
    if made_by and checkpoint_hash and made_by != checkpoint_hash:
        return None, None, f"made by checkpoint {made_by}, not {checkpoint_hash}"
    t = read_embeddings(emb_dir, columns=None)
    pos = {i: k for k, i in enumerate(t["id"].to_pylist())}
    missing = [i for i in ids if i not in pos]
    if missing:
        return None, None, f"{len(missing)} gallery ids missing (e.g. {missing[:3]})"
    order = np.array([pos[i] for i in ids], np.int64)
    emb = embedding_matrix(t)[order]
    aes = None
    if "aesthetic" in t.column_names and (meta.get("scorer") or {}).get("name") == scorer:
        aes = np.asarray(t["aesthetic"].to_numpy(zero_copy_only=False), np.float64)[order]
    return emb, aes, ""


def load_model_system(name: str, ckpt: str, emb_dir: str, gallery: Gallery, cfg: EvaluateConfig):
    """An :class:`EncoderSystem` for a checkpoint; returns (system, encoder, scorer scores, info)."""
    from aligner.evaluation.systems import CachedEncoder, EncoderSystem
    from aligner.retrieval.models import load_checkpoint

    t0 = time.time()
    r = load_checkpoint(ckpt, device="cpu")
    info = {"checkpoint": ckpt, "checkpoint_hash": r.checkpoint_hash,
            "load_s": round(time.time() - t0, 2)}
    emb = aes = None
    if emb_dir:
        emb, aes, why = read_gallery_embeddings(emb_dir, gallery.ids, r.checkpoint_hash, cfg.scorer)
        if emb is None:
            log.warning("%s: not using embeddings %s (%s); embedding in-process", name, emb_dir, why)
        else:
            info["embeddings"] = emb_dir
    if emb is None:
        t1 = time.time()
        emb = embed_gallery(r, gallery, cfg.batch_size)
        info["embed_s"] = round(time.time() - t1, 2)
        log.info("%s: embedded %d images in %.1f s", name, len(emb), info["embed_s"])
    enc = CachedEncoder(lambda texts: r.encode_texts(texts, cfg.batch_size))
    return EncoderSystem(name, enc, emb, {"checkpoint": ckpt}), enc, aes, info


def scorer_scores(cfg: EvaluateConfig, gallery: Gallery, base_emb: np.ndarray) -> np.ndarray:
    """The aesthetic scorer's score of every gallery image."""
    from aligner.aesthetics.scorer import make_scorer

    scorer = make_scorer(cfg.scorer)
    t0 = time.time()
    if scorer.needs == "embedding":
        aes = np.asarray(scorer.score(base_emb), np.float64)
    else:
        ims = gallery.decoded()
        aes = np.concatenate([np.asarray(scorer.score(ims[i:i + 1024]), np.float64)
                              for i in range(0, len(ims), 1024)]) if ims else np.zeros(0)
    log.info("scored %d gallery images with %s in %.1f s", len(aes), cfg.scorer, time.time() - t0)
    return aes


def build_systems(cfg: EvaluateConfig, gallery: Gallery, qids: list[str], texts: list[str]):
    """Base, the query-time baselines and the trained models; returns (systems, encoders,
    scorer scores, info, notes)."""
    from aligner.evaluation.systems import CascadeSystem, QueryShiftSystem, RephraseSystem

    emb_dirs = parse_named(cfg.embeddings, "embeddings")
    base_emb_dir = cfg.base_embeddings or emb_dirs.get(cfg.base_name, "")
    base, base_enc, aes, base_info = load_model_system(cfg.base_name, cfg.base_checkpoint,
                                                       base_emb_dir, gallery, cfg)
    info = {cfg.base_name: base_info}
    if aes is None or not np.isfinite(aes).any():
        aes = scorer_scores(cfg, gallery, base.gallery)
    systems, encoders, notes = {cfg.base_name: base}, [base_enc], []
    if "cascade" in cfg.baselines:
        systems["cascade"] = CascadeSystem("cascade", base, aes, cfg.cascade_n, cfg.cascade_weight)
    if "query_shift" in cfg.baselines:
        systems["query_shift"] = QueryShiftSystem("query_shift", base, aes, cfg.shift_quantile,
                                                  cfg.shift_weight)
    if "rephrase" in cfg.baselines:
        if cfg.rephrased:
            table, counts = load_rephrasings(cfg.rephrased, qids, texts)
            systems["rephrase"] = RephraseSystem("rephrase", base, table, cfg.rephrase_missing)
            info["rephrase"] = {"table": cfg.rephrased, **counts}
        else:
            notes.append("rephrase system skipped: no rephrased queries given (rephrased=DIR)")
    for name, ckpt in parse_named(cfg.models, "models").items():
        s, enc, _, i = load_model_system(name, ckpt, emb_dirs.get(name, ""), gallery, cfg)
        systems[name] = s
        encoders.append(enc)
        info[name] = i
    return systems, encoders, aes, info, notes


@dataclass
class EvalResult:
    metrics: dict
    per_query: object  # pyarrow.Table
    gains: np.ndarray | None
    grids: list
    inputs: dict
    counts: dict
    timings: dict
    table: str


def run_evaluation(cfg: EvaluateConfig) -> EvalResult:
    """Everything but writing: systems, metrics, comparisons, verdict, grids."""
    import pyarrow as pa

    from aligner.evaluation.oracle_metrics import (
        aesthetic_at_k,
        draw_row_pairs,
        hpir_agreement,
        pair_agreement,
        paired_difference,
    )
    from aligner.evaluation.report import summary_table, verdict_sentences
    from aligner.evaluation.stats import ci_dict
    from aligner.evaluation.systems import system_recall_hits, timed_search

    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    world = None
    if cfg.corpus:
        if cfg.world:
            log.info("corpus given: evaluating %s without the world's oracle", cfg.corpus)
    else:
        from aligner.world import World

        world = World(cfg.world)
    t_start = time.time()
    gallery = load_gallery(cfg, world)
    qids, texts = load_queries(cfg, world)
    log.info("gallery: %d images (%s); %d held-out queries", len(gallery.ids), gallery.source,
             len(qids))
    systems, encoders, aes, info, notes = build_systems(cfg, gallery, qids, texts)
    base = systems[cfg.base_name]
    t_systems = time.time() - t_start
    ks = sorted({cfg.k, *cfg.also_ks})
    kmax = max(ks + [cfg.grid_k, 10])
    ev = None
    skipped = []
    if world is not None:
        from aligner.evaluation.oracle import WorldEval

        ev = WorldEval(world, base.gallery, gallery.ids)
    else:
        skipped += ["oracle aesthetic@K (no oracle outside the built-in world)",
                    "content precision@K (no query truth)", "HPIR-style agreement (no oracle)",
                    "teacher diagnostics (no oracle)", "the rephrasing premise (no oracle)"]

    # Top results and timing (encode + search, caches cleared) --------------------------------
    tops, timing = {}, {}
    for enc in encoders:  # the first call of a torch model pays one-off costs: not query time
        enc.encode(["warm up"])
    for name, s in systems.items():
        for enc in encoders:
            enc.clear()
        top, secs = timed_search(s, texts, kmax, ids=qids)
        tops[name] = top
        timing[name] = {"seconds": round(secs, 4), "ms_per_query": 1000 * secs / len(qids),
                        "queries": len(qids)}
    if "rephrase" in timing:
        timing["rephrase"]["note"] = "lookup of precomputed rephrasings; LLM time not included"

    log.info("searched %d queries with %d systems: %s", len(qids), len(systems),
             ", ".join(f"{n} {t['ms_per_query']:.1f} ms/query" for n, t in timing.items()))

    # Per-query metrics ----------------------------------------------------------------------
    per: dict[str, dict[str, np.ndarray]] = {}
    for name, top in tops.items():
        p = {f"scorer_aesthetic@{k}": aesthetic_at_k(aes, top, k) for k in ks}
        if ev is not None:
            p.update({f"aesthetic@{k}": aesthetic_at_k(ev.beauty, top, k) for k in ks})
            p[f"precision@{cfg.k}"] = ev.relevance(qids, top[:, :cfg.k])
        per[name] = p

    # Recall of held-out captions (the no-regression check) --------------------------------
    hits: dict[str, dict[str, np.ndarray]] = {}
    rec_gallery, rec_where = gallery.recall_split()
    rec_info = {"gallery": rec_where, "gallery_size": int(len(rec_gallery))}
    if gallery.captions is not None:
        caps = [gallery.captions[i] or "" for i in rec_gallery]
        keep = np.flatnonzero([bool(c) for c in caps])
        cap_limit = cfg.max_recall_queries or (0 if rec_where == "test split" else 2000)
        if cap_limit and len(keep) > cap_limit:
            keep = np.sort(np.random.default_rng([cfg.seed, 5]).choice(keep, cap_limit, False))
        targets = rec_gallery[keep]
        cap_texts = [caps[i] for i in keep]
        rec_info["captions"] = int(len(keep))
        t0 = time.time()
        for name, s in systems.items():
            if s.caption_transform == "n/a":
                continue
            hits[name] = system_recall_hits(s, cap_texts, targets, subset=rec_gallery)
        for name, s in systems.items():
            if s.caption_transform == "n/a":
                hits[name] = hits[s.inner.name]
        log.info("caption recall: %d captions among %d images, %d systems in %.1f s", len(keep),
                 len(rec_gallery), len(hits), time.time() - t0)
    else:
        skipped.append("caption recall (the corpus has no captions)")

    # HPIR-style agreement -------------------------------------------------------------------
    agree: dict[str, np.ndarray] = {}
    hpir: dict[str, dict] = {}
    hpir_info = {}
    if ev is not None:
        _, pool = base.search(texts, cfg.hpir_pool, ids=qids)
        util = ev.content_matches(qids, pool) * ev.utility_beauty()[pool]
        pairs = draw_row_pairs(util, cfg.hpir_pairs_per_query, cfg.hpir_row_size, cfg.hpir_tie,
                               cfg.seed)
        hpir_info = {"pool": f"{cfg.base_name} top {cfg.hpir_pool}", "pairs": len(pairs.query),
                     "pairs_drawn": pairs.drawn, "row_size": cfg.hpir_row_size}
        for name, s in systems.items():
            scores = s.score(s.encode(texts, qids), pool)
            agree[name] = pair_agreement(pairs, scores)
            hpir[name] = hpir_agreement(pairs, scores)
        log.info("HPIR: %d row pairs (%d drawn, ties dropped) scored by %d systems",
                 len(pairs.query), pairs.drawn, len(systems))
        if not len(pairs.query):
            notes.append("HPIR: every drawn row pair was a tie; no agreement computed")

    # Baseline frontiers and the comparison at equal relevance -----------------------------
    frontier, iso = {}, {}
    if cfg.sweep and ev is not None and cfg.aligned_name in systems:
        frontier, iso = _frontiers(cfg, systems, texts, qids, ev, aes, per, hits,
                                   cap_texts if hits else None, targets if hits else None,
                                   rec_gallery)

    # Assemble per-system metrics and comparisons -------------------------------------------
    primary = f"aesthetic@{cfg.k}" if ev is not None else f"scorer_aesthetic@{cfg.k}"
    out_systems = {}
    for name, s in systems.items():
        m = {"kind": s.kind, "describe": s.describe(), "timing": timing[name]}
        if name in info:
            m["model"] = info[name]
        if name in hits:
            m["recall"] = {k: ci_dict(v.astype(float)) for k, v in hits[name].items()}
            m["recall"]["transform"] = (f"n/a: {s.inner.name}'s recall (rephrasing applies to "
                                        "queries only)" if s.caption_transform == "n/a"
                                        else s.caption_transform)
        for key, v in per[name].items():
            m[key] = ci_dict(v)
            if name != cfg.base_name and key.startswith(("aesthetic@", "scorer_aesthetic@")):
                m[f"{key}_vs_base"] = paired_difference(v, per[cfg.base_name][key])
        if name in hits and name != cfg.base_name:
            m["recall@10_vs_base"] = paired_difference(hits[name]["r@10"].astype(float),
                                                       hits[cfg.base_name]["r@10"].astype(float))
        if name in hpir:
            m["hpir"] = hpir[name]
        out_systems[name] = m
    comparisons = {}
    aligned = cfg.aligned_name
    if aligned in systems:
        for other in systems:
            if other == aligned:
                continue
            c = {f"{key}_diff": paired_difference(per[aligned][key], per[other][key])
                 for key in per[aligned]}
            if aligned in hits and other in hits:
                c["recall@10_diff"] = paired_difference(hits[aligned]["r@10"].astype(float),
                                                        hits[other]["r@10"].astype(float))
            if aligned in agree:
                c["hpir_diff"] = paired_difference(agree[aligned], agree[other])
            comparisons[other] = c
    else:
        notes.append(f"no system named {aligned!r}: no comparisons (models=NAME=CKPT, "
                     "aligned_name=...)")
    pairwise = {a: {b: paired_difference(per[a][primary], per[b][primary])
                    for b in systems if b != a} for a in systems}

    premise = teacher = None
    if ev is not None:
        premise = ev.premise(base.encode, k=cfg.k, split=cfg.query_split,  # ev: base's embeddings
                             gallery_split=None if cfg.gallery == "all" else "test")
        teacher = {}
        for tname, path in parse_named(cfg.preferences, "preferences").items():
            teacher[tname] = _teacher(path, ev)
    elif cfg.preferences:
        notes.append("preference tables given but not diagnosed: no oracle")

    metrics = {
        "title": f"{aligned} vs the alternatives",
        "setup": (f"Gallery: {len(gallery.ids)} images ({gallery.source}, gallery={cfg.gallery}); "
                  f"{len(qids)} held-out queries (split={cfg.query_split}, kind={cfg.query_kind})"
                  f"; recall among the {rec_info['gallery']} ({rec_info['gallery_size']} images)."),
        "k": cfg.k, "also_ks": [k for k in ks if k != cfg.k], "primary": primary,
        "base_name": cfg.base_name, "aligned_name": aligned, "oracle": ev is not None,
        "gallery": {"source": gallery.source, "which": cfg.gallery, "images": len(gallery.ids)},
        "queries": {"split": cfg.query_split, "kind": cfg.query_kind, "n": len(qids)},
        "recall": rec_info, "hpir": hpir_info, "systems": out_systems,
        "comparisons": comparisons, "pairwise": {primary: pairwise},
        "teacher": teacher or {}, "premise": premise,
        "frontier": frontier, "equal_relevance": iso,
        "skipped": skipped, "notes": notes,
    }
    metrics["verdict"] = verdict_sentences(metrics, cfg.recall_tolerance)
    if "rephrase" in systems and systems["rephrase"].missing:
        notes.append(f"rephrase: {len(systems['rephrase'].missing)} queries had no rephrasing "
                     "and were searched with their plain text")

    cols = {"query_id": qids, "query": texts}
    for name, p in per.items():
        cols.update({f"{name}/{key}": v for key, v in p.items()})
    gains = (per[aligned][primary] - per[cfg.base_name][primary]) if aligned in per else None
    return EvalResult(
        metrics=metrics, per_query=pa.table(cols), gains=gains,
        grids=_grids(cfg, gallery, qids, texts, tops, systems, ev, aes),
        inputs={"gallery": gallery.source, "base_checkpoint": cfg.base_checkpoint,
                "models": parse_named(cfg.models, "models"), "rephrased": cfg.rephrased,
                "preferences": parse_named(cfg.preferences, "preferences")},
        counts={"gallery_images": len(gallery.ids), "queries": len(qids),
                "systems": len(systems), "recall_captions": rec_info.get("captions", 0),
                "hpir_pairs": hpir_info.get("pairs", 0)},
        timings={"load_and_embed_s": round(t_systems, 1), "models": info},
        table=summary_table(metrics))


def _frontiers(cfg: EvaluateConfig, systems: dict, texts: list[str], qids: list[str], ev, aes,
               per: dict, hits: dict, cap_texts, targets, rec_gallery):
    """Sweep every baseline's knob; compare the aligned model with each family's best setting
    at equal or better relevance (:mod:`aligner.evaluation.sweeps`)."""
    from aligner.evaluation.oracle_metrics import aesthetic_at_k, paired_difference
    from aligner.evaluation.stats import ci_dict
    from aligner.evaluation.sweeps import Point, best_at_equal_relevance, frontier_rows
    from aligner.evaluation.systems import (
        CascadeSystem,
        QueryShiftSystem,
        RephraseSystem,
        system_recall_hits,
    )

    base = systems[cfg.base_name]
    aligned = cfg.aligned_name
    primary, prec = f"aesthetic@{cfg.k}", f"precision@{cfg.k}"
    makers = {
        "cascade": (cfg.cascade_weights,
                    lambda w: CascadeSystem(f"cascade w={w}", base, aes, cfg.cascade_n, w)),
        "query_shift": (cfg.shift_weights,
                        lambda w: QueryShiftSystem(f"shift w={w}", base, aes, cfg.shift_quantile,
                                                   w)),
    }
    if "rephrase" in systems:
        table = systems["rephrase"].table
        makers["rephrase"] = (cfg.rephrase_mixes, lambda m: RephraseSystem(
            f"rephrase mix={m}", base, table, cfg.rephrase_missing, mix=m))
    t0 = time.time()
    frontier, iso = {}, {}
    a_prec = float(np.mean(per[aligned][prec]))
    a_rec = float(np.mean(hits[aligned]["r@10"])) if aligned in hits else None
    b_rec = float(np.mean(hits[cfg.base_name]["r@10"])) if cfg.base_name in hits else None
    for fam, (params, make) in makers.items():
        if fam not in cfg.baselines:
            continue
        points = []
        for w in params:
            s = make(float(w))
            _, top = s.search(texts, cfg.k, ids=qids)
            pq = {primary: aesthetic_at_k(ev.beauty, top, cfg.k),
                  prec: ev.relevance(qids, top[:, :cfg.k])}
            rec = None
            if cap_texts is not None and s.caption_transform != "n/a":
                rec = system_recall_hits(s, cap_texts, targets, subset=rec_gallery)["r@10"]
            points.append(Point(fam, float(w), pq, None if rec is None else rec.astype(float)))
        frontier[fam] = frontier_rows(points, primary, prec, ci_dict)
        slack = cfg.equal_relevance_slack
        best = best_at_equal_relevance(points, primary, prec, a_prec, a_rec, inner_recall=b_rec,
                                       slack=slack)
        if best is None:
            iso[fam] = {"setting": None, "note": (
                f"no {fam} setting is as relevant as {aligned} (precision@{cfg.k} >= "
                f"{a_prec - slack:.3f}" + (f", recall@10 >= {a_rec - slack:.3f})"
                                           if a_rec is not None else ")"))}
            continue
        iso[fam] = {"setting": best.label, f"{primary}_diff": paired_difference(
            per[aligned][primary], best.per_query[primary]),
            f"{prec}_diff": paired_difference(per[aligned][prec], best.per_query[prec]),
            primary: ci_dict(best.per_query[primary]), prec: best.mean(prec),
            "recall@10": best.mean("recall@10") if best.recall is not None else b_rec}
    log.info("swept %s in %.1f s", {f: len(v) for f, v in frontier.items()}, time.time() - t0)
    return frontier, {"aligned": {prec: a_prec, "recall@10": a_rec},
                      "slack": cfg.equal_relevance_slack, "families": iso}


def _teacher(path: str, ev) -> dict:
    from aligner.data.preferences import read_preferences
    from aligner.evaluation.oracle_metrics import teacher_diagnostics

    try:
        t = read_preferences(path)
    except (FileNotFoundError, ValueError) as e:
        return {"error": str(e)}
    w = np.asarray(t["weight"].to_pylist(), np.float64)
    src = t["source"].to_pylist()
    return teacher_diagnostics(t["chosen_id"].to_pylist(), t["rejected_id"].to_pylist(),
                               np.nan_to_num(w, nan=1.0), [s or "" for s in src], ev.beauty_of)


def _grids(cfg, gallery, qids, texts, tops, systems, ev, aes) -> list:
    """``[(query, [(system, items)])]`` for a seeded choice of queries."""
    if cfg.grid_queries <= 0:
        return []
    names = cfg.grid_systems or [cfg.base_name, cfg.aligned_name, "cascade", "rephrase"]
    names = [n for n in dict.fromkeys(names) if n in systems]
    rng = np.random.default_rng([cfg.seed, 11])
    chosen = np.sort(rng.choice(len(qids), min(cfg.grid_queries, len(qids)), replace=False))
    grids = []
    for qi in chosen:
        rows = []
        for name in names:
            top = tops[name][qi, :cfg.grid_k]
            match = ev.content_matches([qids[qi]], top[None, :])[0] if ev is not None else None
            items = []
            for r, j in enumerate(top):
                if ev is not None:
                    label = (f"#{r + 1} beauty {ev.beauty[j]:+.2f}\n"
                             f"{'match' if match[r] else 'OFF-content'}")
                else:
                    label = f"#{r + 1} scorer {aes[j]:+.2f}"
                items.append({"image": gallery.images[j], "label": label,
                              "match": None if match is None else bool(match[r])})
            rows.append((name, items))
        grids.append((texts[qi], rows))
    return grids


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg = load_config(EvaluateConfig, argv, DEFAULT_YAML, prog="python -m jobs.evaluate")
    import pyarrow.parquet as pq

    from aligner.evaluation.report import write_report

    started = time.time()
    log.info("config:\n%s", dump_yaml(cfg))
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    try:
        res = run_evaluation(cfg)
    except (FileNotFoundError, ValueError, KeyError) as e:
        log.error("%s: %s", type(e).__name__, e)
        return 2
    (out / "metrics.json").write_text(json.dumps(json_safe(res.metrics), indent=2))
    pq.write_table(res.per_query, out / "per_query.parquet")
    paths = write_report(out, res.metrics, res.gains, res.grids)
    write_manifest(out, "evaluate", to_dict(cfg), started, inputs=res.inputs, counts=res.counts,
                   outputs={"metrics": "metrics.json", "per_query": "per_query.parquet",
                            "report": "report.html", "report_png": "report.png"},
                   timings=res.timings)
    print(res.table)
    print(f"report: {paths['html']}\nmetrics: {out / 'metrics.json'}")
    return 0


def json_safe(o):
    """Plain JSON data: numpy scalars/arrays converted, NaN and infinities as null."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, np.ndarray):
        return json_safe(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    if o is None or isinstance(o, (str, int, float, bool)):
        return o
    return str(o)


if __name__ == "__main__":
    raise SystemExit(main())
