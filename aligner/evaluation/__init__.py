"""Evaluation: the aligned retriever against the systems a user would otherwise pick.

* :mod:`~aligner.evaluation.config` - :class:`EvaluateConfig` and the settings groups it nests
  (:class:`BaselineSettings`, :class:`SweepSettings`, :class:`HpirSettings`).
* :mod:`~aligner.evaluation.gallery` - the gallery, the held-out queries, gallery embeddings.
* :mod:`~aligner.evaluation.systems` - the retrieval systems (pure numpy);
  :mod:`~aligner.evaluation.build` builds them from checkpoints (also for a search service).
* :mod:`~aligner.evaluation.run` - :func:`run_evaluation` / :func:`evaluate`, the phases of
  :mod:`~aligner.evaluation.phases`, :mod:`~aligner.evaluation.equal_relevance` and
  :mod:`~aligner.evaluation.assemble` in order.
* Metrics: :mod:`~aligner.evaluation.oracle` (the only reader of the world's oracle),
  :mod:`~aligner.evaluation.oracle_metrics`, :mod:`~aligner.evaluation.stats`,
  :mod:`~aligner.evaluation.sweeps`; the report: :mod:`~aligner.evaluation.report`.
* :mod:`~aligner.evaluation.checkpoint` - one checkpoint's quick evaluation (pretraining).

Outputs follow :mod:`aligner.data.results`.
"""
