"""The query-embedding cache: hits return what was encoded, misses are encoded once, least
recently used texts go first, capacity 0 keeps nothing, and the bench's LRU simulation
agrees with the cache."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from serving.query_cache import QueryCache


class Encoder:
    """Counts the texts it encodes; a text's vector is a deterministic function of it."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.stack([np.full(4, float(len(t)), np.float32) for t in texts])


def test_hits_equal_the_encoded_vectors_and_skip_the_encoder() -> None:
    enc, cache = Encoder(), QueryCache(8)
    first = cache.encode(["a fox", "a dog", "a fox"], enc)
    assert enc.calls == [["a fox", "a dog"]]  # the repeated text is encoded once
    again = cache.encode(["a dog", "a fox"], enc)
    assert enc.calls == [["a fox", "a dog"]]  # all hits: no call
    np.testing.assert_array_equal(again, first[[1, 0]])
    s = cache.stats()
    assert (s["hits"], s["misses"], s["size"]) == (2, 3, 2)  # per text looked up
    assert s["hit_rate"] == 0.4


def test_least_recently_used_goes_first() -> None:
    enc, cache = Encoder(), QueryCache(2)
    cache.encode(["a", "bb"], enc)
    cache.encode(["a"], enc)      # "a" is now the most recent
    cache.encode(["ccc"], enc)    # evicts "bb"
    enc.calls.clear()
    cache.encode(["a", "ccc", "bb"], enc)
    assert enc.calls == [["bb"]]


def test_capacity_zero_keeps_nothing_and_cached_vectors_are_read_only() -> None:
    enc, off = Encoder(), QueryCache(0)
    off.encode(["a"], enc)
    off.encode(["a"], enc)
    assert len(enc.calls) == 2 and off.stats()["size"] == 0
    on = QueryCache(4)
    on.encode(["a"], enc)
    got, missed = on.lookup(["a"])
    assert missed == [] and got[0] is not None
    with pytest.raises(ValueError):
        got[0][0] = 1.0
    with pytest.raises(ValueError):
        QueryCache(-1)


def test_the_bench_lru_simulation_matches_the_cache() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from bench_serve import lru_hit_rate, query_logs

    log = query_logs([f"query {i}" for i in range(30)], n=3000, distinct=500)["zipf"]
    cache = QueryCache(64)
    for t in log:
        cache.encode([t], lambda ts: np.zeros((len(ts), 2), np.float32))
    assert cache.stats()["hit_rate"] == pytest.approx(lru_hit_rate(log, 64), abs=1e-4)
    assert 0.3 < lru_hit_rate(log, 64) < 1.0  # heavy-tailed: a small cache already hits
