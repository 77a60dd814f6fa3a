"""Preference pairs for ranked DPO: the semantic x aesthetic grid and degraded copies (numpy).

Per training query q (METHOD.md section 1; :func:`build_pairs` runs it all):

1. **retrieve** the top-K candidates with the rephrased (or original) query vector, exactly
   from an embedding matrix (:class:`MatrixCandidates`) or from a faiss index
   (:class:`IndexCandidates`);
2. **semantic score**: cosine of each candidate to the *original* query;
3. **aesthetic score**: named teacher components, each z-scored within the pool, combined
   with weights (:func:`teacher_components`, :func:`aesthetic_score`):

   - ``scorer``: the embeddings' ``aesthetic`` column (the pixel scorer, e.g. low-level);
   - ``rephrase``: cos(image, rephrased query) - cos(image, original query);
   - ``contrast``: cos(image, good rephrase) - cos(image, bad rephrase) - the CLIP-IQA
     antonym-prompt idea; the good rephrase is the rephrased query, the bad one comes from
     a callable (default :data:`DEFAULT_BAD_TEMPLATE`);
4. **grid** (:func:`sample_grid`): the pool sorted by semantic score is cut into ``u``
   consecutive rows of ``v * stride`` candidates (so the grid uses the top ``u * v * stride``
   by semantics); within a row, candidates sorted by aesthetic score are taken at positions
   ``0, stride, ..., (v - 1) * stride``. A pool too small for that shrinks the grid
   (:func:`fit_grid`: stride first, then the longer side), and the builder counts it;
5. **partial order** (:func:`dominance_pairs`): cell (i, j) beats (i', j') when i <= i',
   j <= j' and the cells differ: sum_{i,j} (u - i)(v - j) - uv pairs (84 for 4 x 4);
6. **weights** (:func:`pair_weights`): ``uniform`` (1) or ``margin`` (grid distance
   (i' - i) + (j' - j), normalised to mean 1 over the grid's pairs).

**Degraded-copy pairs** (SeVa, METHOD.md section 3; :func:`degraded_rows`): the query's top
``degraded_per_query`` candidates by semantic score, each preferred over a degraded copy of
itself (kinds cycled across queries, :mod:`aligner.preferences.degrade`).

Nothing here reads an oracle; nothing imports torch or Ray (text encoding is a callable).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from aligner.preferences.degrade import DEFAULT_STRENGTH, cycle_kinds, degraded_id

log = logging.getLogger(__name__)

TEACHER_COMPONENTS = ("scorer", "rephrase", "contrast")
DEFAULT_BAD_TEMPLATE = "a blurry, grainy, dark, dull, off-centre photo of {q} with a sickly green tint"
DEFAULT_GOOD_TEMPLATE = "a crisp, clean, well-lit, vivid, centred photo of {q} in warm golden light"
WEIGHTINGS = ("uniform", "margin")

EncodeTexts = Callable[[list[str]], np.ndarray]  # texts -> [N, D] L2-normalised
RephraseBatch = Callable[[Sequence[str]], list[str]]  # queries -> rephrases, one each


def template_rephraser(template: str = DEFAULT_BAD_TEMPLATE) -> RephraseBatch:
    """A batch rephraser from a ``{q}`` template (the default antonym for ``contrast``).

    ``aligner.rephrase.TemplateRephraser(style, polarity="bad").rephrase_batch`` or any LLM
    rephraser's ``rephrase_batch`` plugs in the same way.
    """
    if "{q}" not in template:
        raise ValueError(f"template {template!r} has no {{q}} placeholder")

    def rephrase(queries: Sequence[str]) -> list[str]:
        return [template.replace("{q}", " ".join(str(q).split()).rstrip(" .,;:"))
                for q in queries]

    return rephrase


# ----------------------------------------------------------------------------- teacher

def zscore(x: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` over the finite entries; NaN -> 0; a constant vector -> zeros."""
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    out = np.zeros(x.shape, np.float64)
    if ok.sum() >= 2:
        sd = x[ok].std()
        if sd > 1e-12:
            out[ok] = (x[ok] - x[ok].mean()) / sd
    return out.astype(np.float32)


