"""What the served feedback loop's rounds stand on (``jobs.loop``), each step a stage of a
:class:`~aligner.runtime.pipeline.Pipeline` (skipped when done):

* the base checkpoint (:func:`base_stage`): given, the shipped one when it fits the world (or
  ``base=shipped`` on any world), or pre-trained here;
* its embeddings of the corpus and their faiss index (:func:`embed_and_index`; or given);
* the template-rephrased queries (or given);
* the model served against the base in round 1: ``initial=labelfree`` (the base aligned with
  the label-free teacher), or a checkpoint with its index (embedded and indexed here unless
  given).

Each round reuses the embed + index stages for its new model (:func:`embed_and_index`) and,
with ``evaluate=true``, evaluates it against the base (:func:`evaluate_round`). The world
itself is made by the job (``jobs.make_world``) before :func:`prepare` runs. Nothing here
serves: deploying the application is ``serving.rollout``'s part.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import yaml

from aligner.feedback.retrain import RetrainSettings, align_config, stable

log = logging.getLogger(__name__)


class PrepSettings(Protocol):
    """The fields of a loop config :func:`prepare` reads (``jobs.loop.LoopConfig`` has them)."""

    world: str
    base: str
    pretrain_steps: int
    base_embeddings: str
    base_index: str
    rephrased: str
    initial: str
    initial_index: str
    index_factory: str
    ray_address: str


@dataclass
class Served:
    """One served state: the aligned model's checkpoint and index (the base never changes)."""

    checkpoint: Path
    index: Path


