"""Request and response bodies of the HTTP API (``/v1``), as pydantic models.

They are the OpenAPI document (``/openapi.json``, ``/docs``). Every number has hard bounds
here, so a wrong type or a value out of range is a 422 naming the field. Limits that depend on
the deployment's config (query length, ``k``, page size, ids per request, ``nprobe``,
``k_factor``) and the names of the models and indexes are checked in the ingress (a 400)
and written into the OpenAPI document by :func:`configured_openapi` (maximums and enums of
the running configuration). :data:`RESPONSES` documents every error status a route answers,
all with the :class:`Error` body.
"""

from __future__ import annotations

import copy
import re
from typing import Annotated, Any, Literal

from annotated_types import Ge, Le
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from serving.config import (
    HARD_MAX_IDS,
    HARD_MAX_K,
    HARD_MAX_K_FACTOR,
    HARD_MAX_NPROBE,
)

# an image id of the corpus as documented: relative path components, none empty or starting
# with a dot (so no "..", no absolute path, no "://"), no backslash or NUL; the ingress refuses
# every unsafe id with a 400 (aligner.data.corpus.is_safe_relative_path)
ID_PATTERN = r"^[^/\\\x00.][^/\\\x00]*(/[^/\\\x00.][^/\\\x00]*)*$"
ID_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 512, "pattern": ID_PATTERN}
# a query text holds a character that is not white space; the space characters are spelt
# out (Python's str.strip and JSON Schema's \s disagree on a few), so the document and the
# check mean the same
VISIBLE = (r"[^\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f"
           r"\u3000\ufeff]")


def visible(text: str) -> bool:
    """Whether ``text`` has a character that is not white space (:data:`VISIBLE`)."""
    return re.search(VISIBLE, text) is not None


def _json_number(v: Any) -> Any:
    """JSON numbers only (pydantic's lax mode would take true / false and "12" too)."""
    if isinstance(v, (bool, str)):
        raise ValueError("a JSON number is needed")
    return v


# what a request body's numbers and flags are: JSON's own types, as the document says (an
# integer may be written 3.0, as JSON Schema allows); no NaN or infinity
_NUMBER = BeforeValidator(_json_number)  # last in an Annotated with bounds (Ge, Le)
Int = Annotated[int, _NUMBER]
Float = Annotated[float, BeforeValidator(_json_number)]
Bool = StrictBool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SearchRequest(_Strict):
    """One search: text, an image (base64 or URL), a raw embedding, or text and image."""

    text: str | None = Field(None, json_schema_extra={"pattern": VISIBLE}, description=(
        "the query text (not only spaces; up to limits.max_query_chars)"))
    image_b64: str | None = Field(None, description="an image, base64-encoded (JPEG/PNG/...)")
    image_url: str | None = Field(None, description="an http(s) image URL, fetched by the server")
    like: str | None = Field(None, max_length=512,
                             description="an image id of the corpus: more like this image")
    embedding: list[Annotated[float, Ge(-1e6), Le(1e6), _NUMBER]] | None = Field(
        None, max_length=65_536, description="a raw query vector of the model")
    text_weight: Float = Field(1.0, ge=0, le=100)
    image_weight: Float = Field(1.0, ge=0, le=100)
    k: Int = Field(10, ge=1, le=HARD_MAX_K, description="results (ids for all of them; up to "
                   "limits.max_k)")
    offset: Int = Field(0, ge=0, le=HARD_MAX_K, description="first result with metadata (paging)")
    page_size: Annotated[int, Ge(1), Le(HARD_MAX_K), _NUMBER] | None = Field(
        None, description="results with metadata (default k; up to limits.max_page_size)")
    model: str | None = Field(None, description="a model name (/v1/indexes); default aligned")
    index: str | None = Field(None, description="an index of that model (default: its first)")
    rephrase: Bool = Field(False, description="search with the LLM's aesthetic rephrasing")
    rerank: Bool = Field(False, description="re-rank the top N by the aesthetic scorer")
    rerank_weight: Annotated[float, Ge(0), Le(100), _NUMBER] | None = None
    deduplicate: Bool = Field(False, description="drop near-duplicate results")
    dedup_threshold: Float = Field(0.96, gt=0, le=1)
    aesthetic_weight: Float = Field(0.0, ge=-5, le=5,
                                    description="clip-retrieval's aesthetic query shift")
    nprobe: Annotated[int, Ge(1), Le(HARD_MAX_NPROBE), _NUMBER] | None = Field(
        None, description="IVF lists to visit, this request only (up to limits.max_nprobe; "
        "default: the model's)")
    k_factor: Annotated[float, Ge(1), Le(HARD_MAX_K_FACTOR), _NUMBER] | None = Field(
        None, description="a refine index re-scores k_factor x k candidates, this request "
        "only (up to limits.max_k_factor)")

    @model_validator(mode="after")
    def _something(self) -> SearchRequest:
        if not any(v is not None and v != "" for v in
                   (self.text, self.image_b64, self.image_url, self.like, self.embedding)):
            raise ValueError("give text, image_b64, image_url, like or embedding")
        if self.text is not None and not visible(self.text):
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
    similarity: float | None = Field(description="cosine with the (possibly shifted) query "
                                     "(null from /v1/metadata: there is no query)")
    score: float | None = Field(description="the ranking score (similarity, or the "
                                "re-ranker's; null from /v1/metadata)")
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
    ids: list[str] = Field(..., min_length=1, max_length=HARD_MAX_IDS,
                           description="up to limits.max_metadata_ids")
    model: str | None = None
    index: str | None = None


