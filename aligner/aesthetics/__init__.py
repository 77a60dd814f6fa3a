"""Aesthetic scorers: one interface (pixels or embeddings in, a score per image out), a
registry, and the hand-computed low-level scorer (:mod:`~aligner.aesthetics.scorer`). Used by
the embedding job (a score per image), the preference teacher and the cascade baseline."""
