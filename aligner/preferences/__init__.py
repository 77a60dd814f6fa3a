"""Preference pairs from a teacher (the paper's training signal).

* :mod:`~aligner.preferences.candidates` - each query's candidate pool (exact or faiss);
* :mod:`~aligner.preferences.teacher` - semantic and aesthetic scores of a pool;
* :mod:`~aligner.preferences.grid` - the u x v grid and its dominance pairs;
* :mod:`~aligner.preferences.degrade` - degraded copies (free negatives, SeVa);
* :mod:`~aligner.preferences.pairs` - :class:`PairSettings`, pools -> preference rows;
* :mod:`~aligner.preferences.clean` - source weights, dedupe, contradictions, caps;
* :mod:`~aligner.preferences.build` - the builder job's config and run;
  :mod:`~aligner.preferences.examples` - its example images.
"""
