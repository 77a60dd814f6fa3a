"""Evaluate the aligned retriever against the systems a user would otherwise pick.

Systems (all search the same gallery: by default the held-out test-split images, which no
model trained on; ``gallery=all`` is the deployment view, the whole corpus): the base; ``cascade`` (base top-N re-ranked by the low-level aesthetic scorer);
``query_shift`` (clip-retrieval's aesthetic query shift); ``rephrase`` (the base with the LLM
rephrasing of each query, from a table); ``teacher_rerank`` (the base's top-N re-ranked at
query time by the teacher that trained the aligned model); and every ``models`` entry
(aligned, control, teacher variants). Metrics over the held-out content queries, with bootstrap 95% CIs: recall
of held-out captions (the no-regression check), oracle aesthetic@K and its paired difference
against the base and between systems, content precision@K, the scorer's aesthetic@K,
HPIR-style row agreement with the oracle, timing; each baseline's knob swept, its setting
chosen on validation queries and compared at equal relevance on the held-out ones; teacher
diagnostics for preference tables; the rephrasing premise.

The oracle is read only through :mod:`aligner.evaluation.oracle` and only for the built-in
world (``world``). With ``corpus`` (+ ``queries``) instead, only the metrics that need no
oracle are computed (recall if captions exist, the scorer's aesthetic@K, timing) and the
report says which were skipped.

:func:`run_evaluation` computes everything; :func:`evaluate` also writes the outputs
(``metrics.json``, ``per_query.parquet`` and ``rankings.parquet`` - each system's top K
image ids per held-out query, what ``jobs.judge`` shows its judge - through
:mod:`aligner.data.results`, then
``report.html``, ``report.png``, ``config.yaml`` and ``manifest.json``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aligner.evaluation import assemble, equal_relevance, phases
from aligner.evaluation.config import EvaluateConfig
from aligner.evaluation.phases import EvalState

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

#: The phases, in the order they run.
PHASES = (phases.load_inputs, phases.build, phases.search_and_time, phases.per_query_metrics,
          phases.caption_recall, phases.hpir, equal_relevance.sweep_baselines, assemble.compare,
          assemble.teacher_and_premise, assemble.assemble, assemble.grids)


@dataclass
class EvalResult:
    """An evaluation's results.

    Attributes:
        metrics: what ``metrics.json`` holds.
        per_query: the per-query table (:mod:`aligner.data.results`).
        gains: per query, the aligned model's primary metric minus the base's (None without
            an aligned model).
        grids: ``[(query, [(system, items)])]`` for the report.
        inputs, counts, timings: what the manifest records.
        table: the summary table printed to stdout.
        paths: what :func:`evaluate` wrote (empty from :func:`run_evaluation`).
        rankings: each system's top ``k`` image ids per held-out query
            (:func:`aligner.data.results.rankings_table`).
    """

    metrics: dict[str, Any]
    per_query: pa.Table
    gains: np.ndarray | None
    grids: list
    inputs: dict[str, Any]
    counts: dict[str, int]
    timings: dict[str, Any]
    table: str
    paths: dict[str, Path] = field(default_factory=dict)
    rankings: pa.Table | None = None


def rankings(st: EvalState) -> pa.Table:
    """Each system's top ``k`` image ids per held-out query (the rankings table)."""
    from aligner.data.results import rankings_table

    ids, k = st.gallery.ids, st.cfg.k
    tops = {name: [[ids[i] for i in row[:k] if i >= 0] for row in np.asarray(top)]
            for name, top in st.tops.items()}
    return rankings_table(st.qids, st.texts, tops)


def result(st: EvalState) -> EvalResult:
    """The :class:`EvalResult` of a state every phase has run on."""
    from aligner.data.results import per_query_table
    from aligner.evaluation.report import summary_table

    cfg, per, primary = st.cfg, st.per, st.primary
    aligned = cfg.aligned_name
    gains = (per[aligned][primary] - per[cfg.base_name][primary]) if aligned in per else None
    return EvalResult(
        metrics=st.metrics, per_query=per_query_table(st.qids, st.texts, per), gains=gains,
        grids=st.grids,
        inputs={"gallery": st.gallery.source, "base_checkpoint": cfg.base_checkpoint,
                "models": cfg.model_dirs(), "rephrased": cfg.rephrased,
                "preferences": cfg.preference_dirs()},
        counts={"gallery_images": len(st.gallery.ids), "queries": len(st.qids),
                "systems": len(st.systems), "recall_captions": st.rec_info.get("captions", 0),
                "hpir_pairs": st.hpir_info.get("pairs", 0)},
        timings={"load_and_embed_s": round(st.load_s, 1), "models": st.built.info},
        table=summary_table(st.metrics), rankings=rankings(st))


def run_evaluation(cfg: EvaluateConfig) -> EvalResult:
    """Everything but writing: systems, metrics, comparisons, verdict, grids.

    Raises:
        FileNotFoundError, ValueError, KeyError: missing or malformed inputs.
    """
    st = EvalState(cfg)
    took = {}
    for phase in PHASES:
        t0 = time.time()
        phase(st)
        took[phase.__name__] = round(time.time() - t0, 1)
    log.info("evaluation phases (s): %s", ", ".join(f"{k} {v}" for k, v in took.items()))
    return result(st)


def evaluate(cfg: EvaluateConfig) -> EvalResult:
    """Run the evaluation and write its outputs to ``cfg.output``: ``config.yaml`` (first, so
    a failed run still says how it was called), ``metrics.json``, ``per_query.parquet``,
    ``report.html``, ``report.png`` (+ ``summary.png``, ``frontier.png``, ``grid_0.png``) and
    ``manifest.json``.

    Raises:
        FileNotFoundError, ValueError, KeyError: missing or malformed inputs.
    """
    from aligner.data.results import write_rankings, write_results
    from aligner.evaluation.report import write_report
    from aligner.runtime.config import save_config, to_dict
    from aligner.runtime.manifest import write_manifest

    started = time.time()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    res = run_evaluation(cfg)
    res.paths.update(write_results(out, res.metrics, res.per_query))
    res.paths["rankings"] = write_rankings(res.rankings, out)
    report = write_report(out, res.metrics, res.gains, res.grids)
    res.paths.update({"report": report["html"], "report_png": report["png"]})
    write_manifest(out, "evaluate", to_dict(cfg), started, inputs=res.inputs, counts=res.counts,
                   outputs={"metrics": "metrics.json", "per_query": "per_query.parquet",
                            "rankings": "rankings.parquet", "report": "report.html",
                            "report_png": "report.png"},
                   timings=res.timings)
    res.paths["manifest"] = out / "manifest.json"
    log.info("wrote %s", ", ".join(str(p) for p in res.paths.values()))
    return res