@dataclass
class Prep:
    """What the rounds stand on (absolute paths)."""

    work: Path
    world: Path
    base: Path
    embeddings: Path
    index: Path
    rephrased: Path
    initial: Served
    base_info: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory, given it or a job output holding ``checkpoint/``."""
    p = Path(path).resolve()
    return p / "checkpoint" if (p / "checkpoint").is_dir() else p


def _pretrain(pc: Any) -> Path:
    """Pre-train and evaluate the final checkpoint (``pc.evaluate``), as ``jobs.pretrain``
    does; returns the final checkpoint directory."""
    from functools import partial

    from aligner.evaluation.checkpoint import evaluate_checkpoint
    from aligner.training.runs import run_pretrain

    evaluate = (partial(evaluate_checkpoint, world_dir=pc.world, gallery=pc.eval_gallery)
                if pc.evaluate else None)
    return run_pretrain(pc, evaluate=evaluate).checkpoint


def base_stage(cfg: PrepSettings, pipe: Any, world: Path, out: Path) -> tuple[Path, dict]:
    """The base checkpoint: given, the shipped one (when it fits, or ``base=shipped``), or
    pre-trained here (like ``jobs.quickstart``)."""
    from aligner.retrieval.shipped import (
        SHIPPED_BASE,
        install_shipped_base,
        provenance,
        shipped_base_fits,
        world_dir_fingerprint,
    )
    from aligner.runtime.config import build_config
    from aligner.runtime.manifest import write_manifest

    if cfg.base not in ("auto", "shipped"):
        ckpt = checkpoint_dir(cfg.base)
        if not ckpt.is_dir():
            raise FileNotFoundError(f"base={cfg.base}: no checkpoint directory there")
        return ckpt, {"source": str(ckpt), "why": "given"}
    fits, why = shipped_base_fits(world_dir_fingerprint(world))
    if cfg.base == "shipped" and not fits:
        fits, why = True, f"base=shipped on another world ({why})"
    if fits:
        def install() -> None:
            ckpt = install_shipped_base(out)
            write_manifest(out, "loop_base", {"source": "shipped"}, time.time(),
                           checkpoint=str(ckpt), reason=why)

        pipe.stage("base", out, install, {"source": "shipped"},
                   key=provenance().get("weights_sha256"), after=[])
        return out / "checkpoint", {"source": "shipped (aligner/assets/builtin_base)", "why": why}
    from aligner.training.config import PretrainConfig

    recipe = SHIPPED_BASE / "pretrain.yaml"
    pc = build_config(PretrainConfig, recipe if recipe.is_file() else None, [])
    pc = replace(pc, world=str(world), output=str(out), ray_address=cfg.ray_address,
                 train=replace(pc.train, steps=cfg.pretrain_steps))
    pipe.stage("base", out, lambda: _pretrain(pc), stable(pc), after=[])
    return out / "checkpoint", {"source": f"pre-trained here ({cfg.pretrain_steps} steps)",
                                "why": why}


def embed_stage(pipe: Any, name: str, corpus: Path, ckpt: Path, emb: Path, ray_address: str,
                after: list[str]) -> None:
    """Stage ``name``: the corpus embedded by ``ckpt`` (``jobs.embed``'s library function)."""
    from aligner.retrieval.embed import EmbedConfig, run_embed
    from aligner.retrieval.models import ModelSpec

    ec = EmbedConfig(input=str(corpus), output=str(emb), model=ModelSpec(checkpoint=str(ckpt)),
                     ray_address=ray_address or None, progress=False)
    pipe.stage(name, emb, lambda: run_embed(ec), stable(ec), after=after)


def index_stage(pipe: Any, name: str, emb: Path, index: Path, factory: str,
                after: list[str]) -> None:
    """Stage ``name``: the faiss index of ``emb``
    (:func:`aligner.retrieval.index_build.build_index`, ``jobs.build_index``'s defaults), its
    config beside it (``config.yaml``, as ``jobs.build_index`` leaves one)."""
    from aligner.retrieval.index_build import build_index

    conf = {"embeddings": str(emb), "output": str(index), "factory": factory}

    def build() -> None:
        build_index(emb, index, factory, progress=False, config=conf, started=time.time())
        (index / "config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))

    pipe.stage(name, index, build, conf, after=after)


def embed_and_index(pipe: Any, name: str, corpus: Path, ckpt: Path, emb: Path, index: Path,
                    cfg: PrepSettings, after: list[str]) -> None:
    """Stages ``<name>:embed`` and ``<name>:index``: the corpus embedded by ``ckpt``
    (:func:`embed_stage`) and its faiss index (:func:`index_stage`)."""
    embed_stage(pipe, f"{name}:embed", corpus, ckpt, emb, cfg.ray_address, after)
    index_stage(pipe, f"{name}:index", emb, index, cfg.index_factory, [f"{name}:embed"])


def prepare(cfg: PrepSettings, settings: RetrainSettings, pipe: Any, work: Path,
            first: dict[str, Any] | None = None) -> Prep:
    """The base, its embeddings and index, the rephrased queries and the model of round 1
    on the world ``cfg.world`` (made beforehand; each skipped when given or done; round 1's
    model is not even looked at once round 1 is finished: ``first`` is its manifest)."""
    from aligner.preferences.build import BuildPreferencesConfig, build_preferences
    from aligner.preferences.teacher import TEACHER_PRESETS
    from aligner.rephrase.run import RephraseConfig, run_rephrase
    from aligner.training.runs import run_align

    world = Path(cfg.world).resolve()
    if not (world / "corpus").is_dir():
        raise FileNotFoundError(f"world={world} holds no corpus/")
    base, base_info = base_stage(cfg, pipe, world, work / "base")
    prep_stages = [s for s in pipe.seen]
    emb = Path(cfg.base_embeddings).resolve() if cfg.base_embeddings else work / "embeddings"
    index = Path(cfg.base_index).resolve() if cfg.base_index else work / "index"
    if not cfg.base_embeddings:
        embed_stage(pipe, "base:embed", world / "corpus", base, emb, cfg.ray_address,
                    prep_stages)
    if not cfg.base_index:
        index_stage(pipe, "base:index", emb, index, cfg.index_factory,
                    [s for s in ("base:embed",) if s in pipe.seen])
    rephrased = Path(cfg.rephrased).resolve() if cfg.rephrased else work / "rephrased"
    if not cfg.rephrased:
        rc = RephraseConfig(input=str(world / "queries" / "queries.parquet"),
                            output=str(rephrased), backend="template", kinds=["content"],
                            ray_address=cfg.ray_address or None, progress=False)
        pipe.stage("rephrase", rephrased, lambda: run_rephrase(rc), stable(rc), after=[])
    emb_deps = [s for s in ("base", "base:embed", "rephrase") if s in pipe.seen]
    if first is not None:  # round 1 is finished: what it served is history
        initial = Served(Path(first["served"]["aligned"]), Path(first["served"].get("index", "")))
    elif cfg.initial == "labelfree":
        d = work / "initial"
        bc = BuildPreferencesConfig(embeddings=str(emb), queries=str(rephrased),
                                    output=str(d / "preferences"), splits=["train", "val"],
                                    examples=0, seed=settings.seed,
                                    **TEACHER_PRESETS["both+degraded"])
        pipe.stage("initial:preferences", d / "preferences", lambda: build_preferences(bc), bc,
                   after=emb_deps)
        ac = align_config(world, base, d / "preferences", d / "aligned", settings)
        pipe.stage("initial:aligned", d / "aligned", lambda: run_align(ac), stable(ac),
                   after=["initial:preferences"])
        ckpt = d / "aligned" / "checkpoint"
        embed_and_index(pipe, "initial", world / "corpus", ckpt, d / "embeddings", d / "index",
                        cfg, ["initial:aligned"])
        initial = Served(ckpt, d / "index")
    else:
        ckpt = checkpoint_dir(cfg.initial)
        if cfg.initial_index:
            initial = Served(ckpt, Path(cfg.initial_index).resolve())
        else:
            d = work / "initial"
            embed_and_index(pipe, "initial", world / "corpus", ckpt, d / "embeddings",
                            d / "index", cfg, [])
            initial = Served(ckpt, d / "index")
    return Prep(work, world, base, emb, index, rephrased, initial, base_info)


def evaluate_round(prep: Prep, pipe: Any, name: str, new: Served,
                   rd: Path) -> dict[str, Any]:
    """Stage ``<name>:evaluate`` (``evaluate=true``): the round's model ``new`` (embedded in
    ``rd/embeddings``) against the base on the held-out queries
    (:func:`aligner.evaluation.run.evaluate`); the primary metric's difference."""
    from aligner.data.results import read_metrics
    from aligner.evaluation.config import EvaluateConfig
    from aligner.evaluation.run import evaluate

    vc = EvaluateConfig(world=str(prep.world), output=str(rd / "evaluate"),
                        base_checkpoint=str(prep.base), base_embeddings=str(prep.embeddings),
                        models=[f"aligned={new.checkpoint}"],
                        embeddings=[f"aligned={rd / 'embeddings'}"],
                        rephrased=str(prep.rephrased))
    pipe.stage(f"{name}:evaluate", rd / "evaluate", lambda: evaluate(vc), vc,
               after=[f"{name}:embed"])
    ev = read_metrics(rd / "evaluate")
    k = ev.get("k", 10)
    comp = (ev.get("comparisons") or {}).get(ev.get("base_name", "base"), {})
    return {f"ndcg@{k}_diff": comp.get(f"ndcg@{k}_diff"),
            f"precision@{k}_diff": comp.get(f"precision@{k}_diff")}
