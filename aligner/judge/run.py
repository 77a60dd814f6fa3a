"""The judge job as a library function: judge two systems' result rows on Ray Data.

:func:`run_judge` is what ``python -m jobs.judge`` calls. It reads an evaluation's
``rankings.parquet`` (:mod:`aligner.data.results`), pairs system a's and system b's top ``k``
per query (``base`` vs ``aligned`` by default), fetches the images from the corpus the
evaluation searched, and judges every pair in both orders with Ray Data: an actor pool
(``map_batches`` with :class:`JudgeBatch`, the model loaded once per actor; one GPU per actor
for ``vllm``) for the in-process back ends and the proxies, plain tasks for the HTTP back end
(:func:`judge_batch`: threads do the waiting).

Output (``output``, default ``<evaluation>/judge``): ``judgments.parquet``
(:mod:`aligner.data.judgments`), ``summary.json`` (:mod:`aligner.judge.summary`: win rate and
win + similar/2 with bootstrap CIs over queries; it records the rankings' SHA-256, so a
report can tell a judge of other rankings), ``config.yaml`` and ``manifest.json``. A finished
output of the same configuration and the same rankings is skipped unless ``overwrite=true``;
new rankings (a new evaluation) are judged again into it; another configuration is refused.
"""

from __future__ import annotations

import dataclasses
import json
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
    identity_options,
)
from aligner.judge.rows import DEFAULT_REWARD_LOADER, JUDGE_BACKENDS, RowPair

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"


@dataclass
class ProxyOptions:
    """The ``proxy`` back end (scorer + similarity: a reference retriever and a scorer)."""

    checkpoint: str = field(default="", metadata={
        "help": "reference retriever whose similarity judges accuracy ('' = the "
                "evaluation's base_checkpoint)"})
    scorer: str = field(default="lowlevel", metadata={"help": "aesthetic scorer"})
    accuracy_margin: float = field(default=0.02, metadata={
        "help": "cosine difference below which accuracy is similar"})
    aesthetic_margin: float = field(default=0.2, metadata={
        "help": "scorer difference below which aesthetics is similar"})
    diversity_margin: float = field(default=0.02, metadata={
        "help": "distance difference below which diversity is similar"})


@dataclass
class RewardOptions:
    """The ``proxy:reward`` back end (a reward model's mean reward per row)."""

    path: str = field(default="", metadata={"help": "the reward model (loader.load(path))"})
    loader: str = field(default=DEFAULT_REWARD_LOADER, metadata={
        "help": "package.module:Class with load(path) and score(prompt, images)"})
    margin: float = field(default=0.05, metadata={
        "help": "mean-reward difference below which the rows are similar"})
    name: str = field(default="", metadata={"help": "suffix of the judge's name"})