class MetadataResponse(BaseModel):
    items: list[Result | None] = Field(description="one per id (null: not in the index)")


class CompareRequest(_Strict):
    text: str = Field(..., min_length=1, json_schema_extra={"pattern": VISIBLE},
                      description="the query (not only spaces; up to limits.max_query_chars)")
    k: Int = Field(8, ge=1, le=50)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not visible(v):
            raise ValueError("text is empty")
        return v


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
    confidence: Int = Field(3, ge=1, le=5)
    comment: str | None = Field(None, max_length=1000)
    idempotency_key: str | None = Field(None, min_length=1, max_length=64, json_schema_extra={
        "pattern": "^[\x21-\x7e]+$"}, description=(
        "a uuid4 per vote: a retry with the same key returns the first answer instead of "
        "voting twice (or send the Idempotency-Key header)"))


class VoteResponse(BaseModel):
    vote_id: int
    comparison_id: str
    recorded: bool = True
    idempotency_key: str | None = Field(None, description="the vote's key (the request's, "
                                        "or one the server drew)")
    replayed: bool = Field(False, description="the key had already recorded this vote")
    left_model: str = Field(description="revealed once the vote is in")
    right_model: str


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    deployments: dict[str, str]
    votes: dict[str, int]


# ----------------------------------------------------------------------------- errors

class Error(BaseModel):
    """Every error answer: ``detail`` says why (for a 422 from validation, the fields at
    fault, as FastAPI lists them)."""

    detail: str | list[dict[str, Any]]


def _error(why: str, **extra: Any) -> dict[str, Any]:
    return {"description": why, "model": Error, **extra}


_RETRY = {"Retry-After": {"description": "seconds to wait before trying again",
                          "required": True, "schema": {"type": "integer", "minimum": 1}}}
# status -> how it is documented; every route lists the ones it can answer (see ERRORS_OF)
RESPONSES: dict[int, dict[str, Any]] = {
    400: _error("a configured limit is exceeded (limits.*), an unknown model or index, an "
                "image that cannot be decoded or is too large, an image_url that is refused "
                "or unreachable, an image id that leaves the corpus, a body that cannot be "
                "parsed"),
    401: _error("no API key or a wrong one (auth.protect); send Authorization: Bearer <key>",
                headers={"WWW-Authenticate": {"description": "Bearer", "required": True,
                                              "schema": {"type": "string"}}}),
    404: _error("an unknown image or comparison"),
    413: _error("the request body is over limits.max_body_bytes (declared or streamed)"),
    422: _error("a field has the wrong type or is out of range (the field is named)"),
    429: _error("over the client's rate limit (limits.rate_per_s, per client)",
                headers=_RETRY),
    502: _error("the judge's back end failed (the reason is given)"),
    503: {"description": "overloaded: the ingress's queue is full (Serve's "
                         "max_queued_requests; plain text) or the votes database is unavailable",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}},
                      "text/plain": {"schema": {"type": "string"}}}},
    504: _error("a deployment took longer than limits.request_timeout_s (or the judge's "
                "timeout_s)"),
}
_EVERY = (413, 429, 503)  # the middleware (body limit, rate limit) and Serve's backpressure


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route: the statuses it answers itself, plus 413, 429 and 503."""
    return {s: copy.deepcopy(RESPONSES[s]) for s in sorted({*statuses, *_EVERY})}


# ----------------------------------------------------------------------------- the document

def _branches(prop: dict[str, Any]) -> list[dict[str, Any]]:
    """The non-null alternatives of a property's schema (``x | None`` is an anyOf)."""
    if "anyOf" in prop:
        return [b for b in prop["anyOf"] if b.get("type") != "null"]
    return [prop]


