"""What an evaluation is told: :class:`EvaluateConfig` and the settings groups it nests.

:class:`BaselineSettings` holds the knobs of the query-time systems (cascade, query shift,
rephrase, teacher re-rank) and the aesthetic scorer; it is all a caller outside the evaluation
(a search service) needs to build the same systems (:mod:`aligner.evaluation.build`). On the command
line the groups are dotted keys: ``baseline.cascade_weight=2``, ``sweep.enabled=false``,
``hpir.pool=20``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aligner.evaluation.sweeps import DEFAULT_SWEEPS

BASELINES = ("cascade", "query_shift", "rephrase", "teacher_rerank")


def parse_named(items: list[str], what: str) -> dict[str, str]:
    """``["name=path", ...]`` -> ``{name: path}`` (ValueError on a bad or repeated name)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"{what}: {item!r} is not name=path")
        if name.strip() in out:
            raise ValueError(f"{what}: name {name.strip()!r} given twice")
        out[name.strip()] = path.strip()
    return out


@dataclass
class BaselineSettings:
    """The query-time systems over the base model, and the scorer they use."""

    cascade_n: int = field(default=50, metadata={"help": "cascade: base candidates re-ranked"})
    cascade_weight: float = field(default=1.0, metadata={
        "help": "cascade: final = z(sim) + w * z(aesthetic) in the top N (inf: aesthetic sort)"})
    shift_quantile: float = field(default=0.1, metadata={
        "help": "query shift: direction = mean embedding of this top fraction by aesthetic"})
    shift_weight: float = field(default=0.5, metadata={
        "help": "query shift: q' = normalise(q + w e) (clip-retrieval's aesthetic_weight)"})
    rephrase_missing: str = field(default="plain", metadata={
        "help": "a query without rephrasing: plain (keep it, counted) | error"})
    scorer: str = field(default="lowlevel", metadata={
        "help": "aesthetic scorer (cascade, shift; the teacher's 'scorer' component)"})
    teacher_weight: float = field(default=1.0, metadata={
        "help": "teacher_rerank: final = z(sim) + w * z(teacher) in the cascade's top N "
                "(inf: teacher sort)"})
    teacher_preferences: str = field(default="", metadata={
        "help": "teacher_rerank: preferences dir whose manifest names the teacher ('': the "
                "aligned model's, via its align manifest)"})
    teacher_aesthetic: list[str] = field(default_factory=list, metadata={
        "help": "teacher_rerank when no preferences manifest is found: components (scorer, "
                "rephrase, contrast; []: skip)"})
    teacher_aesthetic_weights: list[float] = field(default_factory=list, metadata={
        "help": "one weight per teacher_aesthetic component ([]: 1 each)"})
    teacher_bad_template: str = field(default="", metadata={
        "help": "with teacher_aesthetic: the bad rephrase's {q} template ('': the builder's "
                "default)"})
    teacher_bad_rephraser: str = field(default="", metadata={
        "help": "with teacher_aesthetic: '' (the template) | template:<style>"})

    def __post_init__(self) -> None:
        from aligner.preferences.teacher import TEACHER_COMPONENTS

        if self.cascade_n < 1:
            raise ValueError("cascade_n must be >= 1")
        if not 0 < self.shift_quantile < 1 or self.shift_weight < 0 or self.cascade_weight < 0 \
                or self.teacher_weight < 0:
            raise ValueError("shift_quantile in (0, 1); shift_weight, cascade_weight, "
                             "teacher_weight >= 0")
        if self.rephrase_missing not in ("plain", "error"):
            raise ValueError("rephrase_missing must be 'plain' or 'error'")
        unknown = [c for c in self.teacher_aesthetic if c not in TEACHER_COMPONENTS]
        if unknown:
            raise ValueError(f"teacher_aesthetic {unknown}: known {list(TEACHER_COMPONENTS)}")
        if self.teacher_aesthetic_weights and \
                len(self.teacher_aesthetic_weights) != len(self.teacher_aesthetic):
            raise ValueError("teacher_aesthetic_weights needs one weight per teacher_aesthetic "
                             "component")
        if self.teacher_bad_template and "{q}" not in self.teacher_bad_template:
            raise ValueError("teacher_bad_template needs a {q} placeholder")
        if self.teacher_bad_rephraser and not self.teacher_bad_rephraser.startswith("template:"):
            raise ValueError("teacher_bad_rephraser: '' or 'template:<style>'")


