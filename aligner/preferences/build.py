"""The preference builder as a library function: teacher pairs + degraded copies + extra tables.

:func:`build_preferences` is what ``python -m jobs.build_preferences`` and the quickstart call.
For every query of the chosen ``splits``: retrieve the top ``k`` images (exactly from the
embeddings, or from ``index``), order them by similarity to the original query and by the
teacher's aesthetic score, sample a ``u x v`` grid at ``stride`` and emit its dominance pairs
(source ``grid``); pair the top ``degraded_per_query`` candidates with degraded copies of
themselves (source ``degraded``); add pairs from ``extra_tables`` (human votes, LMM labels
...); then apply source weights, dedupe, drop contradictions and cap
(:mod:`aligner.preferences.clean`).

The query encoder defaults to the model recorded in the embeddings manifest, so query and
image vectors match. No Ray: the work is a few matrix products per thousand queries; a corpus
too large for memory goes through a faiss ``index`` instead of the in-memory matrix.

Every input (``embeddings``, ``index``, ``queries``, ``corpus``, ``extra_tables``) is a local
path or an ``s3://`` / ``gs://`` URI: the readers open them through pyarrow filesystems
(:mod:`aligner.data.io`), an index URI is loaded from a local cache
(:mod:`aligner.retrieval.index_store`). ``reward_model`` is a local checkpoint directory.

Writes to ``output``: ``preferences.parquet`` (:mod:`aligner.data.preferences`), ``grids.png``
and ``degraded.png`` (:mod:`aligner.preferences.examples`), ``config.yaml`` and
``manifest.json`` (counts per source, pairs per query, dedupe and contradiction counts, grid
shape, inputs). ``output`` is a local directory, or a URI: the files are then written to a
local temp directory and uploaded at the end, ``manifest.json`` last
(:func:`aligner.data.io.output_dir`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from aligner.data.io import Store, is_uri, output_dir, require_at, shown_path
from aligner.data.preferences import (
    PREFERENCES_FILE,
    read_preferences,
    rows_to_table,
    write_preferences,
)
from aligner.data.queries import filter_queries, read_queries
from aligner.preferences.candidates import IndexCandidates, MatrixCandidates
from aligner.preferences.clean import clean_pairs, count_by, parse_source_weights
from aligner.preferences.examples import draw_examples
from aligner.preferences.pairs import (
    PairSettings,
    QueryText,
    build_pairs,
    build_pools,
)
from aligner.preferences.teacher import DEFAULT_BAD_TEMPLATE, RephraseBatch, template_rephraser
from aligner.retrieval.models import ModelSpec
from aligner.runtime.config import save_config, to_dict
from aligner.runtime.manifest import read_manifest, write_manifest

log = logging.getLogger(__name__)


@dataclass
class BuildPreferencesConfig(PairSettings):
    """Build grid, degraded-copy and extra preference pairs for ranked DPO.

    The pair settings (``k``, ``u``, ``v``, ``stride``, ``aesthetic`` ...) are
    :class:`aligner.preferences.pairs.PairSettings`'s; the fields below say what to read and
    write.
    """

    embeddings: str = field(default="out/embeddings", metadata={
        "help": "embed job output (id, embedding, aesthetic): a path or s3:// / gs:// URI"})
    queries: str = field(default="out/rephrased",
                         metadata={"help": "dir holding queries.parquet, or a Parquet file "
                                           "(query_id, query, split[, rephrased]); path or URI"})
    output: str = field(default="out/preferences", metadata={
        "help": "output directory: a path, or a URI (staged locally, uploaded at the end)"})
    index: str = field(default="", metadata={"help": "faiss index dir or URI (jobs.build_index) "
                                                    "for retrieval; '' = exact over the "
                                                    "embeddings"})
    corpus: str = field(default="", metadata={"help": "corpus (path or URI): its split column "
                                                     "decides pool_splits; example PNGs ('' = "
                                                     "the embeddings manifest's input)"})
    splits: list[str] = field(default_factory=lambda: ["train"],
                              metadata={"help": "query splits to build pairs for"})
    pool_splits: list[str] = field(default_factory=lambda: ["train"], metadata={
        "help": "corpus splits whose images may be candidates or appear in extra tables "
                "(held-out images never reach a preferences table); [] = every image; a "
                "corpus without a split column holds nothing out (logged)"})
    model: ModelSpec | None = field(default=None, metadata={
        "help": "query encoder; unset = the model that embedded the corpus (its manifest)"})
    bad_template: str = field(default=DEFAULT_BAD_TEMPLATE, metadata={
        "help": "antonym rephrase for 'contrast' ({q} = the query)"})
    bad_rephraser: str = field(default="", metadata={
        "help": "'' = bad_template; 'template:<style>' = aligner.rephrase TemplateRephraser "
                "(style, polarity=bad)"})
    fallback_to_original: bool = field(default=False, metadata={
        "help": "a queries table without 'rephrased' uses the original queries instead of "
                "failing"})
    extra_tables: list[str] = field(default_factory=list, metadata={
        "help": "preference tables to add (human votes, LMM labels): files or dirs, paths or "
                "URIs"})
    source_weights: str = field(default="", metadata={
        "help": "weight multipliers per source, e.g. 'grid=1.0,degraded=0.5'"})
    max_pairs_per_query: int = field(default=0, metadata={"help": "cap (0: none), seeded"})
    max_pairs_per_source: int = field(default=0, metadata={"help": "cap (0: none), seeded"})
    seed: int = field(default=0, metadata={"help": "seed of the caps' subsampling"})
    examples: int = field(default=2, metadata={"help": "example grids drawn to grids.png"})
    reward_model: str = field(default="", metadata={
        "help": "reward checkpoint (jobs.train_reward) for the 'reward' teacher component"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if ("reward" in self.aesthetic) != bool(self.reward_model):
            raise ValueError("the 'reward' teacher component and reward_model go together: "
                             f"aesthetic={self.aesthetic}, reward_model={self.reward_model!r}")
        if not self.embeddings or not self.queries or not self.output:
            raise ValueError("embeddings, queries and output are required")
        if self.examples < 0 or self.max_pairs_per_query < 0 or self.max_pairs_per_source < 0:
            raise ValueError("examples, max_pairs_per_query and max_pairs_per_source must be "
                             ">= 0")
        if self.bad_rephraser and not self.bad_rephraser.startswith("template:"):
            raise ValueError(f"bad_rephraser {self.bad_rephraser!r}: '' or 'template:<style>'")
        if "{q}" not in self.bad_template:
            raise ValueError("bad_template needs a {q} placeholder")
        parse_source_weights(self.source_weights)


def allowed_images(corpus: str, pool_splits: list[str]) -> tuple[set[str] | None, dict]:
    """The ids of the corpus images of ``pool_splits`` (None: every image may be used) and
    what was held out, for the manifest."""
    from aligner.data.corpus import corpus_columns, read_corpus

    if not pool_splits:
        return None, {"pool_splits": [], "held_out": "nothing (pool_splits=[])"}
    try:
        has_split = bool(corpus) and "split" in corpus_columns(corpus)
    except (OSError, ValueError):
        has_split = False
    if not has_split:
        log.warning("corpus %r has no split column: every image may be a candidate (nothing "
                    "is held out)", corpus)
        return None, {"pool_splits": pool_splits, "held_out": "nothing (no split column)"}
    t = read_corpus(corpus, ["id", "split"])
    splits = t.column("split").to_pylist()
    allowed = {i for i, sp in zip(t.column("id").to_pylist(), splits, strict=True)
               if sp in pool_splits}
    held = {sp: splits.count(sp) for sp in sorted(set(splits) - set(pool_splits), key=str)}
    log.info("candidate images: %d of %d (splits %s); held out %s", len(allowed), len(splits),
             pool_splits, held)
    return allowed, {"pool_splits": pool_splits, "candidates": len(allowed),
                     "held_out": held}


def load_extra(paths: list[str], all_queries: pa.Table, splits: list[str],
               allowed: set[str] | None = None) -> tuple[pa.Table | None, dict[str, Any]]:
    """Extra preference tables, minus rows of queries that belong to other splits (a test
    query's human votes must not train) and rows naming an image outside ``allowed`` (a
    held-out image). Returns (table or None, per-file counts)."""
    from aligner.preferences.degrade import original_id

    if not paths:
        return None, {}
    split_of = (dict(zip(all_queries.column("query_id").to_pylist(),
                         all_queries.column("split").to_pylist(), strict=True))
                if splits and "split" in all_queries.column_names else {})
    tables, counts = [], {}
    for path in paths:
        t = read_preferences(path)
        # queries unknown to the queries table are kept: their split cannot be checked
        keep = np.array([q not in split_of or split_of[q] in splits
                         for q in t.column("query_id").to_pylist()], bool)
        held = np.zeros(t.num_rows, bool)
        if allowed is not None:
            held = np.array([original_id(a) not in allowed or original_id(b) not in allowed
                             for a, b in zip(t.column("chosen_id").to_pylist(),
                                             t.column("rejected_id").to_pylist(), strict=True)],
                            bool)
        counts[path] = {"rows": t.num_rows, "dropped_other_split": int((~keep).sum()),
                        "dropped_held_out_images": int((held & keep).sum())}
        tables.append(t.filter(pa.array(keep & ~held)))
        log.info("extra table %s: %d rows, %d dropped (queries of other splits), %d dropped "
                 "(held-out images)", path, t.num_rows, int((~keep).sum()),
                 int((held & keep).sum()))
    return pa.concat_tables(tables), counts


def bad_rephraser(cfg: BuildPreferencesConfig) -> RephraseBatch:
    """The antonym rephraser the ``contrast`` component uses."""
    if cfg.bad_rephraser.startswith("template:"):
        from aligner.rephrase.template import TemplateRephraser

        return TemplateRephraser(style=cfg.bad_rephraser.partition(":")[2],
                                 polarity="bad").rephrase_batch
    return template_rephraser(cfg.bad_template)


def build_preferences(cfg: BuildPreferencesConfig) -> dict[str, Any]:
    """Build and write the preferences; returns the manifest's counts.

    Raises:
        FileNotFoundError: a missing input.
        ValueError: inputs that do not fit (schema, model size, missing rephrases).
    """
    import pyarrow as pa

    from aligner.retrieval.models import load_retriever

    started = time.time()
    settings = cfg
    emb_dir = shown_path(cfg.embeddings)
    require_at(cfg.embeddings, "embeddings", directory=True)
    if is_uri(cfg.output):
        Store(cfg.output).check("output")  # before the work, not after it
    if cfg.index:
        require_at(cfg.index, "index directory", directory=True)
    if cfg.corpus:
        require_at(cfg.corpus, "corpus")  # given, it must exist (the default may be gone)
    for path in cfg.extra_tables:
        require_at(path, "extra table")
    all_queries = read_queries(cfg.queries, require=("split",) if cfg.splits else ())
    queries = filter_queries(all_queries, cfg.splits)
    if queries.num_rows == 0:
        raise ValueError(f"queries {cfg.queries} has no queries in splits {cfg.splits}")
    has_reph = "rephrased" in queries.column_names
    if settings.needs_rephrase and not has_reph:
        if not cfg.fallback_to_original:
            raise ValueError(
                f"queries {cfg.queries} has no 'rephrased' column, needed by retrieve_with="
                f"{cfg.retrieve_with} / aesthetic={cfg.aesthetic}: run jobs.rephrase first, or "
                "set fallback_to_original=true (or aesthetic=[scorer] with retrieve_with=original)")
        log.warning("queries have no 'rephrased' column: using the original queries instead")
    emb_manifest = read_manifest(emb_dir)
    corpus = cfg.corpus or emb_manifest.get("input") or ""
    allowed, held_out = allowed_images(corpus, cfg.pool_splits)
    extra, extra_counts = load_extra(cfg.extra_tables, all_queries, cfg.splits, allowed)
    reph = queries.column("rephrased").to_pylist() if has_reph else [None] * queries.num_rows
    qtexts = [QueryText(qid, q, r if r and str(r).strip() else None) for qid, q, r in zip(
        queries.column("query_id").to_pylist(), queries.column("query").to_pylist(), reph,
        strict=True)]
    n_no_reph = sum(q.rephrased is None for q in qtexts)
    n_fallback = (sum(bool(x) for x in queries.column("fallback").to_pylist())
                  if "fallback" in queries.column_names else 0)
    log.info("%d queries in splits %s (%d without a rephrase, %d rephraser fallbacks)",
             len(qtexts), cfg.splits, n_no_reph, n_fallback)

    spec = cfg.model or ModelSpec.from_record(emb_manifest.get("model") or {},
                                              f"{emb_dir}/manifest.json")
    t0 = time.time()
    retriever = load_retriever(spec, device="cpu")
    recorded = (emb_manifest.get("model") or {}).get("checkpoint_hash")
    if cfg.model is None and recorded and retriever.checkpoint_hash and \
            recorded != retriever.checkpoint_hash:
        log.warning("the checkpoint changed since the corpus was embedded (%s, now %s): query "
                    "and image vectors may not match", recorded, retriever.checkpoint_hash)
    if cfg.index:
        from aligner.retrieval.index import SearchIndex

        candidates: Any = IndexCandidates(SearchIndex.load(cfg.index), emb_dir, allowed)
    else:
        candidates = MatrixCandidates.from_embeddings(emb_dir, allowed)
    if candidates.dim != retriever.embed_dim:
        raise ValueError(f"the query model embeds into {retriever.embed_dim} dims but the "
                         f"corpus vectors have {candidates.dim}: use the model that embedded it")
    log.info("model %s and candidates ready in %.1f s", retriever.describe(), time.time() - t0)

    reward = None
    if "reward" in cfg.aesthetic:
        from aligner.reward.teacher import PoolRewards

        reward = PoolRewards(cfg.reward_model, corpus)
    t0 = time.time()
    pools = build_pools(qtexts, retriever.encode_texts, candidates, settings,
                        bad_rephraser(cfg), reward=reward)
    rows, stats = build_pairs(pools, settings)
    log.info("%d pools scored, %d pairs emitted in %.1f s (grid shrunk for %d, no grid for %d, "
             "empty %d)", len(pools), len(rows), time.time() - t0, stats["reduced_grids"],
             stats["no_grid"], stats["empty_pools"])
    table = rows_to_table(rows)
    if extra is not None:
        table = pa.concat_tables([table, extra])
    emitted = count_by(table, "source")
    table, clean = clean_pairs(table, parse_source_weights(cfg.source_weights),
                                 cfg.max_pairs_per_source, cfg.max_pairs_per_query, cfg.seed)
    log.info("clean-up: %s", clean)

    with output_dir(cfg.output) as out:  # a URI: staged locally, uploaded at the end
        write_preferences(table, out)
        per_query = np.array(list(count_by(table, "query_id").values()) or [0])
        pngs: list[str] = []
        if cfg.examples and corpus:
            try:
                pngs = draw_examples(pools, settings, corpus, out, cfg.examples)
            except (OSError, ValueError) as e:
                log.warning("example PNGs skipped: %s", e)
        counts = {"queries": len(qtexts), "queries_without_rephrase": n_no_reph,
                  "rephraser_fallbacks": n_fallback, "emitted_by_source": emitted,
                  "by_source": count_by(table, "source"), "pairs": table.num_rows,
                  "pairs_per_query": {"mean": round(float(per_query.mean()), 2),
                                      "min": int(per_query.min()), "max": int(per_query.max()),
                                      "queries_with_pairs": int((per_query > 0).sum())
                                      if table.num_rows else 0},
                  "clean": clean, "pools": stats}
        save_config(cfg, out / "config.yaml")
        write_manifest(out, "build_preferences", to_dict(cfg), started,
                       inputs={"embeddings": str(emb_dir), "index": cfg.index or None,
                               "queries": cfg.queries, "corpus": corpus or None,
                               "extra_tables": extra_counts},
                       model=retriever.describe(), teacher=settings.teacher, held_out=held_out,
                       teacher_spec={"name": settings.teacher, "aesthetic": list(cfg.aesthetic),
                                     "aesthetic_weights": [float(w) for w in
                                                           cfg.aesthetic_weights],
                                     "bad_template": cfg.bad_template,
                                     "bad_rephraser": cfg.bad_rephraser, "queries": cfg.queries,
                                     "reward_model": cfg.reward_model},
                       reward=reward.describe() if reward is not None else None,
                       grid={"k": cfg.k, "u": cfg.u, "v": cfg.v, "stride": cfg.stride,
                             "retrieve_with": cfg.retrieve_with, "weighting": cfg.weighting},
                       degrade={"kinds": settings.degrade_kinds,
                                "strengths": settings.degrade_strengths, "seed": 0,
                                "id_format": "<id>~<kind>[@<strength>]"},
                       counts=counts, outputs={"preferences": PREFERENCES_FILE, "png": pngs})
    return counts
