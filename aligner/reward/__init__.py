"""Reward models from pairwise preferences (ImageReward / VP-Score style): simulated-rater
votes are made by :mod:`aligner.world.raters`; the model, its scoring API and its data live
here; its Ray Train loop is :mod:`aligner.training.reward`."""