@dataclass
class SweepSettings:
    """Each baseline's knob swept, and the comparison at equal or better relevance."""

    enabled: bool = field(default=True, metadata={
        "help": "sweep each baseline's knob and compare at equal or better relevance"})
    cascade_weights: list[float] = field(default_factory=lambda: list(DEFAULT_SWEEPS["cascade"]),
                                         metadata={"help": "cascade weights (.inf ok)"})
    shift_weights: list[float] = field(default_factory=lambda: list(
        DEFAULT_SWEEPS["query_shift"]), metadata={"help": "query shift weights"})
    rephrase_mixes: list[float] = field(default_factory=lambda: list(
        DEFAULT_SWEEPS["rephrase"]), metadata={"help": "share of the rephrased query"})
    teacher_weights: list[float] = field(default_factory=lambda: list(
        DEFAULT_SWEEPS["teacher_rerank"]), metadata={"help": "teacher_rerank weights (.inf ok)"})
    select_split: str = field(default="val", metadata={
        "help": "query split each baseline's setting is chosen on (then reported on "
                "query_split); none there: chosen on query_split, with a warning"})
    equal_relevance_slack: float = field(default=0.01, metadata={
        "help": "a baseline setting within this much (absolute) of the aligned model's "
                "precision and recall counts as equally relevant"})

    def __post_init__(self) -> None:
        if not 0 <= self.equal_relevance_slack < 0.5:
            raise ValueError("equal_relevance_slack must be in [0, 0.5)")
        if any(w < 0 for w in self.cascade_weights + self.shift_weights
               + self.teacher_weights) or \
                any(not 0 <= m <= 1 for m in self.rephrase_mixes):
            raise ValueError("sweep weights must be >= 0 and rephrase_mixes in [0, 1]")


@dataclass
class HpirSettings:
    """HPIR per aspect: row pairs labelled by the oracle and by simulated raters
    (``docs/evaluation.md`` §2)."""

    pool: int = field(default=50, metadata={"help": "rows drawn from the base's top N"})
    row_size: int = field(default=5, metadata={"help": "images per row"})
    pairs_per_query: int = field(default=4, metadata={"help": "row pairs per query and aspect"})
    tie: float = field(default=0.02, metadata={
        "help": "aesthetics pairs whose rows' mean beauty differs by less are dropped as ties"})
    rater_agreement: float = field(default=0.65, metadata={
        "help": "simulated raters: two raters agree on this share of an aspect's pairs"})

    def __post_init__(self) -> None:
        if self.row_size < 1 or self.pairs_per_query < 1 or self.pool < 2 * self.row_size:
            raise ValueError("hpir pool must hold two rows of row_size >= 1")
        if not 0.5 < self.rater_agreement < 1:
            raise ValueError("hpir.rater_agreement must be in (0.5, 1)")


