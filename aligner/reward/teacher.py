"""A reward model as a teacher component: rewards of each query's candidate pool.

:class:`PoolRewards` is what the preference builder calls for the ``reward`` component
(``aesthetic=[reward]`` or mixed with others, each z-scored within the pool like every
component): ``pool_rewards(queries, ids_per_query) -> [rewards per query]``. Images are read
from the corpus and encoded once by the reward model's backbone (an id seen in several pools
is encoded once), queries once per batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aligner.reward.model import RewardModel

log = logging.getLogger(__name__)


class PoolRewards:
    """Rewards of (query, corpus image) pools under a trained reward model.

    Args:
        checkpoint: a reward checkpoint (``jobs.train_reward``'s ``checkpoint/``).
        corpus: the corpus the candidate ids come from.
    """

    def __init__(self, checkpoint: str | Path, corpus: str | Path) -> None:
        if not corpus:
            raise ValueError("the reward teacher needs the corpus (to read the pool images)")
        self.model = RewardModel.load(checkpoint, device="cpu")
        self.corpus = str(corpus)
        self.checkpoint = str(checkpoint)
        self._emb: dict[str, np.ndarray] = {}
        self.encoded = 0
        self.seconds = 0.0

    @property
    def name(self) -> str:
        return self.model.name

    def _encode(self, ids: Sequence[str]) -> None:
        from aligner.data.corpus import read_corpus
        from aligner.data.images import decode_rgb

        need = sorted(set(ids) - set(self._emb))
        if not need:
            return
        t0 = time.time()
        t = read_corpus(self.corpus, ["id", "image"], ids=need)
        got = dict(zip(t["id"].to_pylist(), t["image"].to_pylist(), strict=True))
        missing = [i for i in need if i not in got]
        if missing:
            raise ValueError(f"{len(missing)} pool images are not in {self.corpus}, e.g. "
                             f"{missing[:3]}")
        size = self.model.retriever.image_size
        pix = np.stack([decode_rgb(got[i], size) for i in need])
        emb = self.model.encode_pixels(pix)
        self._emb.update(zip(need, emb, strict=True))
        self.encoded += len(need)
        self.seconds += time.time() - t0

    def __call__(self, queries: Sequence[str], ids: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Normalised rewards of each query's candidates, one ``[K]`` array per query."""
        if len(queries) != len(ids):
            raise ValueError(f"{len(queries)} queries for {len(ids)} pools")
        self._encode([i for pool in ids for i in pool])
        txt = self.model.encode_texts(list(queries))
        out = []
        for q, pool in zip(txt, ids, strict=True):
            if not len(pool):
                out.append(np.zeros(0, np.float32))
                continue
            img = np.stack([self._emb[i] for i in pool])
            out.append(self.model.rewards_from_features(np.repeat(q[None], len(pool), 0), img)
                       .astype(np.float32))
        return out

    def describe(self) -> dict[str, object]:
        return {"reward_model": self.checkpoint, "name": self.name, "images_encoded": self.encoded,
                "encode_seconds": round(self.seconds, 1)}
