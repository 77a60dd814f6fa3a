"""Build the preference pairs that ranked DPO trains on (METHOD.md sections 1 and 3).

    python -m jobs.build_preferences --config jobs/configs/build_preferences.yaml \\
        embeddings=out/embeddings queries=out/rephrased output=out/preferences

For every query of the chosen ``splits``: retrieve the top ``k`` images with the rephrased
query (exactly from the embeddings, or from ``index`` when given), order them by similarity to
the original query and by the teacher's aesthetic score, sample a ``u x v`` grid at ``stride``
and emit its dominance pairs (source ``grid``); pair the top ``degraded_per_query`` candidates
with degraded copies of themselves (source ``degraded``); add pairs from ``extra_tables``
(human votes, LMM labels ...); then apply source weights, dedupe, drop contradictions and cap
(:mod:`aligner.data.preferences`).

The query encoder defaults to the model recorded in the embeddings manifest, so query and
image vectors match. No Ray: the work is a few matrix products per thousand queries; a corpus
too large for memory goes through a faiss ``index`` instead of the in-memory matrix.

Writes to ``output``: ``preferences.parquet``, ``grids.png`` (example grids: rows = semantic
order, columns = aesthetic order), ``degraded.png`` (one image and its degraded copies),
``config.yaml`` and ``manifest.json`` (counts per source, pairs per query, dedupe and
contradiction counts, grid shape, inputs).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aligner.preferences.pairs import DEFAULT_BAD_TEMPLATE, PairSettings
from aligner.retrieval.models import ModelSpec
from aligner.runtime.config import dump_yaml, load_config, save_config, to_dict
from aligner.runtime.logs import setup_logging

log = logging.getLogger("jobs.build_preferences")
DEFAULT_YAML = Path(__file__).parent / "configs" / "build_preferences.yaml"
OUTPUT_FILE = "preferences.parquet"


@dataclass
class BuildPreferencesConfig:
    """Build grid, degraded-copy and extra preference pairs for ranked DPO."""

    embeddings: str = field(default="out/embeddings",
                            metadata={"help": "embed job output (id, embedding, aesthetic)"})
    queries: str = field(default="out/rephrased",
                         metadata={"help": "dir holding queries.parquet, or a Parquet file "
                                           "(query_id, query, split[, rephrased])"})
    output: str = field(default="out/preferences", metadata={"help": "output directory"})
    index: str = field(default="", metadata={"help": "faiss index dir (jobs.build_index) for "
                                                    "retrieval; '' = exact over the embeddings"})
    corpus: str = field(default="", metadata={"help": "corpus for the example PNGs ('' = the "
                                                     "embeddings manifest's input)"})
    splits: list[str] = field(default_factory=lambda: ["train"],
                              metadata={"help": "query splits to build pairs for"})
    model: ModelSpec | None = field(default=None, metadata={
        "help": "query encoder; unset = the model that embedded the corpus (its manifest)"})
    k: int = field(default=64, metadata={"help": "candidates retrieved per query"})
    u: int = field(default=2, metadata={"help": "grid rows (semantic groups)"})
    v: int = field(default=8, metadata={"help": "grid columns (aesthetic picks per row)"})
    stride: int = field(default=2, metadata={
        "help": "column stride; the grid uses the top u*v*stride candidates by semantics"})
    retrieve_with: str = field(default="original", metadata={
        "help": "pool retrieved with the original query (the model's own results) | rephrased"})
    aesthetic: list[str] = field(default_factory=lambda: ["scorer", "contrast"], metadata={
        "help": "teacher components: scorer, rephrase, contrast (z-scored within the pool)"})
    aesthetic_weights: list[float] = field(default_factory=lambda: [1.0, 1.0],
                                           metadata={"help": "one weight per component"})
    weighting: str = field(default="uniform", metadata={"help": "grid pair weights: uniform | "
                                                               "margin (grid distance)"})
    grid: bool = field(default=True, metadata={"help": "emit grid pairs"})
    degraded: bool = field(default=True, metadata={"help": "emit degraded-copy pairs"})
    degraded_per_query: int = field(default=16, metadata={
        "help": "top candidates (by semantics) paired with a degraded copy of themselves"})
    degrade_kinds: list[str] = field(
        default_factory=lambda: ["blur", "noise", "dark", "bright", "washed", "tint", "crop"],
        metadata={"help": "kinds cycled over the pairs (aligner.preferences.degrade.DEGRADE_KINDS)"})
    degrade_strengths: dict[str, float] = field(default_factory=dict, metadata={
        "help": "per-kind strength in (0, 1] (default 0.6), e.g. {blur: 0.8}"})
    bad_template: str = field(default=DEFAULT_BAD_TEMPLATE, metadata={
        "help": "antonym rephrase for 'contrast' ({q} = the query)"})
    bad_rephraser: str = field(default="", metadata={
        "help": "'' = bad_template; 'template:<style>' = aligner.rephrase TemplateRephraser "
                "(style, polarity=bad)"})
    fallback_to_original: bool = field(default=False, metadata={
        "help": "a queries table without 'rephrased' uses the original queries instead of "
                "failing"})
    extra_tables: list[str] = field(default_factory=list, metadata={
        "help": "preference tables to add (human votes, LMM labels): files or dirs"})
    source_weights: str = field(default="", metadata={
        "help": "weight multipliers per source, e.g. 'grid=1.0,degraded=0.5'"})
    max_pairs_per_query: int = field(default=0, metadata={"help": "cap (0: none), seeded"})
    max_pairs_per_source: int = field(default=0, metadata={"help": "cap (0: none), seeded"})
    seed: int = field(default=0, metadata={"help": "seed of the caps' subsampling"})
    examples: int = field(default=2, metadata={"help": "example grids drawn to grids.png"})

    def __post_init__(self) -> None:
        from aligner.data.preferences import parse_source_weights

        if not self.embeddings or not self.queries or not self.output:
            raise ValueError("embeddings, queries and output are required")
        if self.examples < 0 or self.max_pairs_per_query < 0 or self.max_pairs_per_source < 0:
            raise ValueError("examples and caps must be >= 0")
        if self.bad_rephraser and not self.bad_rephraser.startswith("template:"):
            raise ValueError(f"bad_rephraser {self.bad_rephraser!r}: '' or 'template:<style>'")
        if "{q}" not in self.bad_template:
            raise ValueError("bad_template needs a {q} placeholder")
        parse_source_weights(self.source_weights)
        self.settings()  # checks the pair settings

    def settings(self) -> PairSettings:
        return PairSettings(k=self.k, u=self.u, v=self.v, stride=self.stride,
                            retrieve_with=self.retrieve_with, aesthetic=list(self.aesthetic),
                            aesthetic_weights=list(self.aesthetic_weights),
                            weighting=self.weighting, grid=self.grid, degraded=self.degraded,
                            degraded_per_query=self.degraded_per_query,
                            degrade_kinds=list(self.degrade_kinds),
                            degrade_strengths=dict(self.degrade_strengths))


# ----------------------------------------------------------------------------- inputs

def spec_from_embeddings(embeddings: str | Path) -> tuple[ModelSpec, dict[str, Any]]:
    """The model that embedded a corpus (from the embed manifest) and the manifest itself.

    Raises:
        FileNotFoundError: no manifest.json.
        ValueError: the manifest does not record the model.
    """
    from aligner.runtime.manifest import read_manifest

    m = read_manifest(embeddings)
    model = m.get("model") or {}
    if not model:
        raise ValueError(f"{embeddings}/manifest.json does not record the embedding model: "
                         "pass model.name / model.checkpoint explicitly")
    spec = ModelSpec(name=model.get("name") or "builtin", pretrained=model.get("pretrained"),
                     checkpoint=model.get("checkpoint"))
    if spec.name == "builtin" and not spec.checkpoint:
        spec.image_size = int(model.get("image_size") or spec.image_size)
        spec.embed_dim = int(model.get("embed_dim") or spec.embed_dim)
    return spec, m


def read_queries(path: str | Path, splits: list[str]):
    """The queries table (a dir holding ``queries.parquet`` or Parquet files, or a file),
    restricted to ``splits``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: missing columns, duplicate query ids, or no query in ``splits``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    p = Path(path)
    if p.is_dir():
        files = [p / "queries.parquet"] if (p / "queries.parquet").is_file() else sorted(
            f for f in p.glob("*.parquet") if not f.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"queries: no queries.parquet or Parquet files in {p}")
        t = pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
    elif p.is_file():
        t = pq.read_table(p)
    else:
        raise FileNotFoundError(f"queries: {p} does not exist")
    need = ["query_id", "query"] + (["split"] if splits else [])
    missing = [c for c in need if c not in t.column_names]
    if missing:
        raise ValueError(f"queries {p} lacks columns {missing} (has {t.column_names})")
    if len(set(t.column("query_id").to_pylist())) != t.num_rows:
        raise ValueError(f"queries {p} holds duplicate query_id values")
    all_splits = t
    if splits:
        t = t.filter(pc.is_in(t.column("split"), pa.array(splits)))
    if t.num_rows == 0:
        raise ValueError(f"queries {p} has no queries in splits {splits}")
    return t, all_splits


