"""Retrieval: models and what serves queries with them.

* :mod:`~aligner.retrieval.models` - retrievers (open_clip names, checkpoints, the built-in
  model), checkpoints, :func:`to_pixels`; :mod:`~aligner.retrieval.textcache` - the locked text
  tower's cached outputs; :mod:`~aligner.retrieval.shipped` - the base model the repo ships;
* :mod:`~aligner.retrieval.embed` (+ :mod:`~aligner.retrieval.embed_pipeline`) - the Ray
  Data embedding job;
* :mod:`~aligner.retrieval.index` / :mod:`~aligner.retrieval.index_build` - faiss indexes;
  :mod:`~aligner.retrieval.search` - text search over an index;
* :mod:`~aligner.retrieval.metrics` - top-k and the three recalls, one definition each.
"""
