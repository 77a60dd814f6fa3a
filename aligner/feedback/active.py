"""Which pairs to ask people about next: where the current reward model is least sure.

Votes cost people's time, so a round of the feedback loop should ask about the pairs that teach
the reward model most. Given candidate pairs ``(query_id, image_a, image_b)`` and, per
candidate, the current reward ensemble's Bradley-Terry logits ``r_a - r_b`` (``[H, N]``, one row
per head: :meth:`aligner.reward.head_fit.HeadEnsemble.pair_logits`), :func:`choose_pairs`
picks ``m`` of them:

* ``random``: a seeded random order (the baseline; no model needed);
* ``uncertain``: the ensemble's mean P(a preferred) nearest 1/2 (uncertainty sampling: the
  Bradley-Terry Fisher information of a pair, ``p (1 - p)``, is largest there);
* ``disagreement``: the largest spread of the heads' P(a preferred) (query-by-committee: the
  heads were fitted on bootstrap resamples, so their spread is the model's own uncertainty,
  not the raters' noise, which no number of votes removes).

Every strategy caps the pairs per query (``per_query_cap``, a diversity constraint: without
it, uncertainty sampling piles onto the few queries the model knows least), breaks ties at
random (seeded), and only fills beyond the cap when the capped candidates run out.

:func:`between_rows_mask` expresses "between the two systems' rows" with image pairs: the
candidates with one image from one system's top-k for the query and the other from the other
system's (e.g. the base retriever's vs the aligned one's, or the base's vs the current reward
model's), where the two systems disagree and a vote separates them; combine it with any
strategy through ``allowed``.

numpy only: the caller scores the candidates (so this module does not depend on how).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

STRATEGIES = ("random", "uncertain", "disagreement")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, np.float64), -60, 60)))


def pair_uncertainty(logits: np.ndarray, strategy: str) -> np.ndarray:
    """How unsure the ensemble is about each pair (higher: less sure), ``[N]``.

    Args:
        logits: ``[H, N]`` (or ``[N]`` for one head) reward differences ``r_a - r_b``.
        strategy: ``uncertain`` (``0.5 - |mean_h p - 0.5|``) or ``disagreement`` (the standard
            deviation of the heads' ``p``; needs at least two heads).
    """
    lg = np.atleast_2d(np.asarray(logits, np.float64))
    p = sigmoid(lg)
    if strategy == "uncertain":
        return 0.5 - np.abs(p.mean(0) - 0.5)
    if strategy == "disagreement":
        if lg.shape[0] < 2:
            raise ValueError("disagreement needs an ensemble of at least 2 heads")
        return p.std(0)
    raise ValueError(f"no uncertainty for strategy {strategy!r} (one of {STRATEGIES[1:]})")


def choose_pairs(query_ids: Sequence[str], m: int, strategy: str = "uncertain",
                 logits: np.ndarray | None = None, per_query_cap: int = 0, seed: int = 0,
                 allowed: np.ndarray | None = None) -> np.ndarray:
    """The indices of the ``m`` candidates to vote on next, most useful first.

    Args:
        query_ids: ``[N]`` each candidate's query.
        m: how many to choose (fewer when fewer are allowed).
        strategy: one of :data:`STRATEGIES`.
        logits: ``[H, N]`` the current ensemble's ``r_a - r_b`` per candidate (not needed for
            ``random``).
        per_query_cap: at most this many per query (0: no cap); filled beyond it only when
            the capped candidates run out.
        seed: the random order (``random``) and tie-breaks.
        allowed: ``[N]`` bool, the candidates that may be chosen (e.g. not voted on yet).

    Raises:
        ValueError: an unknown strategy, a negative ``m`` or cap, or logits of the wrong shape.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if m < 0 or per_query_cap < 0:
        raise ValueError("m and per_query_cap must be >= 0")
    q = np.asarray(query_ids, object)
    n = len(q)
    ok = np.ones(n, bool) if allowed is None else np.asarray(allowed, bool)
    if ok.shape != (n,):
        raise ValueError(f"allowed has shape {ok.shape}, expected ({n},)")
    rng = np.random.default_rng([seed, 41])
    jitter = rng.random(n)
    if strategy == "random":
        order = np.argsort(jitter, kind="stable")
    else:
        if logits is None:
            raise ValueError(f"strategy {strategy!r} needs the ensemble's logits")
        lg = np.atleast_2d(np.asarray(logits, np.float64))
        if lg.shape[1] != n:
            raise ValueError(f"logits cover {lg.shape[1]} candidates, expected {n}")
        u = pair_uncertainty(lg, strategy)
        order = np.lexsort((jitter, -u))  # most uncertain first, ties at random
    order = order[ok[order]]
    if per_query_cap <= 0:
        return order[:m].astype(np.int64)
    taken: dict[object, int] = {}
    first: list[int] = []
    for i in order:
        if len(first) >= m:
            break
        k = taken.get(q[i], 0)
        if k < per_query_cap:
            taken[q[i]] = k + 1
            first.append(int(i))
    if len(first) < m:  # the cap left too few: the next best beyond it
        chosen = set(first)
        first += [int(i) for i in order if i not in chosen][:m - len(first)]
    return np.asarray(first, np.int64)


def between_rows_mask(query_ids: Sequence[str], a_ids: Sequence[str], b_ids: Sequence[str],
                      top_first: Mapping[str, Collection[str]],
                      top_second: Mapping[str, Collection[str]]) -> np.ndarray:
    """``[N]`` bool: candidates with one image only in the first system's top-k for the query
    and the other only in the second's (in either order). Images both systems show do not
    separate them and do not count."""
    out = np.zeros(len(query_ids), bool)
    for k, (q, a, b) in enumerate(zip(query_ids, a_ids, b_ids, strict=True)):
        f, s = set(top_first.get(q, ())), set(top_second.get(q, ()))
        only_f, only_s = f - s, s - f
        out[k] = (a in only_f and b in only_s) or (a in only_s and b in only_f)
    return out


def top_k_rows(query_ids: Sequence[str], image_ids: Sequence[str], scores: np.ndarray,
               k: int) -> dict[str, set[str]]:
    """Per query, the ``k`` best-scored images of its candidates (a system's result row):
    ``query_ids`` / ``image_ids`` / ``scores`` are row-aligned ``[M]``."""
    out: dict[str, list[tuple[float, str]]] = {}
    for q, i, s in zip(query_ids, image_ids, np.asarray(scores, np.float64), strict=True):
        out.setdefault(q, []).append((float(s), i))
    return {q: {i for _, i in sorted(set(v), key=lambda t: (-t[0], t[1]))[:k]}
            for q, v in out.items()}