def load_extra(paths: list[str], all_queries, splits: list[str]):
    """Extra preference tables, minus rows of queries that belong to other splits (a test
    query's human votes must not train). Returns (table or None, per-file counts)."""
    import pyarrow as pa

    from aligner.data.preferences import read_preference_table

    if not paths:
        return None, {}
    split_of = (dict(zip(all_queries.column("query_id").to_pylist(),
                         all_queries.column("split").to_pylist(), strict=True))
                if splits and "split" in all_queries.column_names else {})
    tables, counts = [], {}
    for path in paths:
        t = read_preference_table(path)
        # queries unknown to the queries table are kept: their split cannot be checked
        keep = np.array([q not in split_of or split_of[q] in splits
                         for q in t.column("query_id").to_pylist()], bool)
        counts[path] = {"rows": t.num_rows, "dropped_other_split": int((~keep).sum())}
        tables.append(t.filter(pa.array(keep)))
        log.info("extra table %s: %d rows, %d dropped (queries of other splits)", path,
                 t.num_rows, int((~keep).sum()))
    return pa.concat_tables(tables), counts


def bad_rephraser(cfg: BuildPreferencesConfig):
    """The antonym rephraser the ``contrast`` component uses."""
    from aligner.preferences.pairs import template_rephraser

    if cfg.bad_rephraser.startswith("template:"):
        from aligner.rephrase.template import TemplateRephraser

        return TemplateRephraser(style=cfg.bad_rephraser.partition(":")[2],
                                 polarity="bad").rephrase_batch
    return template_rephraser(cfg.bad_template)


