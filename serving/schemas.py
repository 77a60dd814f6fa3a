"""Request and response bodies of the HTTP API (``/v1``), as pydantic models.

They are the OpenAPI document (``/openapi.json``, ``/docs``). Limits that depend on the
deployment's config (query length, ``k``, page size) are checked in the ingress against
:class:`serving.config.LimitArgs`; everything else is checked here, so a wrong type or a value
out of range is a 422 naming the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchRequest(_Strict):
    """One search: text, an image (base64 or URL), a raw embedding, or text and image."""

    text: str | None = Field(None, description="the query text")
    image_b64: str | None = Field(None, description="an image, base64-encoded (JPEG/PNG/...)")
    image_url: str | None = Field(None, description="an http(s) image URL, fetched by the server")
    like: str | None = Field(None, max_length=512,
                             description="an image id of the corpus: more like this image")
    embedding: list[float] | None = Field(None, description="a raw query vector of the model")
    text_weight: float = Field(1.0, ge=0, le=100)
    image_weight: float = Field(1.0, ge=0, le=100)
    k: int = Field(10, ge=1, description="results (ids for all of them)")
    offset: int = Field(0, ge=0, description="first result with metadata (paging)")
    page_size: int | None = Field(None, ge=1, description="results with metadata (default k)")
    model: str | None = Field(None, description="a model name (/v1/indexes); default aligned")
    index: str | None = Field(None, description="an index of that model (default: its first)")
    rephrase: bool = Field(False, description="search with the LLM's aesthetic rephrasing")
    rerank: bool = Field(False, description="re-rank the top N by the aesthetic scorer")
    rerank_weight: float | None = Field(None, ge=0, le=100)
    deduplicate: bool = Field(False, description="drop near-duplicate results")
    dedup_threshold: float = Field(0.96, gt=0, le=1)
    aesthetic_weight: float = Field(0.0, ge=-5, le=5,
                                    description="clip-retrieval's aesthetic query shift")
    nprobe: int | None = Field(None, ge=1, description="IVF lists to visit, this request only "
                               "(up to limits.max_nprobe; default: the model's)")
    k_factor: float | None = Field(None, ge=1, description="a refine index re-scores k_factor x "
                                   "k candidates, this request only (up to limits.max_k_factor)")

    @model_validator(mode="after")
    def _something(self) -> SearchRequest:
        if not any(v is not None and v != "" for v in
                   (self.text, self.image_b64, self.image_url, self.like, self.embedding)):
            raise ValueError("give text, image_b64, image_url, like or embedding")
        if self.text is not None and not self.text.strip():
            raise ValueError("text is empty")
        if sum(v is not None for v in (self.image_b64, self.image_url, self.like)) > 1:
            raise ValueError("give one of image_b64, image_url and like")
        if self.embedding is not None and (self.text or self.image_b64 or self.image_url
                                           or self.like):
            raise ValueError("an embedding is searched alone")
        return self


class Result(BaseModel):
    rank: int
    id: str
    similarity: float = Field(description="cosine with the (possibly shifted) query")
    score: float = Field(description="the ranking score (similarity, or the re-ranker's)")
    aesthetic: float | None = Field(description="the scorer's score of the image")
    caption: str | None
    image_url: str = Field(description="the image, served by this API")


class QueryEcho(BaseModel):
    text: str | None
    searched: str | None = Field(description="the text that was encoded (the rephrasing)")
    rephrase: Literal["off", "ok", "fallback", "timeout", "error"] = "off"
    rephraser: str | None = None


class SearchResponse(BaseModel):
    request_id: str
    model: str
    index: str
    query: QueryEcho
    k: int
    offset: int
    ids: list[str] = Field(description="all k result ids, best first")
    results: list[Result] = Field(description="the page: results offset .. offset + page_size")
    reranked: bool = False
    rerank: Literal["off", "ok", "timeout", "error"] = "off"
    duplicates_removed: int = 0
    timings_ms: dict[str, float]


class MetadataRequest(_Strict):
    ids: list[str] = Field(..., min_length=1)
    model: str | None = None
    index: str | None = None


class MetadataResponse(BaseModel):
    items: list[Result | None] = Field(description="one per id (null: not in the index)")


class CompareRequest(_Strict):
    text: str = Field(..., min_length=1)
    k: int = Field(8, ge=1, le=50)


class Row(BaseModel):
    results: list[Result]


class CompareResponse(BaseModel):
    comparison_id: str
    query: str
    left: Row
    right: Row


class JudgeRequest(_Strict):
    text: str = Field(..., min_length=1)
    left: list[str] = Field(..., min_length=1, max_length=100)
    right: list[str] = Field(..., min_length=1, max_length=100)


class JudgeResponse(BaseModel):
    judge: str = Field(description="which judge; a proxy says so in its name")
    winner: Literal["left", "right", "similar"]
    aspects: dict[str, str]
    orders_agree: bool
    rationale: str


class VoteRequest(_Strict):
    comparison_id: str = Field(..., min_length=1, max_length=64)
    preferred: Literal["left", "right", "tie"]
    confidence: int = Field(3, ge=1, le=5)
    comment: str | None = Field(None, max_length=1000)


class VoteResponse(BaseModel):
    vote_id: int
    comparison_id: str
    recorded: bool = True
    left_model: str = Field(description="revealed once the vote is in")
    right_model: str


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    deployments: dict[str, str]
    votes: dict[str, int]
