"""The annotation job as a library function: VisionPrefer-style LMM ratings and the
per-aspect preference pairs derived from them.

:func:`run_annotate` is what ``python -m jobs.annotate`` calls:

1. queries: a queries table filtered to ``splits`` / ``kinds`` (training queries by default:
   annotations are training data);
2. candidates per query: the top ``n`` images retrieved by the model that embedded the
   corpus (``embeddings``), among the corpus images of ``pool_splits`` only - held-out images
   never reach a preferences table - or the first ``n`` distinct ids per query of a
   ``candidates`` table (``query_id``, ``image_id``: e.g. a rankings table);
3. Ray Data: an actor pool (:class:`AnnotateBatch`, the VLM loaded once per actor) or tasks
   for the HTTP back end (:func:`annotate_batch`) rate each (query, image) on every aspect;
4. outputs: ``ratings.parquet`` (:mod:`aligner.data.ratings`), ``preferences.parquet``
   (:mod:`aligner.data.preferences`: source ``lmm``, ``aspect`` kept; pairs per aspect, ties
   dropped, :func:`aligner.judge.annotate.derive_pairs`), ``config.yaml``, ``manifest.json``.

The preferences output is an ``extra_tables`` entry of ``jobs.build_preferences`` or the
``preferences`` of ``jobs.align`` as it is.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from aligner.judge.config import (
    OpenAIOptions,
    TransformersOptions,
    VLLMOptions,
    backend_options,
    check_backend,
)

log = logging.getLogger(__name__)
ANNOTATE_BACKENDS = ("openai", "transformers", "vllm")


@dataclass
class AnnotateConfig:
    """VisionPrefer-style annotation: an LMM rates (query, image) per aspect; pairs per aspect."""

    queries: str = field(default="out/world/queries/queries.parquet", metadata={
        "help": "queries table (query_id, query[, split, kind])"})
    splits: list[str] = field(default_factory=lambda: ["train"], metadata={
        "help": "query splits to annotate ([]: all)"})
    kinds: list[str] = field(default_factory=list, metadata={"help": "query kinds ([]: all)"})
    limit: int = field(default=0, metadata={"help": "first N queries after filters (0: all)"})
    embeddings: str = field(default="out/embeddings", metadata={
        "help": "embed job output: candidates are each query's top n by its model"})
    candidates: str = field(default="", metadata={
        "help": "a table of query_id, image_id to rate instead of retrieving (e.g. rankings)"})
    n: int = field(default=4, metadata={"help": "images rated per query"})
    pool_splits: list[str] = field(default_factory=lambda: ["train"], metadata={
        "help": "corpus splits whose images may be rated ([]: every image)"})
    corpus: str = field(default="", metadata={
        "help": "where the images are ('' = the embeddings manifest's input)"})
    output: str = field(default="out/annotate", metadata={"help": "output directory"})
    backend: str = field(default="openai", metadata={"help": " | ".join(ANNOTATE_BACKENDS)})
    prompt: str = field(default="annotate", metadata={
        "help": "rating prompt id or .yaml file (aligner/judge/prompts)"})
    aspects: list[str] = field(default_factory=list, metadata={
        "help": "aspects to rate ([]: all of the prompt's)"})
    rationale: bool = field(default=True, metadata={"help": "keep a short reason"})
    rationale_tokens: int = field(default=48, metadata={"help": "tokens for the reason"})
    thumb: int = field(default=448, metadata={"help": "longest side of the image shown"})
    min_gap: int = field(default=1, metadata={
        "help": "rating difference that makes a pair (equal ratings never do)"})
    openai: OpenAIOptions = field(default_factory=OpenAIOptions, metadata={"help": "endpoint"})
    transformers: TransformersOptions = field(default_factory=TransformersOptions, metadata={
        "help": "in-process VLM"})
    vllm: VLLMOptions = field(default_factory=VLLMOptions, metadata={"help": "vLLM"})
    batch_size: int = field(default=8, metadata={"help": "images per Ray Data batch"})
    num_actors: int = field(default=0, metadata={
        "help": "annotator actors for in-process back ends (0: 1)"})
    actor_cpus: float = field(default=0.0, metadata={
        "help": "CPUs per actor / task (0: 1 in-process, 0.25 for HTTP)"})
    ray_address: str | None = field(default=None, metadata={
        "help": "Ray cluster (default: RAY_ADDRESS or a local Ray)"})
    progress: bool = field(default=True, metadata={"help": "Ray Data progress bars"})

    def __post_init__(self) -> None:
        if self.backend not in ANNOTATE_BACKENDS:
            raise ValueError(f"backend {self.backend!r}: one of {list(ANNOTATE_BACKENDS)} (an "
                             "annotator is an LMM)")
        for name in ("n", "batch_size", "thumb", "min_gap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("limit", "num_actors", "actor_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not self.output or (not self.embeddings and not self.candidates):
            raise ValueError("output and embeddings (or candidates) are required")

    def check_backend(self) -> None:
        """Raise ValueError when the chosen back end lacks what it needs, or the prompt or
        aspects do not fit (checked when the job starts, not for the listing of defaults)."""
        from aligner.judge.prompts import load_judge_prompt

        check_backend(self, self.backend)
        p = load_judge_prompt(self.prompt)
        if p.style != "rating":
            raise ValueError(f"prompt {p.id} is a {p.style} prompt: annotation needs a rating "
                             "prompt (annotate)")
        unknown = [a for a in self.aspects if a not in p.questions]
        if unknown:
            raise ValueError(f"aspects {unknown} are not in prompt {p.id} ({list(p.aspects)})")


def _candidates_from_table(path: str, qids: list[str], n: int) -> dict[str, list[str]]:
    from aligner.data.io import read_parquet

    t = read_parquet(path, "candidates table", columns=None)
    missing = [c for c in ("query_id", "image_id") if c not in t.column_names]
    if missing:
        raise ValueError(f"candidates table {path} lacks columns {missing} (has "
                         f"{t.column_names}): it needs query_id and image_id")
    if "rank" in t.column_names:
        t = t.sort_by([("rank", "ascending")])
    want = set(qids)
    out: dict[str, list[str]] = {}
    for q, i in zip(t.column("query_id").to_pylist(), t.column("image_id").to_pylist(),
                    strict=True):
        if q in want and i:
            got = out.setdefault(q, [])
            if i not in got and len(got) < n:
                got.append(i)
    return out


def _candidates_from_embeddings(cfg: AnnotateConfig, corpus: str, qids: list[str],
                                texts: list[str]) -> tuple[dict[str, list[str]], dict]:
    from aligner.preferences.build import allowed_images
    from aligner.preferences.candidates import MatrixCandidates
    from aligner.retrieval.models import ModelSpec, load_retriever
    from aligner.runtime.manifest import read_manifest

    emb = Path(cfg.embeddings)
    if not emb.is_dir():
        raise FileNotFoundError(f"embeddings {emb} does not exist")
    spec = ModelSpec.from_record(read_manifest(emb).get("model") or {}, f"{emb}/manifest.json")
    allowed, held = allowed_images(corpus, cfg.pool_splits)
    cands = MatrixCandidates.from_embeddings(emb, allowed)
    retriever = load_retriever(spec, device="cpu")
    found = cands.search(retriever.encode_texts(texts), cfg.n)
    return dict(zip(qids, found.ids, strict=True)), held


def rating_items(cfg: AnnotateConfig) -> tuple[list[dict[str, str]], str, dict[str, Any]]:
    """The (query_id, query, image_id) rows to rate, the corpus, and what was held out.

    Raises:
        FileNotFoundError: missing queries, embeddings or corpus.
        ValueError: no query or no candidate left.
    """
    from aligner.data.queries import read_queries
    from aligner.runtime.manifest import read_manifest

    q = read_queries(cfg.queries, cfg.splits, cfg.kinds, cfg.limit)
    if q.num_rows == 0:
        raise ValueError(f"queries {cfg.queries}: none in splits {cfg.splits} kinds {cfg.kinds}")
    qids, texts = q.column("query_id").to_pylist(), q.column("query").to_pylist()
    corpus = cfg.corpus
    if not corpus and cfg.embeddings and Path(cfg.embeddings).is_dir():
        corpus = str(read_manifest(cfg.embeddings).get("input") or "")
    if not corpus:
        raise ValueError("no corpus: set corpus= (or embeddings= whose manifest names one)")
    if "://" not in corpus and not Path(corpus).exists():
        raise FileNotFoundError(f"corpus {corpus} does not exist")
    held: dict[str, Any] = {}
    if cfg.candidates:
        per = _candidates_from_table(cfg.candidates, qids, cfg.n)
        if cfg.pool_splits:
            from aligner.preferences.build import allowed_images

            allowed, held = allowed_images(corpus, cfg.pool_splits)
            if allowed is not None:
                per = {k: [i for i in v if i in allowed] for k, v in per.items()}
    else:
        per, held = _candidates_from_embeddings(cfg, corpus, qids, texts)
    items = [{"query_id": qid, "query": text, "image_id": i}
             for qid, text in zip(qids, texts, strict=True) for i in per.get(qid, [])]
    if not items:
        raise ValueError("no (query, image) to rate: no candidate survived the filters")
    return items, corpus, held


def _rate(batch: pa.Table, annotator: Any, corpus: str, thumb: int) -> pa.Table:
    from aligner.data.corpus import fetch_images
    from aligner.data.images import ImageError
    from aligner.data.ratings import ratings_table
    from aligner.judge.annotate import RatingItem
    from aligner.judge.images import to_png

    rows = batch.to_pylist()
    images = fetch_images(corpus, [r["image_id"] for r in rows])
    items = []
    for r in rows:
        data, err = images.get(r["image_id"]), ""
        if data is None:
            err = f"missing image {r['image_id']!r}"
        else:
            try:
                data = to_png(data, thumb)
            except ImageError as e:
                data, err = None, f"bad image: {e}"
        items.append(RatingItem(r["query_id"], r["query"], r["image_id"], data, err))
    return ratings_table(annotator.rate(items))


def _annotator(spec: dict[str, Any]) -> Any:
    from aligner.judge.annotate import LMMAnnotator
    from aligner.judge.backend import make_backend

    return LMMAnnotator(make_backend(spec["backend"], **spec["options"]), spec["prompt"],
                        spec["aspects"], spec["rationale"], spec["rationale_tokens"])


class AnnotateBatch:
    """Ray Data callable class: the annotator (its VLM) built once per actor."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.annotator, self.spec = _annotator(spec), spec

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _rate(batch, self.annotator, self.spec["corpus"], self.spec["thumb"])