def _set(props: dict[str, Any], name: str, **kw: Any) -> None:
    if name in props:
        for b in _branches(props[name]):
            b.update(kw)


def _names(props: dict[str, Any], obj: dict[str, Any], models: dict[str, list[str]],
           default: str) -> None:
    """``model`` and ``index`` become enums of the configured names; when the models' index
    names differ, an ``anyOf`` ties each model to its own indexes."""
    _set(props, "model", enum=sorted(models))
    union = sorted({i for v in models.values() for i in v})
    _set(props, "index", enum=union)
    if "index" not in props or all(sorted(v) == union for v in models.values()):
        return
    ways = []
    for m, idx in sorted(models.items()):
        index = {"anyOf": [{"type": "string", "enum": sorted(idx)}, {"type": "null"}]}
        if m == default:
            ways.append({"properties": {"model": {"enum": [m, None]}, "index": index}})
        else:
            ways.append({"required": ["model"],
                         "properties": {"model": {"const": m}, "index": index}})
    obj["anyOf"] = ways


def configured_openapi(spec: dict[str, Any], args: Any, writes: set[tuple[str, str]],
                       public: set[str]) -> dict[str, Any]:
    """The OpenAPI document of the running configuration (``args``: ``AppArgs``; None: the
    code's defaults and every route documented as protected).

    * the configured limits become the fields' maximums; ``model`` and ``index`` enums of the
      configured names; image ids get :data:`ID_PATTERN`;
    * a bearer security scheme, required (with its 401) on the routes ``auth.protect``
      covers: ``writes`` (``(method, path)`` pairs) under ``writes``, every path but
      ``public`` under ``all``.
    """
    spec = copy.deepcopy(spec)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    if args is not None:
        lim = args.limits
        models = {m: list(a.indexes) for m, a in args.models.items()}
        for name, obj in schemas.items():
            props = obj.get("properties", {})
            if name in ("SearchRequest", "MetadataRequest") or name.startswith("Body_search"):
                _names(props, obj, models, args.default_model)
            if name == "SearchRequest" or name.startswith("Body_search"):
                _set(props, "k", maximum=lim.max_k)
                _set(props, "page_size", maximum=lim.max_page_size)
                _set(props, "nprobe", maximum=lim.max_nprobe)
                _set(props, "k_factor", maximum=lim.max_k_factor)
            if name in ("SearchRequest", "CompareRequest") or name.startswith("Body_search"):
                _set(props, "text", maxLength=lim.max_query_chars)
            if name == "MetadataRequest":
                _set(props, "ids", maxItems=lim.max_metadata_ids)
    for name, field in (("SearchRequest", "like"), ("JudgeRequest", "left"),
                        ("JudgeRequest", "right")):
        props = schemas.get(name, {}).get("properties", {})
        for b in _branches(props.get(field, {})):
            if b.get("type") == "array":
                b["items"] = dict(ID_SCHEMA)
            elif b.get("type") == "string":
                b.update(ID_SCHEMA)
    protect = "all" if args is None else args.auth.protect
    if protect != "none":
        spec["components"].setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer",
            "description": f"the API key (auth.protect={protect})"}
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            for p in op.get("parameters", []):
                if p.get("in") == "path" and p.get("name") == "image_id":
                    p["schema"] = {**p.get("schema", {}), **ID_SCHEMA}
            covered = (protect == "all" and path not in public) or \
                (protect == "writes" and (method, path) in writes)
            if covered:
                op["security"] = [{"bearer": []}]
                op.setdefault("responses", {})["401"] = _doc(401)
    return spec


def _doc(status: int) -> dict[str, Any]:
    """A response of :data:`RESPONSES` as it is in the document (the model as a $ref)."""
    d = {k: v for k, v in copy.deepcopy(RESPONSES[status]).items() if k != "model"}
    d["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return d