# ----------------------------------------------------------------------------- examples

def draw_examples(pools, settings: PairSettings, corpus: str, out: Path, n: int) -> list[str]:
    """``grids.png`` (the u x v grid of ``n`` queries) and ``degraded.png``; returns the files
    written (none when the corpus cannot be read)."""
    from PIL import Image

    from aligner.preferences.degrade import degraded_id, resolve_images
    from aligner.preferences.pairs import fit_grid, sample_grid
    from aligner.retrieval.search import fetch_images
    from aligner.runtime.grids import rows_grid_png

    full = (settings.u, settings.v, settings.stride)
    chosen = [p for p in pools if p.ids and fit_grid(len(p.ids), *full) == full][:n]
    if not chosen:
        return []
    grids = [(p, sample_grid(p.sem, p.aes, fit_grid(len(p.ids), *full))) for p in chosen]
    ids = [p.ids[c] for p, cells in grids for c in cells.reshape(-1)]
    images = fetch_images(corpus, ids)
    if not images:
        log.warning("no example images found in %s: skipping the PNGs", corpus)
        return []
    rows = []
    for p, cells in grids:
        for i, row in enumerate(cells):
            label = f"{p.query} | semantic row {i}" if i == 0 else f"semantic row {i}"
            rows.append((label, [{"image": images.get(p.ids[c]), "score": float(p.sem[c]),
                                  "aesthetic": float(p.aes[c]), "label": f"r{i}c{j} {p.ids[c]}"}
                                 for j, c in enumerate(row)]))
    written = [rows_grid_png(rows, out / "grids.png", title=(
        f"grid {settings.u}x{settings.v} stride {settings.stride}: rows = similarity to the "
        f"query, columns = teacher {settings.teacher} (best first)")).name]
    if settings.degraded:
        top = chosen[0].ids[int(np.argmax(chosen[0].sem))]
        kinds = list(dict.fromkeys(settings.degrade_kinds))
        dids = [degraded_id(top, k, settings.degrade_strengths[k]) for k in kinds]
        pix = resolve_images(corpus, [top, *dids])
        if top in pix:
            items = [{"image": Image.fromarray(pix[i]), "label": lab}
                     for i, lab in zip([top, *dids], ["original", *kinds], strict=True)]
            written.append(rows_grid_png([(top, items)], out / "degraded.png",
                                         title="degraded copies (rejected)").name)
    return written


# ----------------------------------------------------------------------------- run