def annotate_batch(batch: pa.Table, spec: dict[str, Any]) -> pa.Table:
    """Ray Data task for the HTTP back end."""
    return _rate(batch, _annotator(spec), spec["corpus"], spec["thumb"])


def run_annotate(cfg: AnnotateConfig) -> dict[str, Any]:
    """Run the job; returns the manifest.

    Raises:
        FileNotFoundError: missing queries, embeddings, corpus or model.
        ValueError: bad input (no queries, no candidates, a bad prompt or back end).
    """
    import ray

    from aligner.data.preferences import rows_to_table, write_preferences
    from aligner.data.ratings import RATINGS_FILE, write_ratings
    from aligner.judge.annotate import derive_pairs
    from aligner.runtime.config import save_config, to_dict
    from aligner.runtime.manifest import write_manifest
    from aligner.runtime.raycluster import init_ray

    started = time.time()
    cfg.check_backend()
    items, corpus, held = rating_items(cfg)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    spec = {"backend": cfg.backend, "options": backend_options(cfg, cfg.backend),
            "prompt": cfg.prompt, "aspects": list(cfg.aspects), "rationale": cfg.rationale,
            "rationale_tokens": cfg.rationale_tokens, "corpus": corpus, "thumb": cfg.thumb}
    log.info("rating %d (query, image) pairs of %d queries with %s", len(items),
             len({i["query_id"] for i in items}), cfg.backend)
    init_ray(cfg.ray_address, progress_bars=cfg.progress)
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) /
                                                                         cfg.batch_size)))
    if cfg.backend == "openai":
        ds = ds.map_batches(annotate_batch, batch_size=cfg.batch_size, batch_format="pyarrow",
                            num_cpus=cfg.actor_cpus or 0.25, fn_kwargs={"spec": spec})
    else:
        gpus = cfg.vllm.num_gpus if cfg.backend == "vllm" else 0
        ds = ds.map_batches(AnnotateBatch, batch_size=cfg.batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors or 1),
                            num_cpus=cfg.actor_cpus or (0.5 if gpus else 1.0),
                            num_gpus=gpus or None, fn_constructor_kwargs={"spec": spec})
    t = time.time()
    tables = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    wall = time.time() - t
    ratings = pa.concat_tables(tables)
    order = {(r["query_id"], r["image_id"]): i for i, r in enumerate(items)}
    keys = list(zip(ratings.column("query_id").to_pylist(),
                    ratings.column("image_id").to_pylist(), strict=True))
    ratings = ratings.take(pa.array(sorted(range(len(keys)), key=lambda i: order[keys[i]]),
                                    pa.int64()))
    write_ratings(ratings, out)
    rows, counts = derive_pairs(ratings, cfg.min_gap)
    prefs = write_preferences(rows_to_table(rows), out)
    status = ratings.column("status").to_pylist()
    annotators = sorted(set(ratings.column("annotator").to_pylist()))
    manifest = write_manifest(
        out, "annotate", config=to_dict(cfg), started=started,
        inputs={"queries": cfg.queries, "corpus": corpus,
                "candidates": cfg.candidates or f"top {cfg.n} by {cfg.embeddings}"},
        held_out=held, annotator=annotators[0] if annotators else "",
        counts={"items": len(items), "ratings": len(status),
                "ratings_ok": status.count("ok"), "ratings_failed": status.count("failed"),
                "pairs": len(rows), "pairs_by_aspect": counts["pairs"],
                "ties_by_aspect": counts["ties"], "below_gap_by_aspect": counts["below_gap"]},
        this_run={"pipeline_s": round(wall, 2),
                  "ratings_per_s": round(len(status) / max(wall, 1e-9), 3)},
        outputs={"ratings": RATINGS_FILE, "preferences": prefs.name, "config": "config.yaml"})
    return manifest

