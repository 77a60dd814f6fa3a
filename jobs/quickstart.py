"""The end-to-end quickstart on the built-in world (the README's first command).

    python -m jobs.quickstart                  # local LLM rephraser, the shipped base model
    python -m jobs.quickstart --fast           # template rephraser instead of the LLM
    python -m jobs.quickstart --from-scratch   # also pre-train the base model here (~45 min)
    python -m jobs.quickstart workdir=/tmp/qs align_steps=60 compare_teachers=true
    python -m jobs.quickstart control=true     # also the contrastive-only control (+~4 min)

world -> base model -> embed (Ray Data) -> faiss index -> rephrase (Ray Data + LLM) ->
preference pairs -> ranked-DPO fine-tune on Ray Train (2 workers; with ``control=true`` also
a contrastive-only control with the same steps, data and alpha) -> re-embed and index with the
aligned model -> evaluate against the base, a cascade re-ranker, clip-retrieval's query shift
and query-time rephrasing -> a before/after table and an HTML report.

The base model is the checkpoint the repository ships (``aligner/assets/builtin_base``, made
by ``jobs.pretrain`` on this very world) unless ``--from-scratch`` is given or the world is
another one (``n_images=``, ``seed=``): then it is pre-trained here, because a model must not be
evaluated on a world whose test images it may have trained on.

Each stage is one job's library function called with a config composed here
(``dataclasses.replace`` of the job's defaults), so every output has its manifest. A stage
whose output is complete for the same resolved config is skipped; once a stage runs, every
stage that reads its output runs again (``fresh=true`` redoes all), so
``compare_teachers=true`` after a default run adds the teacher fine-tunes and re-evaluates
(:class:`aligner.runtime.pipeline.Pipeline`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aligner.preferences.teacher import ABLATION_PRESETS
from aligner.preferences.teacher import TEACHER_PRESETS as TEACHERS
from aligner.runtime.config import dump_yaml, load_config, save_config, to_dict
from aligner.runtime.logs import setup_logging
from aligner.runtime.manifest import write_manifest
from aligner.runtime.pipeline import Pipeline

log = logging.getLogger("jobs.quickstart")
DEFAULT_YAML = Path(__file__).parent / "configs" / "quickstart.yaml"
FLAGS = {"--fast": "fast=true", "--from-scratch": "from_scratch=true"}

@dataclass
class QuickstartConfig:
    """Run the whole alignment loop on the built-in world and compare it with the alternatives."""

    workdir: str = field(default="out", metadata={"help": "where every stage writes"})
    fast: bool = field(default=False, metadata={
        "help": "template rephraser instead of the local LLM (--fast)"})
    from_scratch: bool = field(default=False, metadata={
        "help": "pre-train the base model here instead of using the shipped one (--from-scratch)"})
    base: str = field(default="auto", metadata={
        "help": "auto: the shipped base if it was trained on this world, else pre-train here | "
                "shipped: the shipped base on any world (a dev world for tuning: it never saw "
                "that world's images)"})
    n_images: int = field(default=10_000, metadata={"help": "world size"})
    seed: int = field(default=0, metadata={"help": "world seed"})
    n_queries: int = field(default=600, metadata={"help": "content queries (60/10/30 split)"})
    gallery_relevant: int = field(default=20, metadata={
        "help": "dense val/test galleries: images rendered per val and test content query "
                "until its split holds at least this many relevant images (0: none; "
                "docs/evaluation.md)"})
    taste: str = field(default="default", metadata={
        "help": "the world's hidden taste (jobs.make_world taste=): default | divergent (a dev "
                "world whose people like low-key light and off-centre framing; use base=shipped "
                "there, docs/learning_curve.md)"})
    pretrain_steps: int = field(default=3000, metadata={
        "help": "pre-training steps when the base is trained here"})
    rephraser: str = field(default="local", metadata={
        "help": "rephrase back end: local (SmolLM2-135M on CPU) | template; --fast = template"})
    rephrase_style: str = field(default="detail", metadata={"help": "prompt template style"})
    teacher: str = field(default="both+degraded", metadata={
        "help": "teacher of the aligned model: " + " | ".join(TEACHERS)})
    compare_teachers: bool = field(default=False, metadata={
        "help": "also fine-tune one model per other teacher and evaluate them (slower)"})
    ablation: bool = field(default=False, metadata={
        "help": "also fine-tune with the oracle-aware teacher (negatives and degraded copies "
                "written knowing the built-in world's hidden taste) and evaluate it, named "
                "ablation_oracle_aware"})
    reward: bool = field(default=False, metadata={
        "help": "also simulate rater votes on the training split, train a reward model on them "
                "(jobs.rater_votes, jobs.train_reward) and fine-tune with it as the teacher "
                "(+ degraded copies), evaluated as aligned_reward: the human-label alternative "
                "to the LLM-only teacher"})
    control: bool = field(default=False, metadata={
        "help": "also train the contrastive-only control (same steps, data and alpha, no "
                "preference loss; about 4 min more on 2 cores); jobs.study always trains it"})
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers of the fine-tune"})
    align_steps: int = field(default=240, metadata={"help": "fine-tuning steps"})
    align_lr: float = field(default=3e-4, metadata={"help": "fine-tuning peak learning rate"})
    beta: float = field(default=0.5, metadata={"help": "DPO beta"})
    pairs_per_step: int = field(default=64, metadata={"help": "preference pairs per step"})
    captions_per_step: int = field(default=128, metadata={"help": "caption pairs per step"})
    eval_every: int = field(default=60, metadata={
        "help": "validation interval: the training curves (the output is chosen after the last "
                "step, train.selection=wise)"})
    index_factory: str = field(default="HNSW32", metadata={"help": "faiss index factory string"})
    queries: list[str] = field(default_factory=lambda: [
        "two red circles on grass", "a yellow star on sand", "three blue squares on a wooden table"],
        metadata={"help": "queries searched with the aligned index at the end"})
    k: int = field(default=10, metadata={"help": "results per query"})
    fresh: bool = field(default=False, metadata={"help": "redo every stage"})
    ray_address: str = field(default="", metadata={"help": "Ray cluster (default: local)"})

    def __post_init__(self) -> None:
        if self.n_images < 200:
            raise ValueError("n_images must be at least 200 for a meaningful quickstart")
        if self.rephraser not in ("local", "template"):
            raise ValueError("rephraser must be 'local' or 'template'")
        if self.gallery_relevant < 0:
            raise ValueError("gallery_relevant must be >= 0")
        if self.base not in ("auto", "shipped"):
            raise ValueError("base must be 'auto' or 'shipped'")
        if self.base == "shipped" and self.from_scratch:
            raise ValueError("base=shipped and --from-scratch contradict each other")
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher {self.teacher!r}: one of {list(TEACHERS)}")
        if self.fast:
            self.rephraser = "template"
        if min(self.align_steps, self.pretrain_steps, self.num_workers) < 1:
            raise ValueError("align_steps, pretrain_steps and num_workers must be >= 1")


def base_stage(cfg: QuickstartConfig, pipe: Pipeline, world: Path, base: Path) -> dict[str, Any]:
    """The shipped base when it fits this world, else pre-training here; returns what was used."""
    from aligner.retrieval.shipped import (
        SHIPPED_BASE,
        install_shipped_base,
        provenance,
        shipped_base_fits,
        world_dir_fingerprint,
    )
    from aligner.runtime.config import build_config
    from aligner.training.config import PretrainConfig
    from jobs import pretrain

    fits, why = shipped_base_fits(world_dir_fingerprint(world))
    if cfg.base == "shipped" and not fits:
        fits, why = True, (f"base=shipped on another world ({why}); every image here is unseen "
                           "by it: use for tuning on a dev world")
    if fits and not cfg.from_scratch:
        def install() -> None:
            ckpt = install_shipped_base(base)
            write_manifest(base, "quickstart_base", {"source": "shipped"}, time.time(),
                           checkpoint=str(ckpt), reason=why)

        log.info("base model: the shipped checkpoint (%s)", why)
        pipe.stage("base", base, install, {"source": "shipped"},
                   key=provenance().get("weights_sha256"), after=["world"])
        return {"source": "shipped (aligner/assets/builtin_base)", "why": why}
    reason = "--from-scratch" if cfg.from_scratch else why
    log.info("base model: pre-training here (%s); about %d steps", reason, cfg.pretrain_steps)
    recipe = SHIPPED_BASE / "pretrain.yaml"  # the shipped base's own recipe, fewer steps
    pc = build_config(PretrainConfig, recipe if recipe.is_file() else None, [])
    pc = replace(pc, world=str(world), output=str(base), ray_address=cfg.ray_address,
                 train=replace(pc.train, steps=cfg.pretrain_steps))
    pipe.stage("base", base, lambda: pretrain.run(pc), pc, after=["world"])
    return {"source": f"pre-trained here ({cfg.pretrain_steps} steps)", "why": reason}


def main(argv: list[str] | None = None) -> int:
    import sys

    setup_logging()
    argv = [FLAGS.get(a, a) for a in (sys.argv[1:] if argv is None else argv)]
    cfg = load_config(QuickstartConfig, argv, DEFAULT_YAML, prog="python -m jobs.quickstart")
    from aligner.evaluation.config import EvaluateConfig
    from aligner.evaluation.run import evaluate
    from aligner.preferences.build import BuildPreferencesConfig, build_preferences
    from aligner.rephrase.run import RephraseConfig, run_rephrase
    from aligner.retrieval.embed import EmbedConfig, run_embed
    from aligner.retrieval.models import ModelSpec
    from aligner.training.config import AlignConfig, control_loop
    from aligner.training.runs import run_align
    from jobs import build_index, make_world, search

    started = time.time()
    log.info("config:\n%s", dump_yaml(cfg))
    work = Path(cfg.workdir).resolve()  # Ray workers do not share this process's cwd
    work.mkdir(parents=True, exist_ok=True)
    save_config(cfg, work / "quickstart.yaml")
    p = {s: work / s for s in ("world", "base", "embeddings", "index", "rephrased",
                               "preferences", "aligned", "control", "embeddings_aligned",
                               "index_aligned", "evaluate", "search")}
    ray = cfg.ray_address
    pipe = Pipeline(work, cfg.fresh)

    wc = replace(make_world.MakeWorldConfig(), output=str(p["world"]), n_images=cfg.n_images,
                 seed=cfg.seed, n_queries=cfg.n_queries, gallery_relevant=cfg.gallery_relevant,
                 taste=cfg.taste)
    pipe.stage("world", p["world"], lambda: make_world.run(wc), wc)
    base_info = base_stage(cfg, pipe, p["world"], p["base"])
    base = ModelSpec(checkpoint=str(p["base"] / "checkpoint"))
    ec = EmbedConfig(input=str(p["world"] / "corpus"), output=str(p["embeddings"]), model=base,
                     ray_address=ray or None)
    pipe.stage("embed", p["embeddings"], lambda: run_embed(ec), ec, after=["world", "base"])
    ic = replace(build_index.IndexConfig(), embeddings=str(p["embeddings"]),
                 output=str(p["index"]), factory=cfg.index_factory)
    pipe.stage("index", p["index"], lambda: build_index.run(ic), ic, after=["embed"])
    rc = RephraseConfig(input=str(p["world"] / "queries" / "queries.parquet"),
                        output=str(p["rephrased"]), backend=cfg.rephraser,
                        style=cfg.rephrase_style, kinds=["content"], ray_address=ray or None)
    pipe.stage("rephrase", p["rephrased"], lambda: run_rephrase(rc), rc, after=["world"])

    # the aligned model's teacher first: comparing teachers later does not redo it
    used = [t for t in TEACHERS if t not in ABLATION_PRESETS or cfg.ablation or t == cfg.teacher]
    teachers = [cfg.teacher, *(t for t in used if t != cfg.teacher and (
        (cfg.compare_teachers and t not in ABLATION_PRESETS)
        or (cfg.ablation and t in ABLATION_PRESETS)))]
    diag = [t for t in used if t not in teachers]  # tables built for diagnostics only
    pref_dirs = {t: p["preferences"] / t.replace("+", "_").replace(":", "_") for t in used}
    for t in [*teachers, *diag]:
        bc = BuildPreferencesConfig(embeddings=str(p["embeddings"]), queries=str(p["rephrased"]),
                                    output=str(pref_dirs[t]), splits=["train", "val"],
                                    **TEACHERS[t])
        pipe.stage(f"preferences:{t}", pref_dirs[t], lambda bc=bc: build_preferences(bc), bc,
                   after=["embed", "rephrase"])

    ac0 = AlignConfig(world=str(p["world"]), model=base, num_workers=cfg.num_workers,
                      ray_address=ray)
    ac0 = replace(ac0, train=replace(ac0.train, steps=cfg.align_steps, lr=cfg.align_lr,
                                     beta=cfg.beta, pairs_per_step=cfg.pairs_per_step,
                                     captions_per_step=cfg.captions_per_step,
                                     eval_every=cfg.eval_every))
    trained: dict[str, Path] = {}
    for t in teachers:
        name = "aligned" if t == cfg.teacher else model_name(t)
        out = p["aligned"] if t == cfg.teacher else work / name
        ac = replace(ac0, preferences=str(pref_dirs[t]), output=str(out))
        pipe.stage(name, out, lambda ac=ac: run_align(ac), ac,
                   after=["world", "base", f"preferences:{t}"])
        trained[name] = out / "checkpoint"
    if cfg.reward:
        trained["aligned_reward"] = reward_stages(cfg, pipe, work, p, base, ac0)
    if cfg.control:  # same data, steps and alpha as the aligned model (selection=fixed)
        alpha = _read(p["aligned"] / "metrics.json").get("selected_alpha", 1.0)
        cc = replace(ac0, preferences=str(pref_dirs[cfg.teacher]), output=str(p["control"]),
                     train=control_loop(ac0.train, alpha))
        pipe.stage("control", p["control"], lambda: run_align(cc), cc,
                   after=["world", "base", f"preferences:{cfg.teacher}", "aligned"])
        trained["control"] = p["control"] / "checkpoint"
    rec = replace(ec, output=str(p["embeddings_aligned"]),
                  model=ModelSpec(checkpoint=str(trained["aligned"])))
    pipe.stage("re-embed", p["embeddings_aligned"], lambda: run_embed(rec), rec,
               after=["world", "aligned"])
    iac = replace(ic, embeddings=str(p["embeddings_aligned"]), output=str(p["index_aligned"]))
    pipe.stage("index:aligned", p["index_aligned"], lambda: build_index.run(iac), iac,
               after=["re-embed"])
    vc = EvaluateConfig(world=str(p["world"]), output=str(p["evaluate"]),
                        base_checkpoint=str(base.checkpoint), base_embeddings=str(p["embeddings"]),
                        models=[f"{n}={c}" for n, c in trained.items()],
                        embeddings=[f"aligned={p['embeddings_aligned']}"],
                        rephrased=str(p["rephrased"]),
                        preferences=[f"{t}={pref_dirs[t]}" for t in used] + (
                            [f"reward+degraded={p['preferences'] / 'reward_degraded'}"]
                            if cfg.reward else []))
    pipe.stage("evaluate", p["evaluate"], lambda: evaluate(vc), vc)
    sc = replace(search.SearchConfig(), index=str(p["index_aligned"]), output=str(p["search"]),
                 k=cfg.k, query=list(cfg.queries))
    pipe.stage("search", p["search"], lambda: search.run(sc), sc, after=["index:aligned"])

    summary = _summary(p, base_info, teachers)
    write_manifest(work, "quickstart", to_dict(cfg), started, timings_s=pipe.timings,
                   skipped=pipe.skipped, summary=summary)
    _print(summary, pipe.timings, time.time() - started, p)
    return 0


def reward_stages(cfg: QuickstartConfig, pipe: Pipeline, work: Path, p: dict[str, Path],
                  base: Any, ac0: Any) -> Path:
    """Simulated-rater votes -> reward model -> its preferences -> ``aligned_reward``; returns
    the aligned checkpoint."""
    from aligner.preferences.build import BuildPreferencesConfig, build_preferences
    from aligner.training.reward import TrainRewardConfig
    from aligner.training.runs import run_align
    from jobs import rater_votes, train_reward

    vc = replace(rater_votes.RaterVotesConfig(), world=str(p["world"]), output=str(work / "votes"))
    pipe.stage("votes", work / "votes", lambda: rater_votes.run(vc), vc, after=["world"])
    tc = TrainRewardConfig(votes=str(work / "votes"), world=str(p["world"]), model=base,
                           output=str(work / "reward"), num_workers=cfg.num_workers,
                           ray_address=cfg.ray_address, rephrased=str(p["rephrased"]))
    pipe.stage("reward", work / "reward", lambda: train_reward.run(tc), tc,
               after=["votes", "base", "rephrase"])
    prefs = p["preferences"] / "reward_degraded"
    bc = BuildPreferencesConfig(embeddings=str(p["embeddings"]), queries=str(p["rephrased"]),
                                output=str(prefs), splits=["train", "val"], aesthetic=["reward"],
                                aesthetic_weights=[1.0], degraded=True,
                                reward_model=str(work / "reward" / "checkpoint"))
    pipe.stage("preferences:reward", prefs, lambda: build_preferences(bc), bc,
               after=["embed", "rephrase", "reward"])
    out = work / "aligned_reward"
    ac = replace(ac0, preferences=str(prefs), output=str(out))
    pipe.stage("aligned_reward", out, lambda: run_align(ac), ac,
               after=["world", "base", "preferences:reward"])
    return out / "checkpoint"


def model_name(teacher: str) -> str:
    """The evaluated name of a model fine-tuned with another ``teacher`` than the aligned
    model's (ablations say so: ``ablation_oracle_aware``)."""
    if teacher in ABLATION_PRESETS:
        return "ablation_" + teacher.partition(":")[2]
    return "teacher_" + teacher.replace("+", "_")


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _summary(p: dict[str, Path], base_info: dict, teachers: list[str]) -> dict[str, Any]:
    """What the quickstart's manifest records and its closing table prints."""
    from aligner.data.results import read_metrics

    ev = read_metrics(p["evaluate"]) if (p["evaluate"] / "metrics.json").is_file() else {}
    k = ev.get("k", 10)
    comp = (ev.get("comparisons") or {}).get(ev.get("base_name", "base"), {})
    rephrase = _read(p["rephrased"] / "manifest.json")
    return {
        "base": base_info, "world": _read(p["world"] / "manifest.json").get("summary", {}),
        "rephrase": {k2: rephrase.get(k2) for k2 in ("backend", "prompt", "rows_out",
                                                     "fallbacks", "fallbacks_by_reason")},
        "teachers_trained": teachers,
        "teacher_agreement": {n: {"agreement": (d.get("all") or {}).get("agreement", {}).get(
            "mean"), "pairs": (d.get("all") or {}).get("pairs")}
            for n, d in (ev.get("teacher") or {}).items()},
        "aligned_vs_base": {key: comp.get(f"{key}_diff") for key in (
            f"ndcg@{k}", f"beauty_relevant@{k}", f"precision@{k}", "recall@10",
            "hpir_aesthetics", "hpir_accuracy", f"aesthetic@{k}")},
        "gallery": ev.get("gallery", {}),
        "premise": (ev.get("premise") or {}).get(f"ndcg@{k}_gain"),
        "report": str(p["evaluate"] / "report.html"),
        "search": sorted(str(x) for x in p["search"].glob("*.png")),
    }


