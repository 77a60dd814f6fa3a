"""A query-embedding cache: query text -> its normalised vector, least recently used out.

Search logs are heavy-tailed (a few queries are asked very often), and a text's vector
depends only on the text and the model, so a retriever replica can skip the text encoder for
a query it has seen. One cache per retriever replica (per model); thread-safe, since the
replica encodes in worker threads.

    cache = QueryCache(4096)
    vecs, misses = cache.lookup(["a red fox", "a dog"])    # None where not cached
    cache.store(["a dog"], encoded)                         # after encoding the misses
    cache.stats()   # {"size": ..., "capacity": ..., "hits": ..., "misses": ..., "hit_rate": ...}

A capacity of 0 turns it off (every lookup misses, nothing is kept).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


class QueryCache:
    """An LRU of query text -> float32 vector (read-only copies are handed out)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def lookup(self, texts: Sequence[str]) -> tuple[list[np.ndarray | None], list[int]]:
        """Each text's cached vector (None if absent) and the positions that missed."""
        out: list[np.ndarray | None] = []
        missed: list[int] = []
        with self._lock:
            for i, t in enumerate(texts):
                v = self._items.get(t) if self.capacity else None
                if v is None:
                    missed.append(i)
                    self.misses += 1
                else:
                    self._items.move_to_end(t)
                    self.hits += 1
                out.append(v)
        return out, missed

    def store(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Keep ``vectors[i]`` for ``texts[i]`` (evicting the least recently used)."""
        if not self.capacity:
            return
        with self._lock:
            for t, v in zip(texts, vectors, strict=True):
                v = np.array(v, np.float32)
                v.setflags(write=False)
                self._items[t] = v
                self._items.move_to_end(t)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def encode(self, texts: Sequence[str], encode) -> np.ndarray:  # noqa: ANN001 - a callable
        """``[B, D]`` vectors of ``texts``: cached ones as kept, the rest by one call of
        ``encode(list_of_missing_texts) -> [M, D]`` (then kept)."""
        got, missed = self.lookup(texts)
        if missed:
            # the same text twice in one batch is encoded once
            todo = list(dict.fromkeys(texts[i] for i in missed))
            fresh = np.asarray(encode(todo), np.float32)
            self.store(todo, fresh)
            by_text = dict(zip(todo, fresh, strict=True))
            for i in missed:
                got[i] = by_text[texts[i]]
        if not got:
            return np.zeros((0, 0), np.float32)
        return np.stack(got).astype(np.float32, copy=False)

    def stats(self) -> dict[str, float | int]:
        """Size, capacity, hits, misses and the hit rate so far."""
        with self._lock:
            n = self.hits + self.misses
            return {"size": len(self._items), "capacity": self.capacity, "hits": self.hits,
                    "misses": self.misses, "hit_rate": round(self.hits / n, 4) if n else 0.0}
