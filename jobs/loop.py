"""The closed feedback loop through the real product: serve -> people vote -> retrain -> upgrade.

    python -m jobs.loop world=out/world workdir=out/loop rounds=3 votes_per_round=200
    python -m jobs.loop ... retrain.teacher=mix retrain.reward_kind=head   # see --help
    ray job submit --working-dir . -- python -m jobs.loop workdir=/shared/loop ...
    kubectl apply -f k8s/rayjob-loop.yaml

Preparation (each step skipped when done): the world (``jobs.make_world``, or given), then
(:func:`aligner.feedback.prepare.prepare`) the base model (the shipped base when it fits the
world, ``base=shipped`` on any world, or a checkpoint path), its embeddings and index, the
template-rephrased queries, and the model served against the base in round 1
(``initial=labelfree``: the base aligned with the label-free teacher; or a checkpoint path).

Each round, in ``workdir/rounds/rNN/``:

1. **serve** - the Serve application (``serving.app:build_app``, the page's API) serves the base
   and the current aligned model; round 1 deploys it, later rounds find it already upgraded
   (:mod:`serving.rollout`);
2. **votes** - simulated raters (:class:`aligner.world.raters.RaterPopulation`) vote through
   HTTP exactly as the page does: ``POST /v1/compare`` for a training query, the rater sees the
   two rows' image ids (randomised left / right by the server, models hidden), ``POST
   /v1/votes`` with a confidence, the API key and an ``Idempotency-Key``;
3. **export** - ``GET /v1/votes/export``: every vote so far, as a preferences table
   (:func:`aligner.feedback.rounds.export_votes`);
4. **retrain** - a reward model on the votes' training material, preferences from it (alone or
   mixed with the label-free teacher), ranked DPO from the base
   (:func:`aligner.feedback.retrain.retrain`);
5. **embed + index** - the corpus with the new model, into new directories (what is being
   served is never overwritten);
6. **upgrade** - the same application redeployed in place with the new checkpoint and index
   while a client keeps searching (:func:`serving.rollout.upgrade`); failed searches are
   counted (target: none), and the round ends once the new model answers.

Every stage is skipped when complete (a :class:`~aligner.runtime.pipeline.Pipeline`), a
finished round (its ``manifest.json``) is never redone: rerunning the same command resumes.
``workdir/loop_report.md`` (+ ``.json``) has one row per round. See docs/feedback_loop.md.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aligner.feedback.prepare import Prep, Served, embed_and_index, evaluate_round, prepare
from aligner.feedback.retrain import RetrainSettings
from aligner.runtime.config import save_config, to_dict
from aligner.runtime.job import job_main
from aligner.world.votes import RaterSettings
from serving.rollout import ServeSettings

log = logging.getLogger("jobs.loop")
DEFAULT_YAML = Path(__file__).parent / "configs" / "loop.yaml"


@dataclass
class LoopConfig:
    """The closed feedback loop through the served application (docs/feedback_loop.md)."""

    world: str = field(default="out/world", metadata={
        "help": "built-in world dir (jobs.make_world); made here (n_images, world_seed, "
                "n_queries) when it does not exist"})
    workdir: str = field(default="out/loop", metadata={"help": "where every round writes"})
    rounds: int = field(default=3, metadata={"help": "rounds to run (more rounds resume)"})
    votes_per_round: int = field(default=200, metadata={"help": "votes cast per round"})
    k: int = field(default=8, metadata={"help": "results per row of a comparison"})
    rater_threads: int = field(default=4, metadata={"help": "raters voting at once"})
    raters: RaterSettings = field(default_factory=RaterSettings, metadata={
        "help": "the simulated raters (n_raters, target_agreement, taste_spread, confidence, "
                "seed ...)"})
    retrain: RetrainSettings = field(default_factory=RetrainSettings, metadata={
        "help": "reward model, teacher (reward | mix) and re-alignment"})
    serve: ServeSettings = field(default_factory=ServeSettings, metadata={
        "help": "the served application"})
    base: str = field(default="auto", metadata={
        "help": "auto: the shipped base if it was trained on this world, else pre-trained "
                "here | shipped: the shipped base on any world | a checkpoint directory"})
    pretrain_steps: int = field(default=3000, metadata={
        "help": "pre-training steps when base=auto does not fit the world"})
    base_embeddings: str = field(default="", metadata={
        "help": "the base model's embeddings of the corpus ('' : embedded here)"})
    base_index: str = field(default="", metadata={"help": "their index ('' : built here)"})
    rephrased: str = field(default="", metadata={
        "help": "rephrased queries (jobs.rephrase; '' : the template rephraser here)"})
    initial: str = field(default="labelfree", metadata={
        "help": "the model served against the base in round 1: labelfree (the base aligned "
                "here with the label-free teacher) | a checkpoint directory"})
    initial_index: str = field(default="", metadata={
        "help": "with initial=<checkpoint>: its index ('' : embedded and indexed here)"})
    index_factory: str = field(default="HNSW32", metadata={"help": "faiss factory string"})
    test_pairs: str = field(default="", metadata={
        "help": "held-out rater pairs (jobs.rater_votes' test_pairs.parquet): reward accuracy "
                "against the hidden taste per round (finetune reward models)"})
    evaluate: bool = field(default=False, metadata={
        "help": "evaluate each round's model on the held-out queries (aligner.evaluation; "
                "slow, needs the world's dense galleries)"})
    n_images: int = field(default=10_000, metadata={"help": "world size, when made here"})
    world_seed: int = field(default=0, metadata={"help": "world seed, when made here"})
    n_queries: int = field(default=600, metadata={"help": "content queries, when made here"})
    seed: int = field(default=0, metadata={"help": "which query each vote asks"})
    fresh: bool = field(default=False, metadata={
        "help": "redo everything: the rounds and the votes database are deleted first"})
    ray_address: str = field(default="", metadata={"help": "Ray cluster (default: local)"})

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.votes_per_round < 1:
            raise ValueError("rounds and votes_per_round must be >= 1")
        if not 1 <= self.k <= 100:
            raise ValueError(f"k must be in 1..100, got {self.k}")
        if self.rater_threads < 1:
            raise ValueError("rater_threads must be >= 1")
        if not self.base:
            raise ValueError("base: auto | shipped | a checkpoint directory")
        if not self.initial:
            raise ValueError("initial: labelfree | a checkpoint directory")
        if self.initial == "labelfree" and self.initial_index:
            raise ValueError("initial_index goes with initial=<checkpoint>")
        if self.pretrain_steps < 1 or self.n_images < 200 or self.n_queries < 10:
            raise ValueError("pretrain_steps >= 1, n_images >= 200 and n_queries >= 10")
        if self.ray_address and self.retrain.ray_address not in ("", self.ray_address):
            raise ValueError("ray_address and retrain.ray_address differ")
        if self.ray_address:
            self.retrain = replace(self.retrain, ray_address=self.ray_address)


# ----------------------------------------------------------------------------- the world

def ensure_world(cfg: LoopConfig) -> Path:
    """``cfg.world``, made here by ``jobs.make_world`` (``n_images``, ``world_seed``,
    ``n_queries``) when it holds no corpus yet."""
    from jobs import make_world

    world = Path(cfg.world).resolve()
    if not (world / "corpus").is_dir():
        if world.exists() and any(world.iterdir()):
            raise FileNotFoundError(f"world={world} exists but holds no corpus/")
        wc = replace(make_world.MakeWorldConfig(), output=str(world), n_images=cfg.n_images,
                     seed=cfg.world_seed, n_queries=cfg.n_queries, progress=False)
        log.info("making the world in %s (%d images)", world, cfg.n_images)
        make_world.run(wc)
    return world


# ----------------------------------------------------------------------------- rounds

def run_round(r: int, cfg: LoopConfig, prep: Prep, pipe: Any, ctx: dict[str, Any],
              served: Served) -> dict[str, Any]:
    """Round ``r`` (see the module docstring); returns its manifest."""
    from aligner.data.io import json_safe
    from aligner.feedback.retrain import retrain
    from aligner.feedback.rounds import (
        ROUND_JOB,
        cast_votes,
        export_votes,
        round_name,
        round_outputs,
    )
    from aligner.runtime.manifest import write_manifest
    from serving.rollout import ensure_serving, upgrade

    name = round_name(r)
    rd = prep.work / "rounds" / name
    started = time.time()
    client, key = ctx["client"], ctx["key"]
    t = time.time()
    serve_info = ensure_serving(cfg.serve, prep, client, served, key)
    serve_s = round(time.time() - t, 1)
    settings = ctx["settings"]

    def votes() -> None:
        t_v = time.time()
        counts = cast_votes(client, ctx["population"](), ctx["queries"], cfg.votes_per_round,
                            cfg.k, cfg.seed, r, rd / "votes", cfg.rater_threads)
        write_manifest(rd / "votes", "loop_votes", to_dict(cfg.raters), t_v, counts=counts,
                       served={"base": str(prep.base), "aligned": str(served.checkpoint)},
                       raters=ctx["rater_stats"](), source="simulated raters (not people), "
                       "voting through the served page's API")

    ident = {"round": r, "served": str(served.checkpoint), "k": cfg.k, "seed": cfg.seed,
             "raters": to_dict(cfg.raters)}
    pipe.stage(f"{name}:votes", rd / "votes", votes, {**ident, "n": cfg.votes_per_round},
               after=ctx["prep_stages"])
    pipe.stage(f"{name}:export", rd / "export", lambda: export_votes(client, rd / "export"),
               ident, after=[f"{name}:votes"])
    out = retrain(rd / "export", prep.world, prep.base, prep.embeddings, prep.rephrased,
                  rd / "retrain", settings, test_pairs=cfg.test_pairs, pipe=pipe,
                  prefix=f"{name}:", after=[f"{name}:export"])
    new = Served(out["aligned"], rd / "index")
    embed_and_index(pipe, name, prep.world / "corpus", new.checkpoint, rd / "embeddings",
                    rd / "index", cfg, [f"{name}:aligned"])
    texts = [q.text for q in ctx["queries"][:32]]
    pipe.stage(f"{name}:upgrade", rd / "upgrade",
               lambda: upgrade(cfg.serve, prep, client, new, key, texts, rd / "upgrade", k=cfg.k),
               {"round": r, "checkpoint": str(new.checkpoint), "index": str(new.index)},
               after=[f"{name}:index"])
    evaluation = {}
    if cfg.evaluate:
        evaluation = evaluate_round(prep, pipe, name, new, rd)
    done = round_outputs(rd, cfg.votes_per_round)  # read back: a resumed round has them all
    timings = {k.split(":", 1)[1]: v for k, v in pipe.timings.items() if k.startswith(name + ":")}
    if "embed" in timings or "index" in timings:
        timings["embed+index"] = round(timings.get("embed", 0) + timings.get("index", 0), 1)
    timings["serve"] = serve_s
    align_m = out["align_metrics"]
    manifest = write_manifest(
        rd, ROUND_JOB, None, started, round=r, complete=True,
        served={"base": str(prep.base), "aligned": str(served.checkpoint),
                "index": str(served.index)}, serve=serve_info, **done,
        reward=out["reward_summary"],
        align={k: align_m.get(k) for k in ("selected_step", "selected_alpha", "selection",
                                            "start", "selected") if k in align_m},
        new={"checkpoint": str(new.checkpoint), "index": str(new.index)},
        evaluation=json_safe(evaluation), timings_s=timings)
    log.info("round %d done: %d votes (%d in all, %s recorded), reward val acc %s, upgrade "
             "%s of %s searches failed", r, done["votes"].get("votes_cast", 0),
             done["votes_cast_total"], done["export"].get("votes"),
             out["reward_summary"].get("val_acc_vs_votes"), done["upgrade"]["failed"],
             done["upgrade"]["requests"])
    return manifest


# ----------------------------------------------------------------------------- main

def train_threads(settings: RetrainSettings, serve: ServeSettings) -> RetrainSettings:
    """Ray Train workers beside the running application: with ``threads_per_worker=0`` each
    worker gets the CPUs the application leaves, split evenly (at least 1)."""
    if settings.threads_per_worker:
        return settings
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1))
    free = max(1.0, cpus - serve.reserved_cpus())
    return replace(settings, threads_per_worker=max(1, int(free // settings.num_workers)))


def run(cfg: LoopConfig) -> dict[str, Any]:
    """Prepare, then run rounds ``1..cfg.rounds`` (finished rounds are read back); writes
    the report; returns its header and rows."""
    from aligner.feedback.rounds import ApiClient, Query, round_complete, round_name
    from aligner.runtime.pipeline import Pipeline
    from aligner.runtime.raycluster import init_ray
    from serving.rollout import api_key, start_serve

    started = time.time()
    work = Path(cfg.workdir).resolve()  # Ray workers and replicas do not share the cwd
    work.mkdir(parents=True, exist_ok=True)
    finished = [round_complete(work / "rounds" / round_name(r)) for r in
                range(1, cfg.rounds + 1)]
    if not cfg.fresh and all(finished):  # nothing to do: not even Ray is started
        log.info("all %d rounds are complete: nothing to do", cfg.rounds)
        return _finish(cfg, work, finished, {"serving": "(not started: nothing to do)"},
                       started, [])
    save_config(cfg, work / "loop.yaml")
    init_ray(cfg.ray_address or None, progress_bars=False)
    url = start_serve(cfg.serve)
    key = api_key(cfg.serve, work)
    client = ApiClient(url, key, timeout_s=cfg.serve.request_timeout_s + 30)
    if cfg.fresh:
        _start_afresh(cfg, work)
    settings = train_threads(cfg.retrain, cfg.serve)
    pipe = Pipeline(work, fresh=False)
    ensure_world(cfg)
    prep = prepare(cfg, settings, pipe, work, None if cfg.fresh else finished[0])
    prep_stages = list(pipe.seen)

    from aligner.world.generate import World

    world = World(prep.world)
    queries = [Query(q["query_id"], q["query"])
               for q in world.queries(split="train", kind="content").to_pylist()]
    cache: dict[str, Any] = {}

    def population() -> Any:
        if "pop" not in cache:
            from aligner.world.raters import RaterPopulation

            cache["pop"] = RaterPopulation.from_world(world, cfg.raters)
        return cache["pop"]

    def rater_stats() -> dict[str, Any]:
        pop = population()
        stats = getattr(pop, "stats", None)
        return stats() if callable(stats) else dict(getattr(pop, "calibration", {}))

    ctx = {"client": client, "key": key, "queries": queries, "population": population,
           "rater_stats": rater_stats, "settings": settings, "prep_stages": prep_stages}
    manifests: list[dict[str, Any]] = []
    served = prep.initial
    for r in range(1, cfg.rounds + 1):
        rd = work / "rounds" / round_name(r)
        m = round_complete(rd)
        if m is not None:
            log.info("round %d is complete: skipped", r)
        else:
            m = run_round(r, cfg, prep, pipe, ctx, served)
        manifests.append(m)
        served = Served(Path(m["new"]["checkpoint"]), Path(m["new"]["index"]))
    return _finish(cfg, work, manifests, {"serving": url}, started, sorted(pipe.ran),
                   {k: v for k, v in pipe.timings.items() if not re.match(r"r\d\d+:", k)})


def _finish(cfg: LoopConfig, work: Path, manifests: list[dict[str, Any]], extra: dict[str, Any],
            started: float, ran: list[str], prep_timings: dict[str, float] | None = None
            ) -> dict[str, Any]:
    """The report and the loop's manifest from the rounds' manifests."""
    from aligner.feedback.rounds import write_report
    from aligner.runtime.manifest import write_manifest

    first, last = manifests[0], manifests[-1]
    s = cfg.retrain
    header = {"world": str(Path(cfg.world).resolve()),
              "base": first.get("served", {}).get("base"),
              "round 1 served": first.get("served", {}).get("aligned"),
              "teacher": s.teacher, "reward": s.reward_kind,
              "votes per round": cfg.votes_per_round, "k": cfg.k, **extra,
              "serving now": last.get("new", {}).get("checkpoint")}
    report = write_report(work, manifests, header)
    write_manifest(work, "loop", to_dict(cfg), started, prep_timings_s=prep_timings or {},
                   ran=ran, report=str(report), rounds=len(manifests), header=header)
    return {"header": header, "rounds": manifests, "report": str(report), "ran": ran}


def _start_afresh(cfg: LoopConfig, work: Path) -> None:
    """``fresh=true``: delete the application (it holds the votes database open), the rounds
    and the votes; the preparation is redone only where its config changed."""
    from serving.rollout import delete_app

    delete_app(cfg.serve)
    for d in ("rounds", "serving"):
        if (work / d).exists():
            shutil.rmtree(work / d)


def _report(cfg: LoopConfig, out: dict[str, Any]) -> str:
    last = out["rounds"][-1] if out["rounds"] else {}
    up = [m.get("upgrade", {}) for m in out["rounds"]]
    return (f"loop: {len(out['rounds'])} rounds, {last.get('votes_cast_total')} votes in all; "
            f"upgrades: {sum(u.get('failed') or 0 for u in up)} of "
            f"{sum(u.get('requests') or 0 for u in up)} searches failed; serving "
            f"{out['header']['serving now']} at {out['header']['serving']}; report "
            f"{out['report']}")


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.loop [--config FILE] key=value ...``: 0, or 2 on bad input."""
    return job_main(LoopConfig, argv, DEFAULT_YAML, run, _report, "python -m jobs.loop")


if __name__ == "__main__":
    raise SystemExit(main())