def _relevant_line(gallery: dict) -> str:
    """How many relevant images the held-out and selection queries have in their galleries."""
    parts = []
    for label, key in (("held-out", "held_out"), ("selection", "selection")):
        g = gallery.get(key) or {}
        d = g.get("relevant_per_query") or {}
        if d.get("queries"):
            parts.append(f"{label} {g.get('split') or 'all'} gallery {g.get('images')} images, "
                         f"relevant per query min {d['min']:.0f} median {d['median']:.0f} "
                         f"max {d['max']:.0f}")
    return "; ".join(parts) or "n/a"


def _print(s: dict, timings: dict, total: float, p: dict[str, Path]) -> None:
    from aligner.data.results import read_metrics
    from aligner.evaluation.report import fmt_ci, summary_table

    ev = read_metrics(p["evaluate"]) if (p["evaluate"] / "metrics.json").is_file() else {}
    av, rep = s["aligned_vs_base"], s["rephrase"]
    lines = [
        "", "=" * 86,
        "quickstart: world -> base -> embed -> index -> rephrase -> preferences -> "
        "align -> evaluate", "=" * 86,
        f"world      {s['world'].get('images')} images {s['world'].get('splits')}: "
        f"{s['world'].get('natural_images')} natural + {s['world'].get('gallery_images')} "
        "rendered for the val / test galleries",
        f"gallery    {_relevant_line(s['gallery'])}",
        f"base       {s['base']['source']}: {s['base']['why']}",
        f"rephrase   {rep.get('prompt')} via {rep.get('backend')}: {rep.get('rows_out')} queries, "
        f"{rep.get('fallbacks')} fell back to the template {rep.get('fallbacks_by_reason') or ''}",
        "teachers   pairs agreeing with the oracle: " + ", ".join(
            f"{t} {v['agreement']:.3f} ({v['pairs']} pairs)"
            for t, v in s["teacher_agreement"].items() if v["agreement"] is not None),
        f"premise    + generic good-photo words, base model: nDCG@10 "
        f"{fmt_ci(s['premise'], signed=True)}",
        "", "held-out queries (oracle = the hidden human):",
        summary_table(ev) if ev.get("systems") else "(no evaluation)", "",
        f"aligned - base: nDCG@10 {fmt_ci(av.get('ndcg@10'), signed=True)}, beauty among "
        f"relevant {fmt_ci(av.get('beauty_relevant@10'), signed=True)}, precision@10 "
        f"{fmt_ci(av.get('precision@10'), 1, 100, True)} points, recall@10 "
        f"{fmt_ci(av.get('recall@10'), 1, 100, True)} points, HPIR-aesthetics "
        f"{fmt_ci(av.get('hpir_aesthetics'), 1, 100, True)} points, HPIR-accuracy "
        f"{fmt_ci(av.get('hpir_accuracy'), 1, 100, True)} points", "",
        f"report     {s['report']}",
        f"search     {', '.join(s['search']) or 'n/a'}",
        f"outputs    {p['aligned'] / 'checkpoint'} (aligned), {p['index_aligned']} (its index)",
        f"seconds    {json.dumps(timings)}   total {total:.0f} s", "=" * 86,
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
