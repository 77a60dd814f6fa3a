"""The embedding job as a library function: plan, resume, run the Ray Data pipeline.

:func:`run_embed` is what ``python -m jobs.embed`` and the quickstart call. Steps: plan the
input's shards (fails fast on a missing input, a missing bucket or a wrong schema), skip the
shards already written to ``output`` (resume), load the model once on the driver (to check
the spec, get D and the eval transform), run :mod:`aligner.retrieval.embed_pipeline` over the
pending shards - its workers write the rows; the driver sees only part records and starts a
Ray task that finalises each shard as soon as all its rows are written
(:mod:`aligner.data.embedding_parts`) - then ``manifest.json`` with the totals of the whole
output and of this run. Every input file or row is accounted for: embedded, a failure row with
its reason, or a skipped file (``skipped.parquet``: not an image type), and the manifest's
counts add up to the input. Input and output may be local paths or ``s3://`` / ``gs://`` URIs
(pyarrow filesystems; ``AWS_ENDPOINT_URL`` etc. for S3-compatible stores).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aligner.data.corpus_plan import CorpusPlan
from aligner.data.images import DEFAULT_MAX_PIXELS
from aligner.data.io import FAILURES_DIR, Store, filesystem
from aligner.retrieval.models import ModelSpec
from aligner.runtime.config import dump_yaml, to_dict

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from aligner.data.corpus_plan import Shard
    from aligner.runtime.raycluster import ActorPlan

log = logging.getLogger(__name__)


@dataclass
class EmbedConfig:
    """Embed an image corpus and score its aesthetics."""

    input: str = field(default="out/world/corpus",
                       metadata={"help": "corpus: Parquet dir/file, image folder or tar(s); "
                                         "local path or s3://, gs:// URI"})
    input_format: str = field(default="auto",
                              metadata={"help": "auto | parquet | folder | webdataset"})
    output: str = field(default="out/embeddings",
                        metadata={"help": "output directory: local path or s3://, gs:// URI"})
    model: ModelSpec = field(default_factory=ModelSpec,
                             metadata={"help": "retriever (model.name, model.pretrained, "
                                               "model.checkpoint)"})
    batch_size: int = field(default=256, metadata={"help": "images per model call"})
    num_actors: int = field(default=0, metadata={"help": "model actors (0: from the cluster)"})
    actor_restarts: int = field(default=4,
                                metadata={"help": "restarts of a model actor whose process "
                                                  "died (its batches are retried as often)"})
    rows_per_shard: int = field(default=10_000,
                                metadata={"help": "rows per resumable shard (Parquet/folders)"})
    read_batch_rows: int = field(default=64,
                                 metadata={"help": "rows per read/decode batch (task memory)"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS,
                            metadata={"help": "larger images are recorded as failures"})
    scorer: str = field(default="lowlevel",
                        metadata={"help": "aesthetic scorer (registry name or module:Class)"})
    keep_columns: list[str] = field(default_factory=lambda: ["caption", "split"],
                                    metadata={"help": "corpus columns copied to the output "
                                                      "when present"})
    overwrite: bool = field(default=False,
                            metadata={"help": "delete earlier results in output first"})
    ray_address: str | None = field(default=None,
                                    metadata={"help": "Ray cluster (default: RAY_ADDRESS or a "
                                                      "local Ray)"})
    progress: bool = field(default=True, metadata={"help": "Ray Data progress bars"})

    def __post_init__(self) -> None:
        if self.input_format not in ("auto", "parquet", "folder", "webdataset"):
            raise ValueError(f"input_format {self.input_format!r}: auto|parquet|folder|webdataset")
        for name in ("batch_size", "rows_per_shard", "read_batch_rows", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.num_actors < 0 or self.actor_restarts < 0:
            raise ValueError("num_actors and actor_restarts must be >= 0")
        if not self.input or not self.output:
            raise ValueError("input and output are required")


def _spec_key(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec.get(k) for k in ("name", "pretrained", "checkpoint", "image_size",
                                     "embed_dim")}


def check_resumable(cfg: EmbedConfig, plan_ids: list[str], done: set[str]) -> None:
    """Refuse to mix results: a different model or input shards this plan does not have.

    Raises:
        ValueError: the output was started with another model or another input.
    """
    from aligner.data.embeddings import read_plan

    prev = read_plan(Store(cfg.output))
    if prev is not None and _spec_key(prev.get("model", {})) != _spec_key(
            dataclasses.asdict(cfg.model)):
        raise ValueError(f"{cfg.output} was started with model {prev.get('model')}, not "
                         f"{dataclasses.asdict(cfg.model)}: use another output or overwrite=true")
    stale = done - set(plan_ids)
    if stale:
        raise ValueError(f"{cfg.output} holds {len(stale)} finished shards that are not part of "
                         f"this input (e.g. {sorted(stale)[:3]}): the input changed or it is "
                         "another corpus; use another output or overwrite=true")


def run_embed(cfg: EmbedConfig) -> dict[str, Any]:
    """Run the embedding job; returns a summary of this run.

    Everything that can be checked without Ray is checked first (input, buckets, schema,
    scorer, resumability); Ray is started (or joined) only when there is work to do, and
    nothing in ``output`` is deleted before the input has been planned.

    Raises:
        FileNotFoundError: missing input, or a missing bucket (input or output).
        ValueError: a bad URI, wrong corpus schema, unknown scorer, or an output that cannot
            be resumed.
        RuntimeError: shards that did not complete.
    """
    from aligner.aesthetics.scorer import make_scorer
    from aligner.data import embeddings as E
    from aligner.data.embedding_parts import PARTS_DIR

    started = time.time()
    scorer = make_scorer(cfg.scorer)  # an unknown scorer fails before any work
    input_fs = input_filesystem(cfg.input)
    out = Store(cfg.output)
    out.check("output")
    corpus = plan_input(cfg)
    shards = corpus.shards
    if cfg.overwrite and out.exists(""):
        log.warning("overwrite=true: deleting earlier results in %s", out.uri)
        for sub in (E.EMBEDDINGS_DIR, FAILURES_DIR, PARTS_DIR):
            out.delete_tree(sub)
        out.delete(E.PLAN_FILE)
    done = E.done_shards(out)
    check_resumable(cfg, [s.shard_id for s in shards], done)
    pending = [s for s in shards if s.shard_id not in done]
    known = sum(s.num_rows or 0 for s in pending)
    log.info("input %s: %d shards, %d already done, %d pending (%s rows)", cfg.input,
             len(shards), len(shards) - len(pending), len(pending),
             known if all(s.num_rows is not None for s in pending) else f">= {known}")
    summary: dict[str, Any] = {"shards_total": len(shards), "shards_skipped": len(done),
                               "shards_processed": 0, "rows_in": 0, "rows_out": 0,
                               "rows_failed": 0}
    E.write_skipped(out, corpus.skipped)
    if corpus.skipped:
        log.warning("%d input files are not read (%s); listed in %s", len(corpus.skipped),
                    E.count_reasons(r for _, r in corpus.skipped), out.uri_of(E.SKIPPED_FILE))
    if not pending:
        log.info("%d shards already done, nothing to do", len(shards))
        if not out.is_file("manifest.json"):  # finished, but the manifest was lost
            prev = E.read_plan(out) or {}
            totals = E.output_counts(out)
            write_embed_manifest(out, config=to_dict(cfg), started=started, input=cfg.input,
                                 model=prev.get("model"), shards={
                                     "total": len(shards), "done": totals["shards_done"]},
                                 files=files_account(corpus, totals), rows_in=totals["rows_in"],
                                 rows_out=totals["rows_out"], rows_failed=totals["rows_failed"],
                                 this_run=summary)
        return summary
    removed = E.clean_partial(out, [s.shard_id for s in pending])
    if removed:
        log.info("removed %d partial files of unfinished shards", removed)

    import ray

    from aligner.retrieval.models import load_retriever
    from aligner.runtime.raycluster import init_ray, plan_model_actors

    init_ray(cfg.ray_address, progress_bars=cfg.progress)
    if not cfg.progress:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False

    t = time.time()
    retriever = load_retriever(cfg.model, device="cpu")
    model = retriever.describe()
    log.info("model %s (D=%d) loaded on the driver in %.1f s", model, retriever.embed_dim,
             time.time() - t)
    prev_hash = (E.read_plan(out) or {}).get("checkpoint_hash")
    if done and prev_hash and prev_hash != retriever.checkpoint_hash:
        raise ValueError(f"{out.uri} was started with weights {prev_hash}, these are "
                         f"{retriever.checkpoint_hash} (the checkpoint changed): use another "
                         "output or overwrite=true")
    E.write_plan(out, shards, dataclasses.asdict(cfg.model), cfg.input, retriever.checkpoint_hash)
    out.write_text("config.yaml", dump_yaml(cfg))
    if out.is_local:  # as before: both directories exist even when one stays empty
        for sub in (E.EMBEDDINGS_DIR, FAILURES_DIR):
            out.fs.create_dir(out.path(sub), recursive=True)
    plan = plan_model_actors(ray.cluster_resources(), cfg.num_actors)
    log.info("actor pool: %s", plan)
    run = run_pipeline(cfg, pending, retriever, plan, out, input_fs)
    summary.update(run)
    incomplete = run["incomplete_shards"]
    totals = E.output_counts(out)
    write_embed_manifest(out, config=to_dict(cfg), started=started, input=cfg.input,
                         model=model, dim=retriever.embed_dim, scorer=scorer.describe(),
                         actor_pool=dataclasses.asdict(plan), shards={
                             "total": len(shards), "done": totals["shards_done"],
                             "skipped_this_run": len(done), "incomplete": incomplete},
                         files=files_account(corpus, totals), rows_in=totals["rows_in"],
                         rows_out=totals["rows_out"], rows_failed=totals["rows_failed"],
                         this_run=summary,
                         outputs={"embeddings": f"{E.EMBEDDINGS_DIR}/",
                                  "failures": f"{FAILURES_DIR}/", "skipped": E.SKIPPED_FILE,
                                  "plan": E.PLAN_FILE})
    if incomplete:
        why = next(iter(run["finalise_errors"].values()), "")
        raise RuntimeError(f"{len(incomplete)} shards did not complete: {incomplete[:5]}"
                           f"{f' (e.g. {why})' if why else ''}; re-run to redo them")
    return summary


def run_pipeline(cfg: EmbedConfig, pending: list[Shard], retriever: Any, plan: ActorPlan,
                 out: Store, input_fs: pafs.FileSystem) -> dict[str, Any]:
    """Stream the pipeline's part records; finalise each shard (a Ray task) once complete.

    Returns:
        This run's counts: ``shards_processed``, ``rows_in/out/failed``,
        ``failure_reasons``, ``incomplete_shards``, ``finalise_errors`` (shard -> why its
        merge failed) and timings.
    """
    import ray

    from aligner.data.embedding_parts import PARTS_DIR, ShardTracker, finalize_shard
    from aligner.retrieval.embed_pipeline import WRITE_TASK_CPUS, build_pipeline
    from aligner.runtime.logs import RateLog, throughput

    ds = build_pipeline(pending, retriever.preprocess, dataclasses.asdict(cfg.model), plan, out,
                        retriever.embed_dim, cfg.batch_size, cfg.max_pixels, cfg.scorer,
                        cfg.read_batch_rows, input_fs, cfg.actor_restarts)
    by_id = {s.shard_id: s for s in pending}
    finalize = ray.remote(finalize_shard).options(num_cpus=WRITE_TASK_CPUS,
                                                  max_retries=cfg.actor_restarts)
    tracker = ShardTracker(list(by_id))
    running: dict[Any, str] = {}
    results: list[dict[str, Any]] = []
    errors: dict[str, str] = {}

    def collect(timeout: float | None) -> None:
        refs = list(running)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout) if refs else ([], [])
        for ref in ready:
            sid = running.pop(ref)
            try:
                results.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001 - a shard that cannot be finalised is redone
                log.error("finalising shard %s failed: %s", sid, e)
                errors[sid] = f"{type(e).__name__}: {e}"

    progress = RateLog("embed", None, logger=log)
    t_pipe = progress.start
    try:
        for records in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for sid in tracker.add(records):
                ref = finalize.remote(out, sid, tracker.totals[sid], retriever.embed_dim,
                                      tuple(cfg.keep_columns), by_id[sid], input_fs)
                running[ref] = sid
            collect(0)
            progress.update(int(records["rows"].sum()),
                            shards_written=f"{len(results)}/{len(pending)}",
                            failed=sum(r["rows_failed"] for r in results))
    finally:
        collect(None)  # shards already complete are finalised even if the pipeline failed
    wall = time.time() - t_pipe
    finished = {r["shard_id"] for r in results}
    if finished == set(by_id):
        out.delete_tree(PARTS_DIR)  # only empty shard folders are left
    rows_in = sum(r["rows_in"] for r in results)
    reasons: dict[str, int] = {}
    for r in results:
        for code, n in r["failure_reasons"].items():
            reasons[code] = reasons.get(code, 0) + n
    incomplete = sorted(set(by_id) - finished)
    startup = progress.startup_s
    steady = max(wall - startup, 1e-9)
    run = {"shards_processed": len(results), "rows_in": rows_in,
           "rows_out": sum(r["rows_out"] for r in results),
           "rows_failed": sum(r["rows_failed"] for r in results),
           "failure_reasons": dict(sorted(reasons.items())), "pipeline_s": round(wall, 3),
           "startup_s": round(startup, 3), "rows_per_s": round(throughput(rows_in, wall), 1),
           "steady_rows_per_s": round(throughput(rows_in, steady), 1),
           "incomplete_shards": incomplete, "finalise_errors": errors}
    log.info("this run: %d shards, rows in %d / out %d / failed %d %s; %.1f s (start-up %.1f s),"
             " %.0f rows/s overall, %.0f rows/s after start-up", len(results), rows_in,
             run["rows_out"], run["rows_failed"], reasons or "", wall, startup,
             run["rows_per_s"], run["steady_rows_per_s"])
    return run


def input_filesystem(uri: str) -> pafs.FileSystem:
    """The corpus's filesystem, checked: a bad URI or a missing bucket fails here, clearly.

    Raises:
        ValueError: unsupported scheme or no bucket.
        FileNotFoundError: the bucket does not exist.
    """
    Store(uri).check("input")
    return filesystem(uri)[0]


def plan_input(cfg: EmbedConfig) -> CorpusPlan:
    """:func:`aligner.data.corpus_plan.plan_corpus`, with storage errors made clear.

    Raises:
        FileNotFoundError: nothing at the input.
        ValueError: wrong schema or no usable files.
        ConnectionError: the store cannot be read (unreachable, refused).
    """
    from aligner.data.corpus_plan import plan_corpus

    try:
        return plan_corpus(cfg.input, cfg.input_format, cfg.rows_per_shard)
    except (FileNotFoundError, ValueError):
        raise
    except OSError as e:
        raise ConnectionError(f"cannot read corpus input {cfg.input}: {e}") from e


def write_embed_manifest(out: Store, **fields: Any) -> None:
    """``manifest.json`` of an embed output, local or in an object store."""
    from aligner.runtime.manifest import write_manifest

    local = out.local_path()
    if local is not None:
        write_manifest(local, "embed", **fields)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_manifest(tmp, "embed", **fields)
        out.write_bytes("manifest.json", (Path(tmp) / "manifest.json").read_bytes())


def files_account(corpus: CorpusPlan, totals: dict[str, int]) -> dict[str, Any]:
    """Where every input file went. For a folder corpus (one image file = one row) the parts
    add up: ``rows_in + caption_sidecars + skipped == input_files`` (``accounted``)."""
    from aligner.data.embeddings import count_reasons

    out: dict[str, Any] = {
        "input_files": corpus.files, "data_files": corpus.data_files(),
        "caption_sidecars": corpus.captions, "skipped": len(corpus.skipped),
        "skipped_by_reason": count_reasons(r for _, r in corpus.skipped)}
    if corpus.format == "folder" and totals["rows_in"]:
        out["accounted"] = totals["rows_in"] + corpus.captions + len(corpus.skipped) == \
            corpus.files
        if not out["accounted"]:
            log.warning("input files %d != rows %d + captions %d + skipped %d", corpus.files,
                        totals["rows_in"], corpus.captions, len(corpus.skipped))
    return out
