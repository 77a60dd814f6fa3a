"""A reward model as a query-time re-ranker over pre-computed image embeddings.

The reward checkpoint's backbone is a retriever, so ``jobs.embed model.checkpoint=<reward
checkpoint>`` embeds a corpus with it once, offline, like any model. :class:`RewardReranker`
holds those embeddings (id -> row, in memory: N x D x 4 bytes, e.g. 1 GB for 10^6 images at
D=256) and, per query, encodes the prompt with the reward model's text tower and scores the
candidates' stored image embeddings through the head: one text encoding and a small matrix
product per request, no image decoding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aligner.reward.model import RewardModel

log = logging.getLogger(__name__)


class RewardReranker:
    """Rewards of (query text, corpus ids) from a reward model and its embeddings of the corpus.

    Args:
        checkpoint: the reward checkpoint (``jobs.train_reward``'s ``checkpoint/``).
        embeddings: ``jobs.embed`` output made with that checkpoint as the model.

    Raises:
        FileNotFoundError: a missing checkpoint or embeddings directory.
        ValueError: embeddings made by another model, or of another size.
    """

    def __init__(self, checkpoint: str | Path, embeddings: str | Path) -> None:
        from aligner.data.embeddings import embedding_matrix, model_record, read_embeddings

        self.model = RewardModel.load(checkpoint, device="cpu")
        if not Path(embeddings).is_dir():
            raise FileNotFoundError(f"reward embeddings {embeddings} do not exist (jobs.embed "
                                    f"model.checkpoint={checkpoint})")
        rec = model_record(embeddings)
        want = self.model.retriever.checkpoint_hash
        if rec.get("checkpoint_hash") and rec["checkpoint_hash"] != want:
            raise ValueError(f"{embeddings} was embedded by model {rec['checkpoint_hash']}, not "
                             f"by the reward model's backbone {want}: re-embed with "
                             f"model.checkpoint={checkpoint}")
        t = read_embeddings(embeddings, ["id", "embedding"])
        self.emb = embedding_matrix(t)
        if self.emb.shape[1] != self.model.retriever.embed_dim:
            raise ValueError(f"{embeddings} holds {self.emb.shape[1]}-d vectors; the reward model "
                             f"embeds into {self.model.retriever.embed_dim}")
        self.row = {i: k for k, i in enumerate(t["id"].to_pylist())}
        log.info("reward re-ranker %s over %d embedded images", self.model.name, len(self.row))

    @property
    def name(self) -> str:
        return self.model.name

    def rewards(self, text: str, ids: Sequence[str]) -> np.ndarray:
        """Normalised rewards of the ids for the query ``[len(ids)]`` (NaN: an id without an
        embedding)."""
        out = np.full(len(ids), np.nan)
        rows = [(k, self.row[i]) for k, i in enumerate(ids) if i in self.row]
        if not rows:
            return out
        where, idx = (np.array(x) for x in zip(*rows, strict=True))
        txt = self.model.encode_texts([text])
        out[where] = self.model.rewards_from_features(np.repeat(txt, len(idx), 0), self.emb[idx])
        return out
