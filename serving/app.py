"""``build_app(args)``: the Serve application (``import_path: serving.app:build_app``).

    serve run serving/config.yaml                     # local, foreground
    serve deploy serving/config.yaml                  # onto a running cluster
    serve status

One deployment per model: ``retriever_<name>`` for every entry of ``models``, the
``reranker``, the ``rephraser``, the ``judge`` (whose default proxy uses ``judge.model``'s
retriever; an LMM or reward judge reads the corpus images)
and the ``ingress`` (the HTTP API and the page). ``args`` are validated by
:class:`serving.config.AppArgs` (unknown keys are errors) and the checkpoints and indexes must
exist, so a typo or a missing path fails here, at start-up, with the field named.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from serving.config import AppArgs, ModelArgs
from serving.deployments import IndexShard, Judge, Rephraser, Reranker, Retriever
from serving.ingress import Ingress

log = logging.getLogger("serving")


def shard_groups(n_shards: int, groups: int) -> list[list[int]]:
    """Shard numbers ``0..n_shards-1`` in ``groups`` contiguous groups, sizes differing by at
    most one.

    Raises:
        ValueError: more groups than shards.
    """
    if groups > n_shards:
        raise ValueError(f"shard_groups={groups} but the index has {n_shards} shard(s): "
                         "build it with at least that many (jobs.build_index shards=...)")
    base, extra = divmod(n_shards, groups)
    out, lo = [], 0
    for g in range(groups):
        hi = lo + base + (g < extra)
        out.append(list(range(lo, hi)))
        lo = hi
    return out


def shard_deployments(model: str, m: ModelArgs) -> dict[str, list[Any]]:
    """With ``shard_groups`` > 1: per index of the model, one bound :class:`IndexShard` per
    group of its shards (``shard_<model>_<index>_<g>``); empty otherwise."""
    if m.shard_groups <= 1:
        return {}
    from aligner.runtime.manifest import read_manifest

    out: dict[str, list[Any]] = {}
    for index, path in m.indexes.items():
        groups = shard_groups(len(read_manifest(path)["shards"]), m.shard_groups)
        out[index] = [IndexShard.options(name=f"shard_{model}_{index}_{g}").bind(
            path, numbers, m.mmap, m.nprobe, m.ef_search, m.k_factor)
            for g, numbers in enumerate(groups)]
    return out


def build_app(args: dict[str, Any]) -> Application:
    """The application graph from its ``args`` (see :class:`serving.config.AppArgs`).

    Raises:
        pydantic.ValidationError: an unknown key or a bad value (the field is named).
        FileNotFoundError: a missing checkpoint, index or corpus.
        ValueError: a protected API without a key.
    """
    cfg = AppArgs(**args).resolved()
    cfg.check_paths()
    if cfg.auth.protect != "none" and not cfg.auth.key():
        raise ValueError(f"auth.protect={cfg.auth.protect} needs an API key: set the "
                         f"environment variable {cfg.auth.api_key_env} (or auth.api_key), or "
                         "auth.protect=none on a trusted network")
    retrievers = {name: Retriever.options(
        name=f"retriever_{name}",
        ray_actor_options={"num_cpus": cfg.speed.retriever_cpus}).bind(
        name, m.model_dump(), cfg.limits.max_image_pixels, shard_deployments(name, m),
        cfg.speed.model_dump())
        for name, m in cfg.models.items()}
    reranker = Reranker.options(name="reranker").bind(
        cfg.reranker.n, cfg.reranker.weight, cfg.reranker.scorer, cfg.reranker.reward_model,
        cfg.reranker.reward_embeddings)
    rephraser = Rephraser.options(name="rephraser").bind(cfg.rephraser.backend,
                                                        cfg.rephraser.style,
                                                        cfg.rephraser.options)
    j = cfg.judge
    judge = Judge.options(name="judge").bind(
        retrievers[j.model], j.margin, j.kind, cfg.corpus,
        j.model_dump(include={"style", "prompt", "rationale", "compose", "thumb", "options"}))
    log.info("serving models %s (default %s), compare %s", sorted(cfg.models),
             cfg.default_model, cfg.compare)
    return Ingress.options(name="ingress").bind(cfg.model_dump(mode="json"), retrievers,
                                                reranker, rephraser, judge)