@dataclass
class EvaluateConfig:
    """Aligned retriever vs base, cascade re-ranking, query shift and LLM rephrasing."""

    world: str = field(default="out/world", metadata={
        "help": "built-in world directory (the oracle is read only for it, only to evaluate)"})
    corpus: str = field(default="", metadata={
        "help": "other corpus: Parquet dir with id, image[, caption, split] (wins over world; "
                "no oracle metrics)"})
    queries: str = field(default="", metadata={
        "help": "with corpus: Parquet file/dir with query_id, query[, split, kind]"})
    output: str = field(default="out/evaluate", metadata={"help": "output directory"})
    base_name: str = field(default="base", metadata={"help": "name of the base system"})
    aligned_name: str = field(default="aligned", metadata={
        "help": "which system is 'the aligned model' in comparisons and the verdict"})
    base_checkpoint: str = field(default="out/base/checkpoint", metadata={
        "help": "the base retriever (also the first stage of the baselines)"})
    base_embeddings: str = field(default="", metadata={
        "help": "jobs.embed output of the base over the gallery (reused if ids and checkpoint "
                "match; its 'aesthetic' column gives the scorer's scores)"})
    models: list[str] = field(default_factory=list, metadata={
        "help": "trained systems, name=checkpoint_dir (aligned=..., control=..., scorer_only=...)"})
    embeddings: list[str] = field(default_factory=list, metadata={
        "help": "precomputed gallery embeddings, name=embeddings_dir (else embedded in-process)"})
    baselines: list[str] = field(default_factory=lambda: list(BASELINES), metadata={
        "help": "query-time systems over the base: cascade, query_shift, rephrase, "
                "teacher_rerank"})
    baseline: BaselineSettings = field(default_factory=BaselineSettings, metadata={
        "help": "the query-time systems' knobs"})
    sweep: SweepSettings = field(default_factory=SweepSettings, metadata={
        "help": "knob sweeps and the comparison at equal relevance"})
    rephrased: str = field(default="", metadata={
        "help": "rephrase: dir with queries.parquet (query_id, query, rephrased) or a file; "
                "'' skips the rephrase system"})
    gallery: str = field(default="test", metadata={
        "help": "gallery every system searches: test (the held-out test-split images no "
                "model trained on) | all (the deployment view: the whole corpus)"})
    query_split: str = field(default="test", metadata={"help": "held-out query split"})
    query_kind: str = field(default="content", metadata={"help": "query kind (content queries)"})
    k: int = field(default=10, metadata={"help": "K of aesthetic@K and precision@K (main)"})
    also_ks: list[int] = field(default_factory=lambda: [5], metadata={
        "help": "further K for aesthetic@K"})
    hpir: HpirSettings = field(default_factory=HpirSettings, metadata={
        "help": "HPIR-style agreement"})
    preferences: list[str] = field(default_factory=list, metadata={
        "help": "teacher diagnostics: name=preferences dir or file"})
    recall_tolerance: float = field(default=0.02, metadata={
        "help": "recall@10 drop (fraction) the verdict flags as a regression"})
    grid_queries: int = field(default=4, metadata={"help": "queries shown as image grids"})
    grid_k: int = field(default=5, metadata={"help": "results per system in a grid"})
    grid_systems: list[str] = field(default_factory=list, metadata={
        "help": "systems in the grids ([]: base, aligned, cascade, teacher_rerank, rephrase "
                "where present)"})
    max_recall_queries: int = field(default=0, metadata={
        "help": "corpus without splits: caption queries for recall (0: 2000)"})
    llm_latency_queries: int = field(default=12, metadata={
        "help": "rephrase / teacher_rerank ms/query include the query-time LLM call, timed "
                "over this many single-query calls of the rephraser that wrote the "
                "rephrasings (0: not measured, said in the note)"})
    batch_size: int = field(default=256, metadata={"help": "encoder batch size"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})
    seed: int = field(default=0, metadata={"help": "seed of HPIR rows, grid queries, bootstrap"})

    def __post_init__(self) -> None:
        if not (self.world or self.corpus):
            raise ValueError("set world (built-in world) or corpus")
        if self.corpus and not self.queries:
            raise ValueError("corpus needs queries (a Parquet file/dir with query_id, query)")
        if not self.base_checkpoint:
            raise ValueError("base_checkpoint is required")
        if self.gallery not in ("all", "test"):
            raise ValueError("gallery must be 'all' or 'test'")
        bad = set(self.baselines) - set(BASELINES)
        if bad:
            raise ValueError(f"unknown baselines {sorted(bad)}; known: {list(BASELINES)}")
        if self.llm_latency_queries < 0:
            raise ValueError("llm_latency_queries must be >= 0")
        if self.k < 1 or any(k < 1 for k in self.also_ks):
            raise ValueError("k and also_ks must be >= 1")
        if self.base_name == self.aligned_name:
            raise ValueError("base_name and aligned_name must differ")
        models = self.model_dirs()
        self.preference_dirs()
        emb = self.embedding_dirs()
        taken = {self.base_name, *self.baselines}
        clash = taken & set(models)
        if clash:
            raise ValueError(f"models may not be named {sorted(clash)} (base / baseline names)")
        unknown = set(emb) - set(models) - {self.base_name}
        if unknown:
            raise ValueError(f"embeddings for unknown systems {sorted(unknown)}")

    def model_dirs(self) -> dict[str, str]:
        """``models`` as ``{name: checkpoint dir}``."""
        return parse_named(self.models, "models")

    def embedding_dirs(self) -> dict[str, str]:
        """``embeddings`` as ``{name: embeddings dir}``."""
        return parse_named(self.embeddings, "embeddings")

    def preference_dirs(self) -> dict[str, str]:
        """``preferences`` as ``{name: preferences dir or file}``."""
        return parse_named(self.preferences, "preferences")
