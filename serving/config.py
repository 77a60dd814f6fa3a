"""The application's arguments, validated: a typo is an error at start-up, not a silent default.

Ray Serve's own config schema ignores unknown keys inside ``args``; every section here is a
pydantic model that forbids extra fields, so ``serve run serving/config.yaml`` with a misspelt
key fails at ``build_app`` with the field named. The same model documents every argument
(``docs/serving.md``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelArgs(_Strict):
    """One retriever and the indexes built from its embeddings."""

    checkpoint: str | None = Field(None, description="checkpoint dir (jobs.pretrain / align)")
    name: str = Field("builtin", description="open_clip name when there is no checkpoint")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or weights file")
    indexes: dict[str, str] = Field(..., description=(
        "index name -> index dir (local path, or s3://, gs:// URI: loaded from a local cache); "
        "first = default"))
    mmap: bool = Field(False, description="memory-map the index files")
    nprobe: int | None = Field(None, ge=1, description="IVF lists to visit")
    ef_search: int | None = Field(None, ge=1, description="HNSW search breadth")
    k_factor: float | None = Field(None, ge=1, description=(
        "a refine index (RFlat, Refine(...)) re-scores k_factor x k candidates exactly"))
    shard_groups: int = Field(1, ge=1, le=256, description=(
        "1: the retriever replica holds every shard of its indexes; G > 1: each index's S "
        "shards are split into G groups, each served by its own deployment "
        "(shard_<model>_<index>_<g>), and the retriever fans a query out to them and merges "
        "the top k exactly (deduplication, the aesthetic shift and the proxy judge then need "
        "an unsharded index)"))

    @field_validator("indexes")
    @classmethod
    def _some(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("a model needs at least one index")
        return v


class RephraserArgs(_Strict):
    backend: Literal["template", "local", "openai", "vllm"] = "template"
    style: str = Field("detail", description="prompt template (aligner/rephrase/prompts)")
    timeout_s: float = Field(3.0, gt=0, description="past this, search without rephrasing")
    options: dict = Field(default_factory=dict,
                          description="back-end options (base_url, model, api_key_env ...)")


class RerankerArgs(_Strict):
    scorer: str = Field("lowlevel", description="the scores in the index (the embed job's)")
    n: int = Field(50, ge=2, le=10_000, description="candidates re-ranked")
    weight: float = Field(1.0, ge=0, description="final = z(sim) + weight * z(aesthetic)")
    timeout_s: float = Field(2.0, gt=0)
    reward_model: str = Field("", description="a reward checkpoint (jobs.train_reward): text "
                              "queries are re-ranked by its reward instead of the stored score")
    reward_embeddings: str = Field("", description="the corpus embedded by the reward model's "
                                   "backbone (jobs.embed model.checkpoint=<reward_model>)")

    @model_validator(mode="after")
    def _reward_pair(self) -> RerankerArgs:
        if bool(self.reward_model) != bool(self.reward_embeddings):
            raise ValueError("reranker.reward_model and reranker.reward_embeddings go together")
        return self


class JudgeArgs(_Strict):
    """The judge deployment: a proxy (the default, CPU) or an LMM back end
    (:mod:`aligner.judge`); a proxy is named as one in every answer."""

    kind: Literal["proxy", "proxy:reward", "openai", "transformers", "vllm"] = Field(
        "proxy", description="proxy: scorer + similarity under `model`'s retriever; "
                             "proxy:reward: a reward model; openai / transformers / vllm: an LMM")
    model: str = Field("base", description="proxy: whose similarity judges accuracy")
    margin: float = Field(0.02, ge=0, description="proxy: differences below this are 'similar'")
    style: Literal["ranker", "scorer"] = Field("ranker", description="LMM prompt style")
    prompt: str = Field("", description="LMM prompt id or .yaml file ('' = the style's newest)")
    rationale: bool = Field(False, description="LMM: keep a short reason")
    compose: Literal["row", "images"] = Field("row", description="LMM: one grid image per row")
    thumb: int = Field(224, ge=16, le=2048, description="LMM: pixels per image shown")
    options: dict = Field(default_factory=dict, description=(
        "back-end options: openai {base_url, model, api_key_env, timeout_s ...}; "
        "transformers {model_path, device ...}; vllm {model, engine_kwargs}; "
        "proxy:reward {path, loader, margin}"))
    timeout_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _needs(self) -> JudgeArgs:
        need = {"openai": ("base_url", "model"), "transformers": ("model_path",),
                "vllm": ("model",), "proxy:reward": ("path",)}.get(self.kind, ())
        missing = [k for k in need if not self.options.get(k)]
        if missing:
            raise ValueError(f"judge.kind={self.kind} needs judge.options {missing}")
        return self


class VotesArgs(_Strict):
    """Where the votes go (docs/votes.md): SQLite under ``data_dir`` on one machine, a
    PostgreSQL URL on a cluster, best read from the environment (a Kubernetes Secret)."""

    database_url: str = Field("", description=(
        "SQLAlchemy URL (sqlite:////abs/votes.db, postgresql+psycopg://user:pw@host/votes); "
        "'' = sqlite under data_dir"))
    database_url_env: str = Field("", description=(
        "name of an environment variable holding the URL (e.g. VOTES_DATABASE_URL from a "
        "Secret): when named it wins over database_url, and a replica without it fails to start"))

    @field_validator("database_url_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if v and not (v.isascii() and v.isidentifier()):
            raise ValueError(f"database_url_env must name an environment variable, got {v!r}")
        return v

    def url(self) -> str:
        """The URL given (the environment variable's when one is named); '' = none.

        Raises:
            ValueError: ``database_url_env`` names a variable that is unset or empty.
        """
        if self.database_url_env:
            url = os.environ.get(self.database_url_env, "").strip()
            if not url:
                raise ValueError(f"votes.database_url_env names ${self.database_url_env}, which "
                                 "is unset or empty in this process (its Secret missing?)")
            return url
        return self.database_url


class AuthArgs(_Strict):
    api_key: str | None = Field(None, description="the bearer token (prefer api_key_env)")
    api_key_env: str = Field("ALIGNER_API_KEY", description="env var holding the token")
    protect: Literal["none", "writes", "all"] = Field(
        "writes", description="writes: votes, exports, admin; all: every /v1 route")

    def key(self) -> str | None:
        """The token: ``api_key`` or the environment variable (None: no token set)."""
        return self.api_key or os.environ.get(self.api_key_env) or None


# The API's hard bounds (serving.schemas: over one is a 422, whatever the config); the
# configured limits below cannot exceed them (over a configured limit is a 400).
HARD_MAX_QUERY_CHARS = 100_000
HARD_MAX_K = 1_000_000
HARD_MAX_IDS = 100_000
HARD_MAX_NPROBE = 1_000_000
HARD_MAX_K_FACTOR = 10_000.0


class LimitArgs(_Strict):
    """Request limits, the per-client rate limit and ``image_url`` fetching.

    **Request limits.** ``max_query_chars``, ``max_k``, ``max_page_size``,
    ``max_metadata_ids``, ``max_nprobe`` and ``max_k_factor`` are the maximums of their fields
    in the OpenAPI document (``/openapi.json`` is generated with the configured values); a
    request over one is a 400.

    **Rate limit.** A token bucket per client, ``rate_per_s`` with bursts of ``rate_burst``,
    over it 429 with ``Retry-After`` (health checks and static files are not limited). The
    buckets live in each ingress replica, and Serve spreads a client's requests over the
    replicas, so the configured rate is for the whole application and each replica enforces
    its share: ``rate_per_s / rate_replicas`` and ``rate_burst / rate_replicas`` (at least 1).
    Set ``rate_replicas`` to the ingress's ``num_replicas``, or its autoscaling
    ``max_replicas`` (serving/config.yaml, ``deployments``): a client then never gets more than
    the configured rate in all; while fewer replicas run it gets less (``running /
    rate_replicas`` of it). Nothing is shared between replicas (no extra call per request).

    **Who the client is.** The TCP peer, unless the peer is in ``trusted_proxies`` (CIDRs of
    your load balancers or reverse proxies): then the right-most ``X-Forwarded-For`` hop that
    is not a trusted proxy (the address the outermost trusted proxy saw). A client cannot
    choose its own bucket by sending ``X-Forwarded-For``. Serve's HTTP proxy (uvicorn) itself
    already takes the client from ``X-Forwarded-For`` when the connection comes from
    127.0.0.1 (uvicorn's ``FORWARDED_ALLOW_IPS``), i.e. a reverse proxy on the same machine.

    **image_url** (``serving.fetch``): http(s) only; at every redirect (at most
    ``image_url_max_redirects``) the host is resolved once, every address must be public
    unless ``allow_private_image_urls``, and the connection goes to the checked address;
    ``image_url_max_bytes`` and ``image_url_timeout_s`` (all hops together) bound it.
    """

    max_query_chars: int = Field(500, ge=1, le=HARD_MAX_QUERY_CHARS)
    max_k: int = Field(10_000, ge=1, le=HARD_MAX_K)
    max_page_size: int = Field(200, ge=1, le=HARD_MAX_K)
    max_body_bytes: int = Field(8 << 20, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_metadata_ids: int = Field(1000, ge=1, le=HARD_MAX_IDS)
    max_nprobe: int = Field(1024, ge=1, le=HARD_MAX_NPROBE,
                            description="largest nprobe a request may ask for")
    max_k_factor: float = Field(64.0, ge=1, le=HARD_MAX_K_FACTOR,
                                description="largest k_factor a request may ask for")
    rate_per_s: float = Field(100.0, gt=0, description=(
        "requests per second per client, for the whole application (see rate_replicas)"))
    rate_burst: int = Field(200, ge=1)
    rate_replicas: int = Field(1, ge=1, le=10_000, description=(
        "each ingress replica enforces rate_per_s / rate_replicas (and the burst likewise): "
        "set it to the ingress's num_replicas or max_replicas"))
    trusted_proxies: list[str] = Field(default_factory=list, description=(
        "CIDRs of proxies whose X-Forwarded-For is believed (default none: the peer address)"))
    request_timeout_s: float = Field(20.0, gt=0)
    image_url_timeout_s: float = Field(5.0, gt=0)
    image_url_max_bytes: int = Field(8 << 20, ge=1)
    image_url_max_redirects: int = Field(3, ge=0, le=20, description=(
        "redirects image_url may follow, each one checked like the first URL"))
    allow_private_image_urls: bool = Field(
        False, description="let image_url reach loopback / private addresses (tests, LANs)")

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        import ipaddress

        out = []
        for cidr in v:
            try:
                out.append(str(ipaddress.ip_network(cidr.strip(), strict=False)))
            except ValueError:
                raise ValueError(f"trusted_proxies: {cidr!r} is not an address or a CIDR "
                                 "network") from None
        return out

    def replica_rate(self) -> tuple[float, float]:
        """(tokens per second, burst) of one ingress replica's buckets (see the class)."""
        n = self.rate_replicas
        return self.rate_per_s / n, max(1.0, self.rate_burst / n)


class SpeedArgs(_Strict):
    """The search path's speed knobs (``bench/bench_serve.py`` measures each; docs/serving.md
    gives the numbers)."""

    text_cache: int = Field(4096, ge=0, le=10_000_000, description=(
        "query texts whose vectors each retriever replica keeps (an LRU; 0 = off)"))
    batch_wait_ms: float = Field(0.0, ge=0, le=1000, description=(
        "how long a retriever waits for more text queries to batch with (0: batch only what "
        "queued while the previous batch ran)"))
    retriever_cpus: float = Field(0.25, gt=0, le=256, description="Ray CPUs per retriever replica")
    torch_threads: int = Field(1, ge=1, le=256, description=(
        "torch and faiss threads in a retriever replica"))
    local_text_search: bool = Field(False, description=(
        "plain text searches run in the ingress replica (its own copy of each unsharded "
        "model and index): one Serve hop per search instead of two (measured: a few ms at "
        "one connection, less throughput under load on 2 cores; docs/serving.md)"))


class AppArgs(_Strict):
    """Everything ``build_app`` takes (``args:`` of an application in serving/config.yaml)."""

    corpus: str = Field(..., description="the corpus the indexes were built from (images)")
    models: dict[str, ModelArgs] = Field(..., description="model name -> model and indexes")
    default_model: str = "aligned"
    compare: tuple[str, str] = Field(("base", "aligned"),
                                     description="the two models a comparison shows")
    data_dir: str = Field("out/serving", description="votes database, exports")
    rephraser: RephraserArgs = Field(default_factory=RephraserArgs)
    reranker: RerankerArgs = Field(default_factory=RerankerArgs)
    judge: JudgeArgs = Field(default_factory=JudgeArgs)
    votes: VotesArgs = Field(default_factory=VotesArgs)
    auth: AuthArgs = Field(default_factory=AuthArgs)
    limits: LimitArgs = Field(default_factory=LimitArgs)
    log_requests: bool = True
    image_cache: int = Field(2048, ge=0, description="corpus images kept in memory")
    speed: SpeedArgs = Field(default_factory=SpeedArgs)

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        if not self.models:
            raise ValueError("models: at least one model is needed")
        for name in (self.default_model, *self.compare, self.judge.model):
            if name not in self.models:
                raise ValueError(f"model {name!r} is named but not in models "
                                 f"{sorted(self.models)}")
        if self.compare[0] == self.compare[1]:
            raise ValueError("compare needs two different models")
        return self

    def database_url(self) -> str:
        """The votes database URL (SQLite in ``data_dir`` unless set; see :class:`VotesArgs`).

        Raises:
            ValueError: ``votes.database_url_env`` names an unset variable.
        """
        return self.votes.url() or f"sqlite:///{Path(self.data_dir).resolve() / 'votes.db'}"

    def resolved(self) -> AppArgs:
        """A copy with local relative paths made absolute (against this process's working
        directory: replicas do not share it)."""
        def fix(p: str) -> str:
            return p if "://" in p or Path(p).is_absolute() else str(Path(p).resolve())

        data = self.model_dump()
        data["corpus"], data["data_dir"] = fix(self.corpus), fix(self.data_dir)
        for m in data["models"].values():
            if m["checkpoint"]:
                m["checkpoint"] = fix(m["checkpoint"])
            m["indexes"] = {k: fix(v) for k, v in m["indexes"].items()}
        for key in ("reward_model", "reward_embeddings"):
            if data["reranker"][key]:
                data["reranker"][key] = fix(data["reranker"][key])
        return AppArgs(**data)

    def check_paths(self) -> None:
        """Fail at start-up, naming the path, when a checkpoint or an index is missing.

        Raises:
            FileNotFoundError: a missing checkpoint or index directory (an index in object
                storage: no manifest at its URI, or no bucket).
        """
        from aligner.data.io import file_exists, join_path

        for name, m in self.models.items():
            if m.checkpoint and not Path(m.checkpoint).is_dir():
                raise FileNotFoundError(f"models.{name}.checkpoint {m.checkpoint} does not exist")
            for iname, path in m.indexes.items():  # a local path or an s3:// / gs:// URI
                if not file_exists(join_path(path, "manifest.json")):
                    raise FileNotFoundError(f"models.{name}.indexes.{iname}: {path} is not a "
                                            "finished index (no manifest.json)")
        if "://" not in self.corpus and not Path(self.corpus).exists():
            raise FileNotFoundError(f"corpus {self.corpus} does not exist")
        for key in ("reward_model", "reward_embeddings"):
            path = getattr(self.reranker, key)
            if path and not Path(path).is_dir():
                raise FileNotFoundError(f"reranker.{key} {path} does not exist")
