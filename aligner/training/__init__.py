"""The training stage: contrastive pre-training and preference alignment on Ray Train.

* :mod:`~aligner.training.config`: the typed configs (job level + the loop's ``train``);
* :mod:`~aligner.training.loop`: the one loop skeleton, parameter groups, schedule,
  checkpoints and the Ray Train glue;
* :mod:`~aligner.training.pretrain` / :mod:`~aligner.training.align`: what each loop adds
  (its step and its validation); :mod:`~aligner.training.selection`: alignment's output
  selection; :mod:`~aligner.training.losses`: the loss math;
* :mod:`~aligner.training.align_data`: the driver-side data of the alignment loop;
* :mod:`~aligner.training.runs`: :func:`run_pretrain` / :func:`run_align`, what the jobs run;
  :mod:`~aligner.training.plots`: the logs and plots they write;
* :mod:`~aligner.training.faults`: a worker death on purpose, for the tests of Ray Train's
  restart-from-checkpoint (``max_failures``).
"""
