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
    database_url: str = Field("", description="SQLAlchemy URL; '' = sqlite under data_dir")


class AuthArgs(_Strict):
    api_key: str | None = Field(None, description="the bearer token (prefer api_key_env)")
    api_key_env: str = Field("ALIGNER_API_KEY", description="env var holding the token")
    protect: Literal["none", "writes", "all"] = Field(
        "writes", description="writes: votes, exports, admin; all: every /v1 route")

    def key(self) -> str | None:
        """The token: ``api_key`` or the environment variable (None: no token set)."""
        return self.api_key or os.environ.get(self.api_key_env) or None


class LimitArgs(_Strict):
    max_query_chars: int = Field(500, ge=1)
    max_k: int = Field(10_000, ge=1)
    max_page_size: int = Field(200, ge=1)
    max_body_bytes: int = Field(8 << 20, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_metadata_ids: int = Field(1000, ge=1)
    max_nprobe: int = Field(1024, ge=1, description="largest nprobe a request may ask for")
    max_k_factor: float = Field(64.0, ge=1, description="largest k_factor a request may ask for")
    rate_per_s: float = Field(100.0, gt=0, description="requests per second per client")
    rate_burst: int = Field(200, ge=1)
    request_timeout_s: float = Field(20.0, gt=0)
    image_url_timeout_s: float = Field(5.0, gt=0)
    image_url_max_bytes: int = Field(8 << 20, ge=1)
    allow_private_image_urls: bool = Field(
        False, description="let image_url reach loopback / private addresses (tests, LANs)")


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
        """The votes database URL (SQLite in ``data_dir`` unless set)."""
        return self.votes.database_url or \
            f"sqlite:///{Path(self.data_dir).resolve() / 'votes.db'}"

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
