"""Preference pairs for ranked DPO from a teacher: the grid's dominance pairs and degraded
copies, per training query (the paper's pipeline; ``docs/method.md``).

:func:`build_pools` retrieves and scores each query's pool (:mod:`.candidates`,
:mod:`.teacher`); :func:`build_pairs` turns pools into preference rows: the grid's partial
order (:mod:`.grid`) and **degraded-copy pairs** (SeVa; :func:`degraded_rows`): the query's top
``degraded_per_query`` candidates by semantic score, each preferred over a degraded copy of
itself (kinds cycled across queries, :mod:`aligner.preferences.degrade`). :class:`PairSettings`
holds every knob with the defaults measured in ``docs/defaults.md``.

Nothing here reads an oracle; nothing imports torch or Ray (text encoding is a callable).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aligner.preferences.degrade import (
    DEFAULT_DEGRADE_KINDS,
    DEFAULT_STRENGTH,
    cycle_kinds,
    degraded_id,
)
from aligner.preferences.grid import (
    WEIGHTINGS,
    GridShape,
    dominance_pairs,
    fit_grid,
    pair_weights,
    sample_grid,
)
from aligner.preferences.teacher import (
    TEACHER_COMPONENTS,
    EncodeTexts,
    RephraseBatch,
    aesthetic_score,
    teacher_components,
    teacher_name,
    template_rephraser,
)

log = logging.getLogger(__name__)
#: ``(queries, candidate ids per query) -> reward per candidate, per query``
PoolRewardFn = Callable[[Sequence[str], Sequence[Sequence[str]]], list[np.ndarray]]


@dataclass
class PairSettings:
    """How pairs are built from a teacher (:func:`build_pools`, :func:`build_pairs`).

    The defaults are the measured ones (``docs/defaults.md``): a 2 x 8 grid (row pairs agreed
    with the hidden taste far more often than semantic-only column pairs), on-policy pools
    (the model's own top 64 for the original query), 16 degraded-copy pairs per query, of the
    generic kinds ``DEFAULT_DEGRADE_KINDS`` (the oracle-aware kinds are an ablation only).
    """

    k: int = field(default=64, metadata={"help": "candidates retrieved per query"})
    u: int = field(default=2, metadata={"help": "grid rows (semantic groups)"})
    v: int = field(default=8, metadata={"help": "grid columns (aesthetic picks per row)"})
    stride: int = field(default=2, metadata={
        "help": "column stride; the grid uses the top u*v*stride candidates by semantics"})
    retrieve_with: str = field(default="original", metadata={
        "help": "pool retrieved with the original query (the model's own results, on-policy) "
                "| rephrased (the paper)"})
    aesthetic: list[str] = field(default_factory=lambda: ["scorer", "contrast"], metadata={
        "help": "teacher components: scorer, rephrase, contrast, reward (z-scored within the "
                "pool; reward needs reward_model)"})
    aesthetic_weights: list[float] = field(default_factory=lambda: [1.0, 1.0],
                                           metadata={"help": "one weight per component"})
    weighting: str = field(default="uniform", metadata={
        "help": "grid pair weights: uniform | margin (grid distance)"})
    grid: bool = field(default=True, metadata={"help": "emit grid pairs"})
    degraded: bool = field(default=True, metadata={"help": "emit degraded-copy pairs"})
    degraded_per_query: int = field(default=16, metadata={
        "help": "top candidates (by semantics) paired with a degraded copy of themselves"})
    degrade_kinds: list[str] = field(
        default_factory=lambda: list(DEFAULT_DEGRADE_KINDS),
        metadata={"help": "kinds cycled over the pairs (aligner.preferences.degrade)"})
    degrade_strengths: dict[str, float] = field(default_factory=dict, metadata={
        "help": "per-kind strength in (0, 1] (default 0.6), e.g. {blur: 0.8}"})

    def __post_init__(self) -> None:
        from aligner.preferences.degrade import DEGRADE_KINDS, parse_strengths

        if self.retrieve_with not in ("rephrased", "original"):
            raise ValueError(f"retrieve_with {self.retrieve_with!r}: rephrased | original")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting {self.weighting!r}: one of {list(WEIGHTINGS)}")
        unknown = [a for a in self.aesthetic if a not in TEACHER_COMPONENTS]
        if unknown:
            raise ValueError(f"aesthetic components {unknown}: known {list(TEACHER_COMPONENTS)}")
        if self.grid and not self.aesthetic:
            raise ValueError("the grid needs at least one aesthetic component")
        if len(self.aesthetic) != len(self.aesthetic_weights):
            raise ValueError(f"{len(self.aesthetic)} aesthetic components but "
                             f"{len(self.aesthetic_weights)} aesthetic_weights")
        if min(self.k, self.u, self.v, self.stride) < 1 or self.degraded_per_query < 0:
            raise ValueError("k, u, v, stride must be >= 1 and degraded_per_query >= 0")
        bad = [k for k in self.degrade_kinds if k not in DEGRADE_KINDS]
        if bad or (self.degraded and not self.degrade_kinds):
            raise ValueError(f"degrade_kinds {self.degrade_kinds}: non-empty, from "
                             f"{list(DEGRADE_KINDS)}")
        self.degrade_strengths = parse_strengths(self.degrade_strengths)

    @property
    def teacher(self) -> str:
        return teacher_name(self.aesthetic, self.aesthetic_weights)

    @property
    def needs_rephrase(self) -> bool:
        """Whether the queries must carry a rephrase (``contrast``'s good side is the rephrase)."""
        return self.retrieve_with == "rephrased" or bool({"rephrase", "contrast"}
                                                         & set(self.aesthetic))


@dataclass
class Pool:
    """One query's candidate pool with its scores (the builder's unit of work)."""

    query_id: str
    query: str
    rephrased: str | None
    ids: list[str]
    sem: np.ndarray  # [K] cosine to the original query
    aes: np.ndarray  # [K] combined teacher z-score
    components: dict[str, np.ndarray]  # raw teacher components, [K] each


@dataclass
class QueryText:
    """A training query: id, original text and its rephrase (None: not rephrased)."""

    query_id: str
    query: str
    rephrased: str | None = None


def build_pools(queries: Sequence[QueryText], encode: EncodeTexts, candidates: Any,
                settings: PairSettings, bad_rephrase: RephraseBatch | None = None,
                batch: int = 512, reward: PoolRewardFn | None = None) -> list[Pool]:
    """Retrieve and score the candidate pool of every query.

    Args:
        queries: the training queries (a query without a rephrase uses its original text
            wherever the rephrase is needed).
        encode: texts -> ``[N, D]`` normalised vectors (``Retriever.encode_texts``).
        candidates: :class:`MatrixCandidates` or :class:`IndexCandidates`.
        settings: K, teacher components and weights.
        bad_rephrase: antonym rephraser for ``contrast`` (default :data:`DEFAULT_BAD_TEMPLATE`).
        batch: queries encoded and searched at once.
        reward: ``(queries, ids per pool) -> rewards per pool`` for the ``reward`` component
            (:class:`aligner.reward.teacher.PoolRewards`); required when it is a component.
    """
    need_bad = "contrast" in settings.aesthetic
    if "reward" in settings.aesthetic and reward is None:
        raise ValueError("the 'reward' teacher component needs a reward model (reward_model=)")
    bad_rephrase = bad_rephrase or template_rephraser()
    pools: list[Pool] = []
    for lo in range(0, len(queries), batch):
        qs = queries[lo:lo + batch]
        orig = [q.query for q in qs]
        reph = [q.rephrased or q.query for q in qs]
        q_orig = encode(orig)
        q_reph = q_orig if reph == orig else encode(reph)
        q_bad = encode(list(bad_rephrase(orig))) if need_bad else None
        search_vec = q_reph if settings.retrieve_with == "rephrased" else q_orig
        found = candidates.search(search_vec, settings.k)
        rewards = reward(orig, found.ids) if "reward" in settings.aesthetic else None
        for b, q in enumerate(qs):
            cand = found.embeddings[b]
            comps = teacher_components(cand, q_orig[b], q_reph[b],
                                       q_bad[b] if q_bad is not None else None,
                                       found.aesthetic[b],
                                       rewards[b] if rewards is not None else None)
            sem = comps.pop("sem")
            aes = (aesthetic_score(comps, settings.aesthetic, settings.aesthetic_weights)
                   if len(cand) else np.zeros(0, np.float32))
            pools.append(Pool(q.query_id, q.query, q.rephrased, found.ids[b], sem, aes, comps))
    return pools


def grid_rows(pool: Pool, settings: PairSettings) -> tuple[list[dict[str, Any]], GridShape | None]:
    """The grid's dominance pairs of one pool as preference rows, and the grid shape used
    (``None``: too few candidates for any pair)."""
    shape = fit_grid(len(pool.ids), settings.u, settings.v, settings.stride)
    if shape is None:
        return [], None
    cells = sample_grid(pool.sem, pool.aes, shape)
    pairs = dominance_pairs(shape.u, shape.v)
    weights = pair_weights(pairs, settings.weighting)
    rows = []
    teacher = settings.teacher
    for ((i, j), (i2, j2)), w in zip(pairs, weights, strict=True):
        c, r = int(cells[i, j]), int(cells[i2, j2])
        rows.append({"query_id": pool.query_id, "query": pool.query,
                     "chosen_id": pool.ids[c], "rejected_id": pool.ids[r], "source": "grid",
                     "weight": float(w), "rephrased": pool.rephrased, "teacher": teacher,
                     "kind": "", "chosen_sem": float(pool.sem[c]),
                     "rejected_sem": float(pool.sem[r]), "chosen_aes": float(pool.aes[c]),
                     "rejected_aes": float(pool.aes[r]), "chosen_cell": i * shape.v + j,
                     "rejected_cell": i2 * shape.v + j2})
    return rows, shape


def degraded_rows(pool: Pool, settings: PairSettings, offset: int = 0) -> list[dict[str, Any]]:
    """The pool's top ``degraded_per_query`` candidates by semantic score, each preferred over a
    degraded copy of itself; kinds are taken in turn from ``degrade_kinds`` starting at
    ``offset`` (the builder passes ``query_index * degraded_per_query`` so kinds rotate)."""
    n = min(settings.degraded_per_query, len(pool.ids))
    if n == 0:
        return []
    top = np.argsort(-np.asarray(pool.sem, np.float64), kind="stable")[:n]
    kinds = cycle_kinds(settings.degrade_kinds, n, offset)
    rows = []
    for idx, kind in zip(top, kinds, strict=True):
        s = settings.degrade_strengths.get(kind, DEFAULT_STRENGTH)
        oid = pool.ids[int(idx)]
        rows.append({"query_id": pool.query_id, "query": pool.query, "chosen_id": oid,
                     "rejected_id": degraded_id(oid, kind, s), "source": "degraded",
                     "weight": 1.0, "rephrased": pool.rephrased, "teacher": "degraded",
                     "kind": kind, "chosen_sem": float(pool.sem[idx]),
                     "chosen_aes": float(pool.aes[idx])})
    return rows


def build_pairs(pools: Sequence[Pool], settings: PairSettings) -> tuple[list[dict[str, Any]],
                                                                       dict[str, Any]]:
    """Grid and degraded-copy rows for every pool, and counts for the manifest."""
    rows: list[dict[str, Any]] = []
    stats: dict[str, Any] = {"queries": len(pools), "empty_pools": 0, "reduced_grids": 0,
                             "no_grid": 0, "pool_sizes": {}}
    full = (settings.u, settings.v, settings.stride)
    sizes: dict[int, int] = {}
    for qi, pool in enumerate(pools):
        sizes[len(pool.ids)] = sizes.get(len(pool.ids), 0) + 1
        if not pool.ids:
            stats["empty_pools"] += 1
            continue
        if settings.grid:
            g, shape = grid_rows(pool, settings)
            rows += g
            if shape is None:
                stats["no_grid"] += 1
            elif tuple(shape) != full:
                stats["reduced_grids"] += 1
        if settings.degraded:
            rows += degraded_rows(pool, settings, qi * settings.degraded_per_query)
    stats["pool_sizes"] = {str(k): v for k, v in sorted(sizes.items())}
    return rows, stats
