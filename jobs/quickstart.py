"""The end-to-end quickstart on the built-in world (the README's first command).

    python -m jobs.quickstart                  # local LLM rephraser, the shipped base model
    python -m jobs.quickstart --fast           # template rephraser instead of the LLM
    python -m jobs.quickstart --from-scratch   # also pre-train the base model here (~45 min)
    python -m jobs.quickstart workdir=/tmp/qs align_steps=60 compare_teachers=true

world -> base model -> embed (Ray Data) -> faiss index -> rephrase (Ray Data + LLM) ->
preference pairs -> ranked-DPO fine-tune on Ray Train (2 workers) and a contrastive-only
control with the same steps and data -> re-embed and index with the aligned model ->
evaluate against the base, a cascade re-ranker, clip-retrieval's query shift and query-time
rephrasing -> a before/after table and an HTML report.

The base model is the checkpoint the repository ships (``aligner/assets/builtin_base``, made
by ``jobs.pretrain`` on this very world) unless ``--from-scratch`` is given or the world is
another one (``n_images=``, ``seed=``): then it is pre-trained here, because a model must not be
evaluated on a world whose test images it may have trained on.

Each stage is one of the jobs, called in-process with its own config, so every output has its
manifest. A stage whose output is complete and whose arguments are unchanged is skipped; once
a stage runs, every stage that reads its output runs again (``fresh=true`` redoes all), so
``compare_teachers=true`` after a default run adds the teacher fine-tunes and re-evaluates.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aligner.runtime.config import dump_yaml, load_config, save_config, to_dict
from aligner.runtime.logs import setup_logging
from aligner.runtime.manifest import write_manifest

log = logging.getLogger("jobs.quickstart")
DEFAULT_YAML = Path(__file__).parent / "configs" / "quickstart.yaml"
STAGE_FILE = "quickstart_stage.json"
FLAGS = {"--fast": "fast=true", "--from-scratch": "from_scratch=true"}

#: Teacher variants: which aesthetic signals order the grid and whether degraded copies are
#: added (jobs.build_preferences). "rephrase" is the paper's teacher (the rephrased query's
#: view, as antonym contrast); "scorer" the low-level pixel scorer; "both" the two z-scores
#: summed.
TEACHERS: dict[str, dict[str, Any]] = {
    "rephrase": {"aesthetic": ["contrast"], "aesthetic_weights": [1.0], "degraded": False},
    "scorer": {"aesthetic": ["scorer"], "aesthetic_weights": [1.0], "degraded": False},
    "both": {"aesthetic": ["scorer", "contrast"], "aesthetic_weights": [1.0, 1.0],
             "degraded": False},
    "both+degraded": {"aesthetic": ["scorer", "contrast"], "aesthetic_weights": [1.0, 1.0],
                      "degraded": True},
}


@dataclass
class QuickstartConfig:
    """Run the whole alignment loop on the built-in world and compare it with the alternatives."""

    workdir: str = field(default="out", metadata={"help": "where every stage writes"})
    fast: bool = field(default=False, metadata={
        "help": "template rephraser instead of the local LLM (--fast)"})
    from_scratch: bool = field(default=False, metadata={
        "help": "pre-train the base model here instead of using the shipped one (--from-scratch)"})
    n_images: int = field(default=10_000, metadata={"help": "world size"})
    seed: int = field(default=0, metadata={"help": "world seed"})
    n_queries: int = field(default=600, metadata={"help": "content queries (60/10/30 split)"})
    pretrain_steps: int = field(default=3000, metadata={
        "help": "pre-training steps when the base is trained here"})
    rephraser: str = field(default="local", metadata={
        "help": "rephrase back end: local (SmolLM2-135M on CPU) | template; --fast = template"})
    rephrase_style: str = field(default="detail", metadata={"help": "prompt template style"})
    teacher: str = field(default="both+degraded", metadata={
        "help": "teacher of the aligned model: " + " | ".join(TEACHERS)})
    compare_teachers: bool = field(default=False, metadata={
        "help": "also fine-tune one model per other teacher and evaluate them (slower)"})
    control: bool = field(default=True, metadata={
        "help": "train the contrastive-only control (same steps and data, no preference loss)"})
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers of the fine-tune"})
    align_steps: int = field(default=120, metadata={"help": "fine-tuning steps"})
    align_lr: float = field(default=3e-4, metadata={"help": "fine-tuning peak learning rate"})
    beta: float = field(default=0.5, metadata={"help": "DPO beta"})
    pairs_per_step: int = field(default=64, metadata={"help": "preference pairs per step"})
    captions_per_step: int = field(default=128, metadata={"help": "caption pairs per step"})
    eval_every: int = field(default=20, metadata={"help": "validation (early stopping) interval"})
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
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher {self.teacher!r}: one of {list(TEACHERS)}")
        if self.fast:
            self.rephraser = "template"
        if min(self.align_steps, self.pretrain_steps, self.num_workers) < 1:
            raise ValueError("align_steps, pretrain_steps and num_workers must be >= 1")


class Pipeline:
    """Runs stages in order and skips the finished ones.

    A stage is skipped when its output is complete for the same arguments and none of the
    stages it depends on (``after``; by default every earlier stage) ran in this call. An
    output of other arguments (or one made from inputs that were just redone) is deleted
    first; an unfinished output of the same arguments is kept, so the job resumes it
    (pre-training and fine-tuning from their checkpoints, the rephraser from its part files,
    the embedder from its shards).
    """

    def __init__(self, work: Path, fresh: bool) -> None:
        self.work, self.fresh = work, fresh
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []
        self.seen: list[str] = []  # stages declared so far, in order
        self.ran: set[str] = set()  # stages that ran in this call

    def stage(self, name: str, out: Path, fn: Callable[[list[str]], int], argv: list[str],
              key: Any = None, after: list[str] | None = None) -> None:
        """Run ``fn(argv)``, which writes ``out``, unless it is already done.

        The stage's identity is its arguments, ``key`` and the job's YAML defaults (a changed
        default redoes the stage). ``after`` names the stages whose outputs it reads.
        """
        deps = list(self.seen) if after is None else after
        unknown = [d for d in deps if d not in self.seen]
        if unknown:
            raise ValueError(f"stage {name} depends on {unknown}, which are not declared before it")
        self.seen.append(name)
        want = json.loads(json.dumps({"argv": argv, "key": key, "defaults": _defaults_sha(fn)}))
        marker = out / STAGE_FILE
        prev = json.loads(marker.read_text()) if marker.is_file() else None
        same = prev is not None and {k: prev.get(k) for k in want} == want
        redo = self.fresh or any(d in self.ran for d in deps)
        if not redo and same and prev.get("complete") and (out / "manifest.json").is_file():
            log.info("[%s] %s is complete: skipped", name, out)
            self.skipped.append(name)
            return
        if out.exists() and (redo or not same):
            shutil.rmtree(out)
        elif out.exists():
            log.info("[%s] resuming the unfinished output in %s", name, out)
        self.ran.add(name)
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({**want, "complete": False}, indent=2))
        t = time.time()
        log.info("[%s] starting", name)
        rc = fn(argv)
        if rc != 0:
            raise SystemExit(f"stage {name} failed with exit code {rc}")
        marker.write_text(json.dumps({**want, "complete": True}, indent=2))
        self.timings[name] = round(time.time() - t, 1)
        log.info("[%s] done in %.0f s", name, self.timings[name])


def _defaults_sha(fn: Callable) -> str | None:
    """SHA-256 of the YAML defaults of the job that ``fn`` belongs to (None: it has none)."""
    import hashlib
    import sys

    path = getattr(sys.modules.get(getattr(fn, "__module__", "")), "DEFAULT_YAML", None)
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def base_stage(cfg: QuickstartConfig, pipe: Pipeline, world: Path, base: Path,
               ray_arg: list[str]) -> dict[str, Any]:
    """The shipped base when it fits this world, else pre-training here; returns what was used."""
    from aligner.retrieval.shipped import (
        install_shipped_base,
        provenance,
        shipped_base_fits,
        world_dir_fingerprint,
    )
    from jobs import pretrain

    fits, why = shipped_base_fits(world_dir_fingerprint(world))
    if fits and not cfg.from_scratch:
        def install(_argv: list[str]) -> int:
            ckpt = install_shipped_base(base)
            write_manifest(base, "quickstart_base", {"source": "shipped"}, time.time(),
                           checkpoint=str(ckpt), reason=why)
            return 0

        log.info("base model: the shipped checkpoint (%s)", why)
        pipe.stage("base", base, install, ["shipped"], key=provenance().get("weights_sha256"),
                   after=["world"])
        return {"source": "shipped (aligner/assets/builtin_base)", "why": why}
    reason = "--from-scratch" if cfg.from_scratch else why
    log.info("base model: pre-training here (%s); about %d steps", reason, cfg.pretrain_steps)
    shipped_cfg = Path(__file__).resolve().parent.parent / "aligner" / "assets" / \
        "builtin_base" / "pretrain.yaml"
    conf = ["--config", str(shipped_cfg)] if shipped_cfg.is_file() else []
    pipe.stage("base", base, pretrain.main,
               [*conf, f"world={world}", f"output={base}", f"steps={cfg.pretrain_steps}",
                *ray_arg], after=["world"])
    return {"source": f"pre-trained here ({cfg.pretrain_steps} steps)", "why": reason}


def main(argv: list[str] | None = None) -> int:
    import sys

    setup_logging()
    argv = [FLAGS.get(a, a) for a in (sys.argv[1:] if argv is None else argv)]
    cfg = load_config(QuickstartConfig, argv, DEFAULT_YAML, prog="python -m jobs.quickstart")
    from jobs import (
        align,
        build_index,
        build_preferences,
        embed,
        evaluate,
        make_world,
        rephrase,
        search,
    )

    started = time.time()
    log.info("config:\n%s", dump_yaml(cfg))
    work = Path(cfg.workdir).resolve()  # Ray workers do not share this process's cwd
    work.mkdir(parents=True, exist_ok=True)
    save_config(cfg, work / "quickstart.yaml")
    p = {s: work / s for s in ("world", "base", "embeddings", "index", "rephrased",
                               "preferences", "aligned", "control", "embeddings_aligned",
                               "index_aligned", "evaluate", "search")}
    ray_arg = [f"ray_address={cfg.ray_address}"] if cfg.ray_address else []
    pipe = Pipeline(work, cfg.fresh)

    pipe.stage("world", p["world"], make_world.main,
               [f"output={p['world']}", f"n_images={cfg.n_images}", f"seed={cfg.seed}",
                f"n_queries={cfg.n_queries}"])
    base_info = base_stage(cfg, pipe, p["world"], p["base"], ray_arg)
    base_ckpt = p["base"] / "checkpoint"
    pipe.stage("embed", p["embeddings"], embed.main,
               [f"input={p['world'] / 'corpus'}", f"output={p['embeddings']}",
                f"model.checkpoint={base_ckpt}", *ray_arg], after=["world", "base"])
    pipe.stage("index", p["index"], build_index.main,
               [f"embeddings={p['embeddings']}", f"output={p['index']}",
                f"factory={cfg.index_factory}"], after=["embed"])
    pipe.stage("rephrase", p["rephrased"], rephrase.main,
               [f"input={p['world'] / 'queries' / 'queries.parquet'}",
                f"output={p['rephrased']}", f"backend={cfg.rephraser}",
                f"style={cfg.rephrase_style}", "kinds=[content]", *ray_arg], after=["world"])

    # the aligned model's teacher first: comparing teachers later does not redo it
    teachers = [cfg.teacher, *(t for t in TEACHERS if t != cfg.teacher and cfg.compare_teachers)]
    diag = [t for t in TEACHERS if t not in teachers]  # tables built for diagnostics only
    pref_dirs = {t: p["preferences"] / t.replace("+", "_") for t in TEACHERS}
    for t in [*teachers, *diag]:
        spec = TEACHERS[t]
        pipe.stage(f"preferences:{t}", pref_dirs[t], build_preferences.main,
                   [f"embeddings={p['embeddings']}", f"queries={p['rephrased']}",
                    f"output={pref_dirs[t]}", "splits=[train,val]",
                    "aesthetic=" + json.dumps(spec["aesthetic"]),
                    "aesthetic_weights=" + json.dumps(spec["aesthetic_weights"]),
                    f"degraded={str(spec['degraded']).lower()}"], after=["embed", "rephrase"])

    common = [f"world={p['world']}", f"model.checkpoint={base_ckpt}",
              f"steps={cfg.align_steps}", f"lr={cfg.align_lr}", f"beta={cfg.beta}",
              f"pairs_per_step={cfg.pairs_per_step}",
              f"captions_per_step={cfg.captions_per_step}", f"eval_every={cfg.eval_every}",
              f"num_workers={cfg.num_workers}", *ray_arg]
    trained: dict[str, Path] = {}
    for t in teachers:
        name = "aligned" if t == cfg.teacher else f"teacher_{t.replace('+', '_')}"
        out = p["aligned"] if t == cfg.teacher else work / name
        pipe.stage(name, out, align.main,
                   [*common, f"preferences={pref_dirs[t]}", f"output={out}"],
                   after=["world", "base", f"preferences:{t}"])
        trained[name] = out / "checkpoint"
    if cfg.control:  # same data, steps and weight interpolation as the aligned model
        alpha = _read(p["aligned"] / "metrics.json").get("selected_alpha", 1.0)
        pipe.stage("control", p["control"], align.main,
                   [*common, f"preferences={pref_dirs[cfg.teacher]}", f"output={p['control']}",
                    "pref_weight=0", "selection=wise", f"wise_alphas=[{alpha}]"],
                   after=["world", "base", f"preferences:{cfg.teacher}", "aligned"])
        trained["control"] = p["control"] / "checkpoint"
    pipe.stage("re-embed", p["embeddings_aligned"], embed.main,
               [f"input={p['world'] / 'corpus'}", f"output={p['embeddings_aligned']}",
                f"model.checkpoint={trained['aligned']}", *ray_arg], after=["world", "aligned"])
    pipe.stage("index:aligned", p["index_aligned"], build_index.main,
               [f"embeddings={p['embeddings_aligned']}", f"output={p['index_aligned']}",
                f"factory={cfg.index_factory}"], after=["re-embed"])
    models = [f"{n}={c}" for n, c in trained.items()]
    pipe.stage("evaluate", p["evaluate"], evaluate.main,
               [f"world={p['world']}", f"output={p['evaluate']}",
                f"base_checkpoint={base_ckpt}", f"base_embeddings={p['embeddings']}",
                "models=" + json.dumps(models),
                "embeddings=" + json.dumps([f"aligned={p['embeddings_aligned']}"]),
                f"rephrased={p['rephrased']}",
                "preferences=" + json.dumps([f"{t}={pref_dirs[t]}" for t in TEACHERS])])
    pipe.stage("search", p["search"], search.main,
               [f"index={p['index_aligned']}", f"output={p['search']}", f"k={cfg.k}",
                "query=" + json.dumps(cfg.queries)], after=["index:aligned"])

    summary = _summary(p, base_info, teachers)
    write_manifest(work, "quickstart", to_dict(cfg), started, timings_s=pipe.timings,
                   skipped=pipe.skipped, summary=summary)
    _print(summary, pipe.timings, time.time() - started, p)
    return 0


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _summary(p: dict[str, Path], base_info: dict, teachers: list[str]) -> dict[str, Any]:
    ev = _read(p["evaluate"] / "metrics.json")
    systems = ev.get("systems", {})
    k = ev.get("k", 10)
    comp = (ev.get("comparisons") or {}).get(ev.get("base_name", "base"), {})
    teacher = {name: {"agreement": (d.get("all") or {}).get("agreement", {}).get("mean"),
                      "pairs": (d.get("all") or {}).get("pairs")}
               for name, d in (ev.get("teacher") or {}).items()}
    rephrase = _read(p["rephrased"] / "manifest.json")
    return {
        "base": base_info,
        "world": _read(p["world"] / "manifest.json").get("summary", {}),
        "rephrase": {k2: rephrase.get(k2) for k2 in ("backend", "prompt", "rows_out",
                                                     "fallbacks", "fallbacks_by_reason")},
        "teachers_trained": teachers,
        "systems": {n: {"recall@10": (s.get("recall") or {}).get("r@10", {}).get("mean"),
                        f"aesthetic@{k}": s.get(f"aesthetic@{k}"),
                        f"precision@{k}": (s.get(f"precision@{k}") or {}).get("mean"),
                        "hpir": (s.get("hpir") or {}).get("mean")}
                    for n, s in systems.items()},
        "aligned_vs_base": {f"aesthetic@{k}": comp.get(f"aesthetic@{k}_diff"),
                            "recall@10": comp.get("recall@10_diff"),
                            "hpir": comp.get("hpir_diff")},
        "teacher_agreement": teacher,
        "premise": (ev.get("premise") or {}).get("aesthetic@10_gain"),
        "verdict": ev.get("verdict", []),
        "report": str(p["evaluate"] / "report.html"),
        "search": sorted(str(x) for x in p["search"].glob("*.png")),
    }


def _ci(d: dict | None, points: bool = False) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    s = 100.0 if points else 1.0
    if d.get("ci_low") is None:
        return f"{s * d['mean']:+.3f}"
    return f"{s * d['mean']:+.3f} [{s * d['ci_low']:+.3f}, {s * d['ci_high']:+.3f}]"


def _f(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _print(s: dict, timings: dict, total: float, p: dict[str, Path]) -> None:
    k = "aesthetic@10"
    rows = [f"{'system':<22} {'recall@10':>9} {k + ' [95% CI]':>30} {'precision@10':>12} "
            f"{'HPIR':>6}"]
    for name, m in s["systems"].items():
        a = m.get(k) or {}
        ci = (f"{a['mean']:+.3f} [{a['ci_low']:+.3f}, {a['ci_high']:+.3f}]"
              if a.get("ci_low") is not None else "n/a")
        rows.append(f"{name:<22} {_f(m['recall@10']):>9} {ci:>30} "
                    f"{_f(m['precision@10']):>12} {_f(m['hpir']):>6}")
    av = s["aligned_vs_base"]
    lines = [
        "", "=" * 86,
        "quickstart: world -> base -> embed -> index -> rephrase -> preferences -> "
        "align -> evaluate", "=" * 86,
        f"world      {s['world'].get('images')} images {s['world'].get('splits')}",
        f"base       {s['base']['source']}: {s['base']['why']}",
        f"rephrase   {s['rephrase'].get('prompt')} via {s['rephrase'].get('backend')}: "
        f"{s['rephrase'].get('rows_out')} queries, {s['rephrase'].get('fallbacks')} fell back "
        f"to the template {s['rephrase'].get('fallbacks_by_reason') or ''}",
        "teachers   pairs agreeing with the oracle: " + ", ".join(
            f"{t} {_f(v['agreement'])} ({v['pairs']} pairs)"
            for t, v in s["teacher_agreement"].items()),
        f"premise    + good look words, base model: aesthetic@10 {_ci(s['premise'])}",
        "", "held-out queries (oracle = the hidden human):", *rows, "",
        f"aligned - base: aesthetic@10 {_ci(av.get(k))}, recall@10 "
        f"{_ci(av.get('recall@10'), points=True)} points, HPIR {_ci(av.get('hpir'), True)} "
        "points", "", *s["verdict"], "",
        f"report     {s['report']}",
        f"search     {', '.join(s['search']) or 'n/a'}",
        f"outputs    {p['aligned'] / 'checkpoint'} (aligned), {p['index_aligned']} (its index)",
        f"seconds    {json.dumps(timings)}   total {total:.0f} s", "=" * 86,
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