@dataclass
class JudgeConfig:
    """Judge two systems' result rows (base vs aligned) with an LMM or a proxy, on Ray Data."""

    evaluation: str = field(default="out/evaluate", metadata={
        "help": "jobs.evaluate output (rankings.parquet, config.yaml)"})
    rankings: str = field(default="", metadata={
        "help": "rankings table ('' = <evaluation>/rankings.parquet)"})
    system_a: str = field(default="base", metadata={"help": "the row shown as a"})
    system_b: str = field(default="aligned", metadata={
        "help": "the row shown as b: win rates are b's"})
    k: int = field(default=5, metadata={"help": "images per row (each system's top k)"})
    limit: int = field(default=0, metadata={"help": "first N queries (0: all)"})
    corpus: str = field(default="", metadata={
        "help": "where the images are ('' = the evaluation's corpus or world)"})
    output: str = field(default="", metadata={"help": "output dir ('' = <evaluation>/judge)"})
    backend: str = field(default="proxy", metadata={"help": " | ".join(JUDGE_BACKENDS)})
    style: str = field(default="ranker", metadata={
        "help": "LMM judges: ranker (which row) | scorer (1-5 per aspect)"})
    prompt: str = field(default="", metadata={
        "help": "prompt id or .yaml file ('' = the style's newest, aligner/judge/prompts)"})
    rationale: bool = field(default=False, metadata={"help": "keep a short reason"})
    rationale_tokens: int = field(default=48, metadata={"help": "tokens for the reason"})
    score_margin: float = field(default=0.25, metadata={
        "help": "scorer style: expected-score difference below which it is similar"})
    compose: str = field(default="row", metadata={
        "help": "row (one grid image per row) | images (each image on its own)"})
    thumb: int = field(default=224, metadata={"help": "pixels per image shown"})
    cols: int = field(default=5, metadata={"help": "images per line of a row's grid"})
    proxy: ProxyOptions = field(default_factory=ProxyOptions, metadata={"help": "proxy"})
    reward: RewardOptions = field(default_factory=RewardOptions, metadata={
        "help": "proxy:reward"})
    openai: OpenAIOptions = field(default_factory=OpenAIOptions, metadata={"help": "endpoint"})
    transformers: TransformersOptions = field(default_factory=TransformersOptions, metadata={
        "help": "in-process VLM"})
    vllm: VLLMOptions = field(default_factory=VLLMOptions, metadata={"help": "vLLM"})
    batch_size: int = field(default=8, metadata={"help": "pairs per Ray Data batch"})
    num_actors: int = field(default=0, metadata={
        "help": "judge actors for in-process back ends (0: 1)"})
    actor_cpus: float = field(default=0.0, metadata={
        "help": "CPUs per actor / task (0: 1 in-process, 0.25 for HTTP)"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples of queries"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})
    overwrite: bool = field(default=False, metadata={"help": "redo a finished output"})
    ray_address: str | None = field(default=None, metadata={
        "help": "Ray cluster (default: RAY_ADDRESS or a local Ray)"})
    progress: bool = field(default=True, metadata={"help": "Ray Data progress bars"})

    def __post_init__(self) -> None:
        if self.backend not in JUDGE_BACKENDS:
            raise ValueError(f"backend {self.backend!r}: one of {list(JUDGE_BACKENDS)}")
        if self.style not in ("ranker", "scorer"):
            raise ValueError(f"style {self.style!r}: ranker | scorer")
        if self.compose not in ("row", "images"):
            raise ValueError(f"compose {self.compose!r}: row | images")
        if self.system_a == self.system_b:
            raise ValueError("system_a and system_b must differ")
        for name in ("k", "batch_size", "thumb", "cols", "n_boot"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("limit", "num_actors", "actor_cpus", "score_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.backend in ("openai", "transformers", "vllm"):
            check_backend(self, self.backend)
            from aligner.judge.prompts import load_judge_prompt

            p = load_judge_prompt(self.prompt or self.style)  # a bad prompt fails first
            if p.style != self.style:
                raise ValueError(f"prompt {p.id} is a {p.style} prompt, not {self.style}")
        if self.backend == "proxy:reward" and not self.reward.path:
            raise ValueError("backend=proxy:reward needs reward.path")

    def out_dir(self) -> Path:
        return Path(self.output) if self.output else Path(self.evaluation) / "judge"

    def rankings_path(self) -> Path:
        return Path(self.rankings) if self.rankings else Path(self.evaluation)

    def rankings_file(self) -> Path:
        """The rankings Parquet file itself (a directory's ``rankings.parquet``)."""
        from aligner.data.results import RANKINGS_FILE

        p = self.rankings_path()
        return p / RANKINGS_FILE if p.is_dir() else p


def evaluation_config(evaluation: str | Path) -> dict[str, Any]:
    """The evaluation's resolved config (``config.yaml``), or {} when there is none."""
    import yaml

    f = Path(evaluation) / "config.yaml"
    if not f.is_file():
        return {}
    data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    return data if isinstance(data, dict) else {}


def resolve_inputs(cfg: JudgeConfig) -> tuple[str, str]:
    """(corpus, reference checkpoint) from the config, else from the evaluation's config.

    Raises:
        ValueError: no corpus can be found.
    """
    ev = evaluation_config(cfg.evaluation)
    corpus = cfg.corpus or ev.get("corpus") or (
        str(Path(ev["world"]) / "corpus") if ev.get("world") else "")
    if not corpus:
        raise ValueError(f"no corpus: set corpus= (the evaluation {cfg.evaluation} has no "
                         "config.yaml naming one)")
    checkpoint = cfg.proxy.checkpoint or ev.get("base_checkpoint") or ""
    if cfg.backend == "proxy" and not checkpoint:
        raise ValueError("backend=proxy needs proxy.checkpoint (the evaluation's config names "
                         "no base_checkpoint)")
    return str(corpus), str(checkpoint)


def build_pairs(cfg: JudgeConfig) -> list[RowPair]:
    """One :class:`RowPair` per query both systems ranked: their top ``k``, in a's order.

    Raises:
        FileNotFoundError: no rankings.
        KeyError: a system that is not in the rankings.
        ValueError: no query ranked by both systems.
    """
    from aligner.data.results import ranked_ids, read_rankings

    table = read_rankings(cfg.rankings_path())
    a, b = ranked_ids(table, cfg.system_a), ranked_ids(table, cfg.system_b)
    common = [q for q in a if q in b]
    if not common:
        raise ValueError(f"no query is ranked by both {cfg.system_a} and {cfg.system_b}")
    if cfg.limit:
        common = common[:cfg.limit]
    return [RowPair(q, a[q][0], a[q][1][:cfg.k], b[q][1][:cfg.k]) for q in common]


def judge_spec(cfg: JudgeConfig, corpus: str, checkpoint: str) -> dict[str, Any]:
    """The keyword arguments of :func:`aligner.judge.rows.make_row_judge` (plain data, sent to
    Ray workers)."""
    if cfg.backend == "proxy":
        options: dict[str, Any] = {**dataclasses.asdict(cfg.proxy), "checkpoint": checkpoint}
    elif cfg.backend == "proxy:reward":
        options = dataclasses.asdict(cfg.reward)
    else:
        options = backend_options(cfg, cfg.backend)
    return {"backend": cfg.backend, "corpus": corpus, "style": cfg.style,
            "prompt": cfg.prompt, "rationale": cfg.rationale,
            "rationale_tokens": cfg.rationale_tokens, "score_margin": cfg.score_margin,
            "compose": cfg.compose, "thumb": cfg.thumb, "cols": cfg.cols, "options": options}


def _to_table(rows: list[dict[str, Any]], system_a: str, system_b: str) -> pa.Table:
    from aligner.data.judgments import judgments_table

    return judgments_table([{**r, "system_a": system_a, "system_b": system_b} for r in rows])


def _pairs_of(batch: pa.Table) -> list[RowPair]:
    return [RowPair(r["query_id"], r["query"], list(r["ids_a"]), list(r["ids_b"]))
            for r in batch.to_pylist()]


class JudgeBatch:
    """Ray Data callable class: builds the judge once per actor (model load), judges batches
    of pairs into judgments-table rows."""

    def __init__(self, spec: dict[str, Any], system_a: str, system_b: str) -> None:
        import os

        from aligner.judge.rows import make_row_judge

        logging.basicConfig(level=os.environ.get("ALIGNER_LOG_LEVEL", "INFO"))
        self.judge = make_row_judge(**spec)
        self.system_a, self.system_b = system_a, system_b

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _to_table(self.judge.judge_pairs(_pairs_of(batch)), self.system_a, self.system_b)


def judge_batch(batch: pa.Table, spec: dict[str, Any], system_a: str,
                system_b: str) -> pa.Table:
    """Ray Data task for the HTTP back end: a light client per batch, threads inside."""
    from aligner.judge.rows import make_row_judge

    return _to_table(make_row_judge(**spec).judge_pairs(_pairs_of(batch)), system_a, system_b)


def rankings_digest(path: str | Path) -> str:
    """A short SHA-256 of a rankings file: which evaluation's results were judged."""
    from aligner.runtime.manifest import file_sha256

    return file_sha256(path)[:16]


def _identity(cfg: JudgeConfig, spec: dict[str, Any], pairs: list[RowPair]) -> dict[str, Any]:
    """What must match for an earlier output to be reused (the rankings' content included:
    a new evaluation makes new rankings)."""
    return json.loads(json.dumps({
        "rankings": str(cfg.rankings_path()),
        "rankings_sha256": rankings_digest(cfg.rankings_file()), "system_a": cfg.system_a,
        "system_b": cfg.system_b, "k": cfg.k, "limit": cfg.limit, "queries": len(pairs),
        **{k: v for k, v in spec.items() if k != "options"},
        "options": identity_options(spec["options"])}, default=str))


def _judge(cfg: JudgeConfig, spec: dict[str, Any], pairs: list[RowPair]) -> tuple[
        pa.Table, dict[str, Any]]:
    """Judge the pairs on Ray Data; the judgments table (input order) and run info."""
    import ray

    from aligner.runtime.logs import RateLog
    from aligner.runtime.raycluster import init_ray

    init_ray(cfg.ray_address, progress_bars=cfg.progress)
    items = [dataclasses.asdict(p) for p in pairs]
    blocks = max(1, math.ceil(len(items) / cfg.batch_size))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    args = {"spec": spec, "system_a": cfg.system_a, "system_b": cfg.system_b}
    info: dict[str, Any] = {}
    if cfg.backend == "openai":
        info["tasks"] = {"num_cpus": cfg.actor_cpus or 0.25}
        ds = ds.map_batches(judge_batch, batch_size=cfg.batch_size, batch_format="pyarrow",
                            num_cpus=cfg.actor_cpus or 0.25, fn_kwargs=args)
    else:
        size = cfg.num_actors or 1
        gpus = cfg.vllm.num_gpus if cfg.backend == "vllm" else 0
        cpus = cfg.actor_cpus or (0.5 if gpus else 1.0)
        info["actor_pool"] = {"size": size, "num_cpus": cpus, "num_gpus": gpus}
        ds = ds.map_batches(JudgeBatch, batch_size=cfg.batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=size), num_cpus=cpus,
                            num_gpus=gpus or None, fn_constructor_kwargs=args)
    progress = RateLog("judge", len(pairs), every_s=15.0, unit="pairs", logger=log)
    t = time.time()
    tables = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        tables.append(batch)
        progress.update(batch.num_rows)
    wall = time.time() - t
    table = pa.concat_tables(tables) if tables else _to_table([], cfg.system_a, cfg.system_b)
    order = {p.query_id: i for i, p in enumerate(pairs)}
    got = table.column("query_id").to_pylist()
    table = table.take(pa.array(sorted(range(len(got)), key=lambda i: order[got[i]]),
                                pa.int64()))
    if table.num_rows != len(pairs):
        raise RuntimeError(f"{table.num_rows} judgments for {len(pairs)} pairs")
    info.update(pipeline_s=round(wall, 2), pairs_per_s=round(len(pairs) / max(wall, 1e-9), 3))
    return table, info


def run_judge(cfg: JudgeConfig) -> dict[str, Any]:
    """Run the job; returns the manifest (with the summary), or the earlier one when skipped.

    Raises:
        FileNotFoundError: missing rankings, corpus or model.
        KeyError: a system not in the rankings.
        ValueError: bad input, or an output of another configuration.
    """
    from aligner.data.io import atomic_write_json
    from aligner.data.judgments import JUDGMENTS_FILE, write_judgments
    from aligner.judge.summary import summarise_judgments
    from aligner.runtime.config import save_config, to_dict
    from aligner.runtime.manifest import read_manifest, write_manifest

    started = time.time()
    pairs = build_pairs(cfg)
    corpus, checkpoint = resolve_inputs(cfg)
    if "://" not in corpus and not Path(corpus).exists():
        raise FileNotFoundError(f"corpus {corpus} does not exist")
    spec = judge_spec(cfg, corpus, checkpoint)
    ident = _identity(cfg, spec, pairs)
    out = cfg.out_dir()
    done = out / JUDGMENTS_FILE
    if cfg.overwrite and out.exists():
        for name in (JUDGMENTS_FILE, SUMMARY_FILE, "manifest.json"):
            (out / name).unlink(missing_ok=True)
    elif done.is_file() and (out / "manifest.json").is_file():
        prev = read_manifest(out).get("identity") or {}
        if prev == ident:
            log.info("%s is complete: nothing to do (overwrite=true to redo)", out)
            return {**read_manifest(out), "skipped": True}
        same_setup = ({k: v for k, v in prev.items() if k not in ("rankings_sha256", "queries")}
                      == {k: v for k, v in ident.items()
                          if k not in ("rankings_sha256", "queries")})
        if not same_setup:
            raise ValueError(f"{out} holds judgments of another configuration; use another "
                             "output or overwrite=true")
        log.info("the rankings changed since %s was judged (a new evaluation): judging again",
                 out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    log.info("judging %d pairs (%s vs %s, top %d) with %s", len(pairs), cfg.system_a,
             cfg.system_b, cfg.k, cfg.backend)
    table, info = _judge(cfg, spec, pairs)
    write_judgments(table, out)
    summary = summarise_judgments(table, cfg.n_boot, cfg.seed)
    summary["rankings_sha256"] = ident["rankings_sha256"]
    atomic_write_json(out / SUMMARY_FILE, summary)
    log.info("%s", summary["sentence"])
    manifest = write_manifest(
        out, "judge", config=to_dict(cfg), started=started, identity=ident,
        inputs={"rankings": str(cfg.rankings_file()),
                "rankings_sha256": ident["rankings_sha256"], "corpus": corpus,
                "evaluation": cfg.evaluation},
        judge={"name": summary["judge"], "proxy": summary["proxy"], "style": summary["style"],
               "prompt": summary["prompt"]},
        counts={"pairs": len(pairs), "judged": summary["judged"],
                "failed": summary["failed"], "failed_by_reason": summary["failed_by_reason"]},
        this_run=info, summary=summary,
        outputs={"judgments": JUDGMENTS_FILE, "summary": SUMMARY_FILE, "config": "config.yaml"})
    return manifest