def teacher_components(cand: np.ndarray, q_orig: np.ndarray, q_reph: np.ndarray | None = None,
                       q_bad: np.ndarray | None = None,
                       scorer: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Raw per-candidate scores of one pool: ``sem`` and every available teacher component.

    Args:
        cand: ``[K, D]`` normalised candidate image embeddings.
        q_orig: ``[D]`` original query vector.
        q_reph: ``[D]`` rephrased ("good") query vector, if any.
        q_bad: ``[D]`` antonym ("bad") rephrase vector, if any.
        scorer: ``[K]`` pixel-scorer values (NaN where unscored), if any.

    Returns:
        ``{"sem": [K], "scorer": [K], "rephrase": [K], "contrast": [K]}`` (components whose
        inputs are missing are left out). ``contrast`` uses the original query as the good
        side when there is no rephrase.
    """
    sem = cand @ q_orig
    out = {"sem": sem.astype(np.float32)}
    if scorer is not None:
        out["scorer"] = np.asarray(scorer, np.float32)
    if q_reph is not None:
        out["rephrase"] = (cand @ q_reph - sem).astype(np.float32)
    if q_bad is not None:
        good = cand @ q_reph if q_reph is not None else sem
        out["contrast"] = (good - cand @ q_bad).astype(np.float32)
    return out


def aesthetic_score(components: Mapping[str, np.ndarray], names: Sequence[str],
                    weights: Sequence[float]) -> np.ndarray:
    """``sum_k w_k * zscore(component_k)`` over the pool: ``[K]`` float32.

    Raises:
        ValueError: a name that is not in ``components``, or names/weights of unequal length.
    """
    if len(names) != len(weights):
        raise ValueError(f"{len(names)} aesthetic components but {len(weights)} weights")
    total = None
    for name, w in zip(names, weights, strict=True):
        if name not in components:
            raise ValueError(f"aesthetic component {name!r} is not available here "
                             f"(have {sorted(k for k in components if k != 'sem')})")
        z = float(w) * zscore(components[name])
        total = z if total is None else total + z
    if total is None:
        raise ValueError("no aesthetic components given")
    return total.astype(np.float32)


def teacher_name(names: Sequence[str], weights: Sequence[float]) -> str:
    """``"scorer*1+contrast*1"``: the teacher string recorded with each pair."""
    return "+".join(f"{n}*{w:g}" for n, w in zip(names, weights, strict=True))


# ----------------------------------------------------------------------------- grid

class GridShape(NamedTuple):
    """Rows (semantic groups), columns (aesthetic picks) and the column stride."""

    u: int
    v: int
    stride: int


def fit_grid(n: int, u: int, v: int, stride: int) -> GridShape | None:
    """The largest grid a pool of ``n`` candidates allows, shrinking gracefully.

    ``u * v * stride <= n`` is needed. The stride shrinks first (down to 1); then the longer
    of u / v loses one at a time (v on ties). ``None`` when fewer than 2 cells fit.
    """
    if u < 1 or v < 1 or stride < 1:
        raise ValueError(f"u, v and stride must be >= 1, got {u}, {v}, {stride}")
    stride = max(1, min(stride, n // max(1, u * v)))
    while u * v > n:
        if v >= u and v > 1:
            v -= 1
        else:
            u -= 1
    if u * v < 2:
        return None
    return GridShape(u, v, stride)


def sample_grid(sem: np.ndarray, aes: np.ndarray, shape: GridShape) -> np.ndarray:
    """Pool indices of the grid's cells: ``[u, v]`` int64 (rows best semantic first, columns
    best aesthetic first). The pool must hold ``u * v * stride`` candidates (:func:`fit_grid`).

    Ties are broken by pool order (stable sorts), so the result is deterministic.
    """
    u, v, stride = shape
    group = v * stride
    if len(sem) < u * group:
        raise ValueError(f"a pool of {len(sem)} is too small for grid {shape}")
    by_sem = np.argsort(-np.asarray(sem, np.float64), kind="stable")
    cells = np.empty((u, v), np.int64)
    a = np.asarray(aes, np.float64)
    for i in range(u):
        members = by_sem[i * group:(i + 1) * group]
        ranked = members[np.argsort(-a[members], kind="stable")]
        cells[i] = ranked[np.arange(v) * stride]
    return cells


def dominance_pairs(u: int, v: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Every ``((i, j), (i2, j2))`` with ``i <= i2``, ``j <= j2`` and distinct cells: the first
    cell is preferred (at least as good on both axes, better on one). Row-major order."""
    cells = [(i, j) for i in range(u) for j in range(v)]
    return [(a, b) for a in cells for b in cells
            if a != b and a[0] <= b[0] and a[1] <= b[1]]


