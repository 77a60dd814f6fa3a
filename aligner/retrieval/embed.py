"""The embedding job as a library function: plan, resume, run the Ray Data pipeline, write.

:func:`run_embed` is what ``python -m jobs.embed`` and the quickstart call. Steps: plan the
input's shards (fails fast on a missing input or a wrong schema), skip the shards already
written to ``output`` (resume), load the model once on the driver (to check the spec, get D and
the eval transform), run :mod:`aligner.retrieval.embed_pipeline` over the pending shards and
write each shard as soon as it is complete (:class:`aligner.data.embeddings.ShardWriter`), then
``manifest.json`` with the totals of the whole output and of this run. Every input file or
row is accounted for: embedded, a failure row with its reason, or a skipped file
(``skipped.parquet``: not an image type), and the manifest's counts add up to the input.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aligner.data.corpus_plan import CorpusPlan
from aligner.data.images import DEFAULT_MAX_PIXELS
from aligner.data.io import FAILURES_DIR
from aligner.retrieval.models import ModelSpec
from aligner.runtime.config import save_config, to_dict

log = logging.getLogger(__name__)


@dataclass
class EmbedConfig:
    """Embed an image corpus and score its aesthetics."""

    input: str = field(default="out/world/corpus",
                       metadata={"help": "corpus: Parquet dir/file, image folder or tar(s); "
                                         "local path or s3://, gs:// URI"})
    input_format: str = field(default="auto",
                              metadata={"help": "auto | parquet | folder | webdataset"})
    output: str = field(default="out/embeddings", metadata={"help": "output directory"})
    model: ModelSpec = field(default_factory=ModelSpec,
                             metadata={"help": "retriever (model.name, model.pretrained, "
                                               "model.checkpoint)"})
    batch_size: int = field(default=256, metadata={"help": "images per model call"})
    num_actors: int = field(default=0, metadata={"help": "model actors (0: from the cluster)"})
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
        if self.num_actors < 0:
            raise ValueError("num_actors must be >= 0")
        if not self.input or not self.output:
            raise ValueError("input and output are required")
        if "://" in self.output:  # the writer, manifest and config helpers use local paths
            raise ValueError(f"output {self.output!r}: only local or mounted paths (e.g. a "
                             "FUSE-mounted bucket) are supported for outputs so far")


def _spec_key(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec.get(k) for k in ("name", "pretrained", "checkpoint", "image_size",
                                     "embed_dim")}


def check_resumable(cfg: EmbedConfig, plan_ids: list[str], done: set[str]) -> None:
    """Refuse to mix results: a different model or input shards this plan does not have.

    Raises:
        ValueError: the output was started with another model or another input.
    """
    from aligner.data.embeddings import read_plan

    prev = read_plan(cfg.output)
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

    Everything that can be checked without Ray is checked first (input, schema, scorer,
    resumability); Ray is started (or joined) only when there is work to do.

    Raises:
        FileNotFoundError: missing input.
        ValueError: wrong corpus schema, unknown scorer, or an output that cannot be resumed.
        RuntimeError: shards that did not complete.
    """
    from aligner.aesthetics.scorer import make_scorer
    from aligner.data import embeddings as E
    from aligner.data.corpus_plan import plan_corpus
    from aligner.retrieval.embed_pipeline import build_pipeline
    from aligner.runtime.logs import RateLog, throughput
    from aligner.runtime.manifest import write_manifest

    started = time.time()
    scorer = make_scorer(cfg.scorer)  # an unknown scorer fails before any work
    corpus = plan_corpus(cfg.input, cfg.input_format, cfg.rows_per_shard)
    shards = corpus.shards
    out = Path(cfg.output)
    if cfg.overwrite and out.exists():
        log.warning("overwrite=true: deleting earlier results in %s", out)
        for sub in (E.EMBEDDINGS_DIR, FAILURES_DIR):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / E.PLAN_FILE).unlink(missing_ok=True)
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
                    E.count_reasons(r for _, r in corpus.skipped), out / E.SKIPPED_FILE)
    if not pending:
        log.info("%d shards already done, nothing to do", len(shards))
        if not (out / "manifest.json").is_file():  # finished, but the manifest was lost
            prev = E.read_plan(out) or {}
            totals = E.output_counts(out)
            write_manifest(out, "embed", config=to_dict(cfg), started=started, input=cfg.input,
                           model=prev.get("model"), shards={"total": len(shards),
                                                            "done": totals["shards_done"]},
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
        raise ValueError(f"{out} was started with weights {prev_hash}, these are "
                         f"{retriever.checkpoint_hash} (the checkpoint changed): use another "
                         "output or overwrite=true")
    E.write_plan(out, shards, dataclasses.asdict(cfg.model), cfg.input, retriever.checkpoint_hash)
    save_config(cfg, out / "config.yaml")
    plan = plan_model_actors(ray.cluster_resources(), cfg.num_actors)
    log.info("actor pool: %s", plan)
    ds = build_pipeline(pending, retriever.preprocess, dataclasses.asdict(cfg.model), plan,
                          cfg.batch_size, cfg.max_pixels, cfg.scorer, cfg.read_batch_rows)
    writer = E.ShardWriter(out, pending, retriever.embed_dim, tuple(cfg.keep_columns))
    progress = RateLog("embed", None, logger=log)
    t_pipe = progress.start
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        writer.add(batch)
        progress.update(len(batch["id"]), shards_written=f"{len(writer.written)}/{len(pending)}",
                        failed=writer.rows_failed)
    wall = time.time() - t_pipe
    incomplete = writer.pending()
    startup = progress.startup_s
    steady = max(wall - startup, 1e-9)
    summary.update(shards_processed=len(writer.written), rows_in=writer.rows_in,
                   rows_out=writer.rows_out, rows_failed=writer.rows_failed,
                   failure_reasons=writer.failure_reasons, pipeline_s=round(wall, 3),
                   startup_s=round(startup, 3),
                   rows_per_s=round(throughput(writer.rows_in, wall), 1),
                   steady_rows_per_s=round(throughput(writer.rows_in, steady), 1),
                   incomplete_shards=incomplete)
    log.info("this run: %d shards, rows in %d / out %d / failed %d %s; %.1f s (start-up %.1f s),"
             " %.0f rows/s overall, %.0f rows/s after start-up", len(writer.written),
             writer.rows_in, writer.rows_out, writer.rows_failed, writer.failure_reasons or "",
             wall, startup, summary["rows_per_s"], summary["steady_rows_per_s"])
    totals = E.output_counts(out)
    write_manifest(out, "embed", config=to_dict(cfg), started=started, input=cfg.input,
                   model=model, dim=retriever.embed_dim, scorer=scorer.describe(),
                   actor_pool=dataclasses.asdict(plan), shards={
                       "total": len(shards), "done": totals["shards_done"],
                       "skipped_this_run": len(done), "incomplete": incomplete},
                   files=files_account(corpus, totals), rows_in=totals["rows_in"], rows_out=totals["rows_out"],
                   rows_failed=totals["rows_failed"], this_run=summary,
                   outputs={"embeddings": f"{E.EMBEDDINGS_DIR}/", "failures": f"{FAILURES_DIR}/",
                            "skipped": E.SKIPPED_FILE, "plan": E.PLAN_FILE})
    if incomplete:
        raise RuntimeError(f"{len(incomplete)} shards did not complete: {incomplete[:5]}; "
                           "re-run to redo them")
    return summary




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
