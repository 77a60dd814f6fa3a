"""Repeats of the alignment claim: the fine-tune and its control with several seeds.

    python -m jobs.study seeds=3                         # training seeds 0, 1, 2 on the world
    python -m jobs.study seeds=3 world_seeds=[0,1]       # and a second world (slow: see below)
    python -m jobs.study workdir=/tmp/qs quickstart=[--fast]

For every world seed it runs (or reuses) the quickstart in ``workdir`` (world seed 0, the
default world) or ``<output>/world<w>/`` (other worlds: the quickstart pre-trains a base there,
since the shipped one trained on the default world's images). Then for every training seed it
fine-tunes the aligned model and its contrastive-only control with that seed. The configs are
the quickstart's own, read back from its ``aligned/`` and ``control/`` outputs, with only
``train.seed`` changed; the control is output at exactly the alpha its aligned model selected
(``train.selection=fixed``). Each pair is evaluated with the quickstart's evaluation config. The
quickstart's own run is reused as its seed.

Writes ``<output>/summary.json`` and ``summary.md`` with the yardstick of
``docs/evaluation.md``: each comparison of the aligned model in every run (the primary nDCG@10
against the base, the control and the query-time baselines first; beauty among the relevant
results, precision@10, caption recall@10, HPIR-aesthetics and HPIR-accuracy against the base;
the diagnostic aesthetic@10 last), with its bootstrap CI, the mean over runs and the
between-seed standard deviation; per baseline family, aligned minus the setting chosen on val
(nDCG@10 on test) with each run's chosen setting; and the targets of section 5, each run's
value, met or not, and whether it is met in every run
(:func:`aligner.evaluation.study.check_targets`). Also ``seeds.png`` and a manifest.
Completed runs are skipped on a re-run (:class:`aligner.runtime.pipeline.Pipeline`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from aligner.runtime.config import build_config, save_config, to_dict
from aligner.runtime.manifest import write_manifest
from aligner.runtime.pipeline import Pipeline

log = logging.getLogger("jobs.study")
DEFAULT_YAML = Path(__file__).parent / "configs" / "study.yaml"


@dataclass
class StudyConfig:
    """The aligned model and its control over several training (and world) seeds."""

    workdir: str = field(default="out", metadata={
        "help": "the quickstart's directory for the default world (run there if missing)"})
    output: str = field(default="", metadata={"help": "where the study writes ('' = "
                                                      "<workdir>/study)"})
    seeds: int = field(default=3, metadata={"help": "training seeds 0 .. seeds-1"})
    world_seeds: list[int] = field(default_factory=lambda: [0], metadata={
        "help": "world seeds (other than 0: a quickstart with a base pre-trained there)"})
    quickstart: list[str] = field(default_factory=list, metadata={
        "help": "arguments for the quickstart runs, e.g. [--fast] or [align_steps=60]"})

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError("seeds must be >= 1")
        if not self.world_seeds or len(set(self.world_seeds)) != len(self.world_seeds):
            raise ValueError("world_seeds must be distinct and not empty")
        if any(a.startswith(("workdir=", "seed=", "control=")) for a in self.quickstart):
            raise ValueError("quickstart arguments must not set workdir, seed or control (the "
                             "study does: every seed trains the control)")


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file() and f.suffix in (".parquet", ".pt", ".safetensors", ".bin"):
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_world(cfg: StudyConfig, world_seed: int, out: Path) -> dict[str, dict]:
    """The quickstart for one world, then every training seed; returns run -> metrics."""
    from aligner.data.results import read_metrics
    from aligner.evaluation.config import EvaluateConfig
    from aligner.evaluation.run import evaluate
    from aligner.training.config import AlignConfig, control_loop
    from aligner.training.runs import run_align
    from jobs import quickstart

    qwork = Path(cfg.workdir).resolve() if world_seed == 0 else out / f"world{world_seed}"
    rc = quickstart.main([f"workdir={qwork}", f"seed={world_seed}", "control=true",
                          *cfg.quickstart])
    if rc != 0:
        raise RuntimeError(f"the quickstart for world {world_seed} failed ({rc})")
    ac = build_config(AlignConfig, qwork / "aligned" / "config.yaml", [])
    cc = build_config(AlignConfig, qwork / "control" / "config.yaml", [])
    vc = build_config(EvaluateConfig, qwork / "evaluate" / "config.yaml", [])
    key = {"preferences": _digest(Path(ac.preferences)),
           "base": _digest(Path(ac.model.checkpoint or ""))}
    pipe = Pipeline(out, fresh=False)
    metrics = {}
    for seed in range(cfg.seeds):
        run = f"world{world_seed}/seed{seed}"
        if seed == ac.train.seed:
            metrics[run] = read_metrics(qwork / "evaluate")
            log.info("%s: the quickstart's own run", run)
            continue
        d = out / f"world{world_seed}" / f"seed{seed}"
        a = replace(ac, output=str(d / "aligned"), train=replace(ac.train, seed=seed))
        pipe.stage(f"{run}:aligned", d / "aligned", lambda a=a: run_align(a), a, key=key,
                   after=[])
        alpha = json.loads((d / "aligned" / "metrics.json").read_text()).get(
            "selected_alpha", 1.0)
        c = replace(cc, output=str(d / "control"),  # exactly the aligned alpha, no test
                    train=control_loop(replace(cc.train, seed=seed), alpha))
        pipe.stage(f"{run}:control", d / "control", lambda c=c: run_align(c), c, key=key,
                   after=[f"{run}:aligned"])
        v = replace(vc, output=str(d / "evaluate"), embeddings=[],
                    models=[f"aligned={d / 'aligned' / 'checkpoint'}",
                            f"control={d / 'control' / 'checkpoint'}"])
        pipe.stage(f"{run}:evaluate", d / "evaluate", lambda v=v: evaluate(v), v, key=key,
                   after=[f"{run}:aligned", f"{run}:control"])
        metrics[run] = read_metrics(d / "evaluate")
    return metrics


def run(cfg: StudyConfig) -> Path:
    """Every world and training seed, then the summary; returns the output directory."""
    from aligner.evaluation.study import study_figure, study_table, summarise_seeds

    started = time.time()
    out = Path(cfg.output or Path(cfg.workdir) / "study").resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    metrics: dict[str, dict] = {}
    for w in cfg.world_seeds:
        metrics |= run_world(cfg, w, out)
    summary = summarise_seeds(metrics)
    galleries = sorted({str((m.get("gallery") or {}).get("which")) for m in metrics.values()})
    summary["gallery"] = galleries
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    met = [t["target"] for t in summary["targets"] if t["met_in_all"]]
    (out / "summary.md").write_text(
        f"# Study: the aligned model over seeds\n\nGallery: {', '.join(galleries)}; runs: "
        f"{', '.join(metrics)}; primary metric: {summary['primary']} (docs/evaluation.md)\n\n"
        f"Targets met in every run: {len(met)} of {len(summary['targets'])}\n\n"
        f"```\n{study_table(summary)}\n```\n")
    study_figure(summary, str(out / "seeds.png"))
    write_manifest(out, "study", to_dict(cfg), started, runs=list(metrics),
                   outputs={"summary": "summary.json", "table": "summary.md",
                            "figure": "seeds.png"})
    return out


def main(argv: list[str] | None = None) -> int:
    from aligner.evaluation.study import study_table
    from aligner.runtime.job import job_main

    def report(cfg: StudyConfig, out: Path) -> str:
        summary = json.loads((out / "summary.json").read_text())
        return f"{study_table(summary)}\nstudy: {out / 'summary.md'}, {out / 'seeds.png'}"

    return job_main(StudyConfig, argv, DEFAULT_YAML, run, report, "python -m jobs.study")


if __name__ == "__main__":
    raise SystemExit(main())