def pair_weights(pairs: Sequence[tuple[tuple[int, int], tuple[int, int]]],
                 weighting: str = "uniform") -> np.ndarray:
    """``[P]`` float32: ``uniform`` ones, or ``margin`` = grid distance normalised to mean 1."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r}: one of {list(WEIGHTINGS)}")
    if weighting == "uniform" or not pairs:
        return np.ones(len(pairs), np.float32)
    d = np.array([(b[0] - a[0]) + (b[1] - a[1]) for a, b in pairs], np.float64)
    return (d / d.mean()).astype(np.float32)


# ----------------------------------------------------------------------------- candidates

class Candidates(NamedTuple):
    """Top-k retrieval results for a batch of queries.

    Attributes:
        ids: ``Q`` lists of up to ``k`` ids, best first.
        embeddings: ``Q`` arrays ``[k_q, D]`` of the candidates' image embeddings.
        aesthetic: ``Q`` arrays ``[k_q]`` of their pixel-scorer values (NaN if unknown).
    """

    ids: list[list[str]]
    embeddings: list[np.ndarray]
    aesthetic: list[np.ndarray]


class MatrixCandidates:
    """Exact cosine top-k over an in-memory ``[N, D]`` matrix (``aligner.evaluation.stats.topk``).

    Args:
        ids: ``N`` image ids.
        matrix: ``[N, D]`` normalised float32 embeddings.
        aesthetic: ``[N]`` scorer values (None: NaN).
        chunk: queries scored at once (memory ``chunk x N`` floats).
    """

    def __init__(self, ids: Sequence[str], matrix: np.ndarray, aesthetic: np.ndarray | None = None,
                 chunk: int = 256) -> None:
        self.ids = list(ids)
        self.matrix = np.asarray(matrix, np.float32)
        self.aesthetic = (np.full(len(self.ids), np.nan, np.float32) if aesthetic is None
                          else np.asarray(aesthetic, np.float32))
        if not (len(self.ids) == len(self.matrix) == len(self.aesthetic)):
            raise ValueError("ids, matrix and aesthetic differ in length")
        self.chunk = chunk

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def search(self, vectors: np.ndarray, k: int) -> Candidates:
        from aligner.evaluation.stats import topk

        ids, emb, aes = [], [], []
        for lo in range(0, len(vectors), self.chunk):
            _, idx = topk(np.asarray(vectors[lo:lo + self.chunk], np.float32), self.matrix, k)
            for row in idx:
                ids.append([self.ids[i] for i in row])
                emb.append(self.matrix[row])
                aes.append(self.aesthetic[row])
        return Candidates(ids, emb, aes)

    @classmethod
    def from_embeddings(cls, embeddings_dir: str | Path) -> MatrixCandidates:
        """Load an embed job's output (``id``, ``embedding``, ``aesthetic``) into memory."""
        from aligner.retrieval.embed_pipeline import embedding_matrix, read_embeddings

        t = read_embeddings(embeddings_dir, ["id", "embedding", "aesthetic"])
        aes = t.column("aesthetic").to_numpy(zero_copy_only=False).astype(np.float32)
        return cls(t.column("id").to_pylist(), embedding_matrix(t), aes)


