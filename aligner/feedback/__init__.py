"""The feedback loop: votes -> reward model -> preferences -> a re-aligned retriever, round
after round (``jobs.loop``), and what votes buy (``jobs.learning_curve``).

* :mod:`~aligner.feedback.prepare` - what a loop needs before its first round: the world, the
  base, its embeddings and index, the rephrased queries, the first served model;
* :mod:`~aligner.feedback.retrain` - one home for "a votes table -> reward model -> teacher
  preferences -> re-aligned retriever" (:func:`~aligner.feedback.retrain.retrain`), used by
  ``jobs.loop`` and by the learning curve;
* :mod:`~aligner.feedback.rounds` - what a round of the served loop leaves behind: the
  simulated raters' HTTP client, the upgrade probe, round manifests and the loop report;
* :mod:`~aligner.feedback.active` - which pairs to ask people about (where the reward model
  is least sure);
* :mod:`~aligner.feedback.curve` - the learning curve: the primary measure against the number
  of votes per teacher (docs/learning_curve.md).

The library never imports ``serving``: deploying and upgrading the application is
``serving.rollout``'s part, glued to the library by ``jobs.loop``.
"""