def run(cfg: BuildPreferencesConfig) -> dict[str, Any]:
    """Build and write the preferences; returns the manifest's counts.

    Raises:
        FileNotFoundError: a missing input.
        ValueError: inputs that do not fit (schema, model size, missing rephrases).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aligner.data import preferences as T
    from aligner.preferences import pairs as P
    from aligner.retrieval.models import load_retriever
    from aligner.runtime.manifest import write_manifest

    started = time.time()
    settings = cfg.settings()
    emb_dir = Path(cfg.embeddings)
    if not emb_dir.is_dir():
        raise FileNotFoundError(f"embeddings {emb_dir} does not exist")
    queries, all_queries = read_queries(cfg.queries, cfg.splits)
    has_reph = "rephrased" in queries.column_names
    if settings.needs_rephrase and not has_reph:
        if not cfg.fallback_to_original:
            raise ValueError(
                f"queries {cfg.queries} has no 'rephrased' column, needed by retrieve_with="
                f"{cfg.retrieve_with} / aesthetic={cfg.aesthetic}: run jobs.rephrase first, or "
                "set fallback_to_original=true (or aesthetic=[scorer] with retrieve_with=original)")
        log.warning("queries have no 'rephrased' column: using the original queries instead")
    extra, extra_counts = load_extra(cfg.extra_tables, all_queries, cfg.splits)
    reph = queries.column("rephrased").to_pylist() if has_reph else [None] * queries.num_rows
    qtexts = [P.QueryText(qid, q, r if r and str(r).strip() else None) for qid, q, r in zip(
        queries.column("query_id").to_pylist(), queries.column("query").to_pylist(), reph,
        strict=True)]
    n_no_reph = sum(q.rephrased is None for q in qtexts)
    n_fallback = (sum(bool(x) for x in queries.column("fallback").to_pylist())
                  if "fallback" in queries.column_names else 0)
    log.info("%d queries in splits %s (%d without a rephrase, %d rephraser fallbacks)",
             len(qtexts), cfg.splits, n_no_reph, n_fallback)

    spec_m, emb_manifest = spec_from_embeddings(emb_dir)
    spec = cfg.model or spec_m
    t0 = time.time()
    retriever = load_retriever(spec, device="cpu")
    recorded = (emb_manifest.get("model") or {}).get("checkpoint_hash")
    if cfg.model is None and recorded and retriever.checkpoint_hash and \
            recorded != retriever.checkpoint_hash:
        log.warning("the checkpoint changed since the corpus was embedded (%s, now %s): query "
                    "and image vectors may not match", recorded, retriever.checkpoint_hash)
    if cfg.index:
        from aligner.retrieval.index import SearchIndex

        candidates: Any = P.IndexCandidates(SearchIndex.load(cfg.index), emb_dir)
    else:
        candidates = P.MatrixCandidates.from_embeddings(emb_dir)
    if candidates.dim != retriever.embed_dim:
        raise ValueError(f"the query model embeds into {retriever.embed_dim} dims but the "
                         f"corpus vectors have {candidates.dim}: use the model that embedded it")
    log.info("model %s and candidates ready in %.1f s", retriever.describe(), time.time() - t0)

    t0 = time.time()
    pools = P.build_pools(qtexts, retriever.encode_texts, candidates, settings,
                          bad_rephraser(cfg))
    rows, stats = P.build_pairs(pools, settings)
    log.info("%d pools scored, %d pairs emitted in %.1f s (grid shrunk for %d, no grid for %d, "
             "empty %d)", len(pools), len(rows), time.time() - t0, stats["reduced_grids"],
             stats["no_grid"], stats["empty_pools"])
    table = T.rows_to_table(rows)
    if extra is not None:
        table = pa.concat_tables([table, extra])
    emitted = T.count_by(table, "source")
    table, clean = T.clean_pairs(table, T.parse_source_weights(cfg.source_weights),
                                 cfg.max_pairs_per_source, cfg.max_pairs_per_query, cfg.seed)
    log.info("clean-up: %s", clean)

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{OUTPUT_FILE}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / OUTPUT_FILE)
    per_query = np.array(list(T.count_by(table, "query_id").values()) or [0])
    corpus = cfg.corpus or emb_manifest.get("input") or ""
    pngs: list[str] = []
    if cfg.examples and corpus:
        try:
            pngs = draw_examples(pools, settings, corpus, out, cfg.examples)
        except (OSError, ValueError) as e:
            log.warning("example PNGs skipped: %s", e)
    counts = {"queries": len(qtexts), "queries_without_rephrase": n_no_reph,
              "rephraser_fallbacks": n_fallback, "emitted_by_source": emitted,
              "by_source": T.count_by(table, "source"), "pairs": table.num_rows,
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
                   model=retriever.describe(), teacher=settings.teacher,
                   grid={"k": cfg.k, "u": cfg.u, "v": cfg.v, "stride": cfg.stride,
                         "retrieve_with": cfg.retrieve_with, "weighting": cfg.weighting},
                   degrade={"kinds": settings.degrade_kinds,
                            "strengths": settings.degrade_strengths, "seed": 0,
                            "id_format": "<id>~<kind>[@<strength>]"},
                   counts=counts, outputs={"preferences": OUTPUT_FILE, "png": pngs})
    return counts


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.build_preferences [--config FILE] [key=value ...]``; the exit code."""
    setup_logging()
    cfg = load_config(BuildPreferencesConfig, argv, DEFAULT_YAML,
                      prog="python -m jobs.build_preferences")
    log.info("config:\n%s", dump_yaml(cfg))
    try:
        counts = run(cfg)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    print(f"build_preferences: {counts['pairs']} pairs for {counts['queries']} queries "
          f"{counts['by_source']} -> {Path(cfg.output) / OUTPUT_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