class IndexCandidates:
    """Top-k from a faiss index (:class:`aligner.retrieval.index.SearchIndex`), for corpora too large to
    hold in memory. The candidates' exact embeddings and scorer values are then read from the
    embeddings directory with a pushed-down ``id`` filter (an IVF-PQ index only stores
    approximate vectors), so semantic and teacher scores are exact.
    """

    def __init__(self, index: Any, embeddings_dir: str | Path) -> None:
        self.index = index
        self.embeddings_dir = Path(embeddings_dir)

    @property
    def dim(self) -> int:
        return int(self.index.dim)

    def _lookup(self, ids: set[str]) -> dict[str, tuple[np.ndarray, float]]:
        import pyarrow.dataset as ds

        from aligner.retrieval.embed_pipeline import EMBEDDINGS_DIR, embedding_matrix

        d = ds.dataset(str(self.embeddings_dir / EMBEDDINGS_DIR), format="parquet")
        t = d.to_table(columns=["id", "embedding", "aesthetic"],
                       filter=ds.field("id").isin(sorted(ids)))
        m = embedding_matrix(t)
        a = t.column("aesthetic").to_numpy(zero_copy_only=False).astype(np.float32)
        return {i: (m[r], float(a[r])) for r, i in enumerate(t.column("id").to_pylist())}

    def search(self, vectors: np.ndarray, k: int) -> Candidates:
        res = self.index.search(np.asarray(vectors, np.float32), k)
        found = self._lookup({i for row in res.ids for i in row if i is not None})
        ids, emb, aes = [], [], []
        for row in res.ids:
            keep = [i for i in row if i is not None and i in found]
            ids.append(keep)
            emb.append(np.stack([found[i][0] for i in keep]) if keep
                       else np.zeros((0, self.dim), np.float32))
            aes.append(np.array([found[i][1] for i in keep], np.float32))
        return Candidates(ids, emb, aes)


# ----------------------------------------------------------------------------- pools and pairs

@dataclass
class PairSettings:
    """What :func:`build_pairs` does (the job's config maps onto this)."""

    k: int = 64
    u: int = 4
    v: int = 4
    stride: int = 2
    retrieve_with: str = "rephrased"
    aesthetic: list[str] = field(default_factory=lambda: ["scorer", "contrast"])
    aesthetic_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])
    weighting: str = "uniform"
    grid: bool = True
    degraded: bool = True
    degraded_per_query: int = 4
    degrade_kinds: list[str] = field(default_factory=lambda: ["blur", "noise", "dark",
                                                              "bright", "washed", "tint", "crop"])
    degrade_strengths: dict[str, float] = field(default_factory=dict)

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
                batch: int = 512) -> list[Pool]:
    """Retrieve and score the candidate pool of every query.

    Args:
        queries: the training queries (a query without a rephrase uses its original text
            wherever the rephrase is needed).
        encode: texts -> ``[N, D]`` normalised vectors (``Retriever.encode_texts``).
        candidates: :class:`MatrixCandidates` or :class:`IndexCandidates`.
        settings: K, teacher components and weights.
        bad_rephrase: antonym rephraser for ``contrast`` (default :data:`DEFAULT_BAD_TEMPLATE`).
        batch: queries encoded and searched at once.
    """
    need_bad = "contrast" in settings.aesthetic
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
        for b, q in enumerate(qs):
            cand = found.embeddings[b]
            comps = teacher_components(cand, q_orig[b], q_reph[b],
                                       q_bad[b] if q_bad is not None else None,
                                       found.aesthetic[b])
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
