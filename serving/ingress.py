"""The HTTP API (FastAPI, versioned under ``/v1``) and the web page, as one Serve deployment.

Routes (the OpenAPI document is ``/openapi.json``; ``/docs`` renders it):

=============================  ==========================================================
``GET  /v1/health``            deployments and the votes database (never protected)
``GET  /v1/indexes``           models, their indexes, sizes, factories
``POST /v1/search``            text, ``image_b64``, ``image_url``, ``like`` (a corpus image
                               id: more like this), an ``embedding``, or text + image with
                               weights; ``k`` with paging; ``model``,
                               ``index``, ``rephrase``, ``rerank``, ``deduplicate``,
                               ``aesthetic_weight``
``POST /v1/search/image``      the same with an uploaded image (multipart form)
``POST /v1/metadata``          id, caption, aesthetic of given ids
``GET  /v1/images/{id}``       a corpus image, its content type, caching headers
``POST /v1/compare``           base and aligned rows for a query, left/right randomised and
                               recorded (the models are revealed once a vote is in)
``POST /v1/judge``             an order-consistent judge of two rows (a proxy, named)
``POST /v1/votes``             which row a person preferred (+ confidence, comment)
``GET  /v1/votes``             recent votes and counts (protected)
``GET  /v1/votes/export``      the votes as a preferences table, Parquet (protected)
``GET  /``                     the page: search, compare, vote
=============================  ==========================================================

Bad input is a 4xx with a message, never a 5xx: pydantic checks types and ranges (422),
the configured limits give 400 / 413 / 429, an unknown model or index 400, an unknown image
404, an image that cannot be decoded or is too large (a decompression bomb) 400, an
unreachable or refused ``image_url`` 400 (:mod:`serving.fetch`: no private addresses, every
redirect checked). A slow rephraser or re-ranker degrades the answer (results without it,
flagged in ``query.rephrase`` / ``rerank``) instead of failing it; a slow search is a 504
after ``limits.request_timeout_s``.

The OpenAPI document lists every status of every route (one error body, ``{"detail": ...}``)
and is generated with the running configuration (:func:`serving.schemas.configured_openapi`):
the configured limits as maximums, the models and indexes as enums, the routes
``auth.protect`` covers with the bearer scheme. The middleware answers 401 for those routes
before anything reads the request, 413 for a body over the limit and 429 over the rate.
"""


import asyncio
import base64
import binascii
import collections
import hashlib
import logging
import math
import secrets
import time
import urllib.parse
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from serving.config import HARD_MAX_K, AppArgs
from serving.fetch import FetchError, FetchPolicy, fetch
from serving.middleware import Auth, BodyLimit, RateLimit, RequestLog, networks
from serving.schemas import (
    VISIBLE,
    CompareRequest,
    CompareResponse,
    Health,
    JudgeRequest,
    JudgeResponse,
    MetadataRequest,
    MetadataResponse,
    QueryEcho,
    Result,
    Row,
    SearchRequest,
    SearchResponse,
    VoteRequest,
    VoteResponse,
    configured_openapi,
    errors,
)

log = logging.getLogger("serving")
STATIC = Path(__file__).resolve().parent / "static"
_MIME = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif",
         b"RIFF": "image/webp", b"BM": "image/bmp", b"II*\x00": "image/tiff",
         b"MM\x00*": "image/tiff"}


class _Settings:
    """What the module-level middleware reads (set by the ingress replica at start-up)."""

    max_body_bytes = 8 << 20
    rate_per_s = 100.0
    rate_burst = 200.0
    log_requests = True
    trusted_proxies: tuple[Any, ...] = ()
    args: AppArgs | None = None  # the OpenAPI document is generated with it
    key: str | None = None
    protect = "writes"


SETTINGS = _Settings()


class _Deferred:
    """Middleware whose parameters come from :data:`SETTINGS` at the first request."""

    def __init__(self, app: Any, make: Any) -> None:
        self.app, self.make, self.inner = app, make, None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.inner is None:
            self.inner = self.make(self.app)
        await self.inner(scope, receive, send)


app = FastAPI(title="aesthetic-aligner", version="1.0",
              description="Search, compare and vote: an aesthetically aligned image retriever.")
# the routes auth.protect=writes covers, and the one it never does (Auth, ingress._auth)
WRITES = {("post", "/v1/votes"), ("get", "/v1/votes"), ("get", "/v1/votes/export")}
PUBLIC = {"/v1/health"}
app.add_middleware(_Deferred, make=lambda a: BodyLimit(a, SETTINGS.max_body_bytes))
app.add_middleware(_Deferred, make=lambda a: Auth(a, SETTINGS.key, SETTINGS.protect, WRITES,
                                                  PUBLIC))
app.add_middleware(_Deferred, make=lambda a: RateLimit(a, SETTINGS.rate_per_s,
                                                       SETTINGS.rate_burst,
                                                       SETTINGS.trusted_proxies))
app.add_middleware(_Deferred, make=lambda a: RequestLog(a, SETTINGS.log_requests,
                                                        SETTINGS.trusted_proxies))
PARQUET = "application/vnd.apache.parquet"


def openapi_of(api: FastAPI, args: AppArgs | None) -> dict[str, Any]:
    """The OpenAPI document of ``api`` under ``args`` (``serving.schemas``), made once."""
    if api.openapi_schema is None:
        spec = get_openapi(title=api.title, version=api.version, description=api.description,
                           routes=api.routes)
        api.openapi_schema = configured_openapi(spec, args, WRITES, PUBLIC)
    return api.openapi_schema


# a lambda, like the middleware's: Serve pickles it with the app and SETTINGS (one copy of
# each in the replica, the one Ingress.__init__ configures)
app.openapi = lambda: openapi_of(app, SETTINGS.args)  # type: ignore[method-assign]


def routes_of(routes: Any) -> Any:
    """Every route, those of included routers (Serve's class-based view) too."""
    for r in routes:
        inner = getattr(getattr(r, "original_router", None), "routes", None)
        if inner is not None:
            yield from routes_of(inner)
        else:
            yield r


def _finite(v: Any) -> Any:
    """JSON without NaN or infinity (a rejected input may hold them: they become strings)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, whose echo of a NaN input would otherwise fail to encode (a 500)."""
    return JSONResponse(status_code=422,
                        content={"detail": _finite(jsonable_encoder(exc.errors()))})


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's answer, with a 405's ``Allow`` listing the methods of every route of the
    path (Starlette names only those of the first route that matched it)."""
    if exc.status_code == 405:
        allowed = sorted({m for r in routes_of(request.app.routes) if getattr(r, "methods", None)
                          and r.matches(request.scope)[0] != Match.NONE for m in r.methods})
        if allowed:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
    return await http_exception_handler(request, exc)


if STATIC.is_dir():
    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def mime_of(data: bytes) -> str:
    """The content type of encoded image bytes (from their magic number)."""
    for magic, mime in _MIME.items():
        if data.startswith(magic):
            return mime
    return "application/octet-stream"


def _check_id(image_id: str) -> str:
    from aligner.data.corpus import is_safe_relative_path

    if not image_id or len(image_id) > 512 or not is_safe_relative_path(image_id):
        raise HTTPException(400, f"{image_id[:80]!r} is not an image id of this corpus")
    return image_id


def _image_url(image_id: str) -> str:
    return "/v1/images/" + urllib.parse.quote(image_id, safe="/")


async def _await(resp: Any) -> Any:
    return await resp


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128,
                  max_queued_requests=256)
@serve.ingress(app)
class Ingress:
    """The API and the page over the model deployments (see the module docstring)."""

    def __init__(self, args: dict[str, Any], retrievers: dict[str, Any], reranker: Any,
                 rephraser: Any, judge: Any) -> None:
        from serving.votes import VoteStore

        self.args = AppArgs(**args)
        lim = self.args.limits
        SETTINGS.max_body_bytes, SETTINGS.log_requests = lim.max_body_bytes, self.args.log_requests
        SETTINGS.rate_per_s, SETTINGS.rate_burst = lim.replica_rate()  # this replica's share
        SETTINGS.trusted_proxies = networks(lim.trusted_proxies)
        SETTINGS.args, app.openapi_schema = self.args, None
        self.retrievers, self.reranker = retrievers, reranker
        self.rephraser, self.judge = rephraser, judge
        self.key = self.args.auth.key()
        SETTINGS.key, SETTINGS.protect = self.key, self.args.auth.protect
        self.store = VoteStore(self.args.database_url())
        self.images: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        # plain text searches in this replica: one Serve hop (speed.local_text_search)
        self.local: dict[str, Any] = {}
        if self.args.speed.local_text_search:
            from serving.retriever_core import RetrieverCore

            speed = self.args.speed.model_dump()
            self.local = {name: RetrieverCore(name, m.model_dump(), lim.max_image_pixels,
                                              None, speed)
                          for name, m in self.args.models.items() if m.shard_groups <= 1}

    def check_health(self) -> None:
        self.store.counts()  # the database answers

    # ------------------------------------------------------------------------------ helpers

    def _auth(self, request: Request, write: bool) -> None:
        protect = self.args.auth.protect
        if protect == "none" or (protect == "writes" and not write):
            return
        if not self.key:
            raise HTTPException(503, "this route needs an API key and none is configured "
                                     f"(set {self.args.auth.api_key_env})")
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), self.key):
            raise HTTPException(401, "a valid API key is needed: Authorization: Bearer <key>",
                                headers={"WWW-Authenticate": "Bearer"})

    async def _call(self, resp: Any, what: str, timeout: float | None = None) -> Any:
        """Await a deployment call with a timeout; an error value becomes an HTTP error."""
        try:
            out = await asyncio.wait_for(_await(resp),
                                         timeout or self.args.limits.request_timeout_s)
        except TimeoutError:
            if hasattr(resp, "cancel"):  # a deployment call (a local coroutine is cancelled)
                resp.cancel()
            raise HTTPException(504, f"{what} timed out") from None
        if isinstance(out, dict) and "error" in out:
            raise HTTPException(out["error"]["status"], out["error"]["detail"])
        return out

    def _check_names(self, model: str | None, index: str | None) -> None:
        """400 for a model or an index that is not configured (None: the default one)."""
        name = self.args.default_model if model is None else model
        if name not in self.args.models:
            raise HTTPException(400, f"unknown model {name!r}; models: "
                                     f"{sorted(self.args.models)}")
        if index is not None and index not in self.args.models[name].indexes:
            raise HTTPException(400, f"unknown index {index!r} of model {name!r}; indexes: "
                                     f"{sorted(self.args.models[name].indexes)}")

    def _retriever(self, model: str | None) -> tuple[str, Any]:
        name = model or self.args.default_model
        if name not in self.retrievers:
            raise HTTPException(400, f"unknown model {name!r}; models: "
                                     f"{sorted(self.retrievers)}")
        return name, self.retrievers[name]

    async def _fetch_url(self, url: str) -> bytes:
        """The bytes at ``image_url`` (:mod:`serving.fetch`: http(s) only, every redirect
        checked, no private address unless allowed, the checked address connected to)."""
        lim = self.args.limits
        policy = FetchPolicy(max_bytes=lim.image_url_max_bytes, timeout_s=lim.image_url_timeout_s,
                             max_redirects=lim.image_url_max_redirects,
                             allow_private=lim.allow_private_image_urls)
        try:
            return await asyncio.wait_for(asyncio.to_thread(fetch, url, policy),
                                          lim.image_url_timeout_s + 1)
        except FetchError as e:
            raise HTTPException(400, f"cannot fetch image_url: {e}") from None
        except TimeoutError:
            raise HTTPException(400, "cannot fetch image_url: timed out") from None

    async def _corpus_image(self, image_id: str) -> bytes:
        """The encoded bytes of a corpus image (404 if there is none; an LRU cache)."""
        _check_id(image_id)
        data = self.images.get(image_id)
        if data is not None:
            self.images.move_to_end(image_id)
            return data
        from aligner.data.corpus import fetch_images

        got = await asyncio.to_thread(fetch_images, self.args.corpus, [image_id])
        data = got.get(image_id)
        if data is None:
            raise HTTPException(404, f"no image {image_id!r} in the corpus")
        if self.args.image_cache:
            self.images[image_id] = data
            while len(self.images) > self.args.image_cache:
                self.images.popitem(last=False)
        return data

    def _limits(self, req: SearchRequest) -> int:
        lim = self.args.limits
        if req.text and len(req.text) > lim.max_query_chars:
            raise HTTPException(400, f"text is {len(req.text)} characters; the limit is "
                                     f"{lim.max_query_chars}")
        if req.k > lim.max_k:
            raise HTTPException(400, f"k={req.k} is over the limit of {lim.max_k}")
        if req.nprobe is not None and req.nprobe > lim.max_nprobe:
            raise HTTPException(400, f"nprobe={req.nprobe} is over the limit of {lim.max_nprobe}")
        if req.k_factor is not None and req.k_factor > lim.max_k_factor:
            raise HTTPException(400, f"k_factor={req.k_factor:g} is over the limit of "
                                     f"{lim.max_k_factor:g}")
        page = req.page_size or min(req.k, lim.max_page_size)
        if page > lim.max_page_size:
            raise HTTPException(400, f"page_size={page} is over the limit of "
                                     f"{lim.max_page_size}")
        return page

    # ------------------------------------------------------------------------------ search

    def query_cache_stats(self) -> dict[str, Any]:
        """The query caches of this replica's local models (``speed.local_text_search``)."""
        return {name: core.cache.stats() for name, core in self.local.items()}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _local_text(self, items: list[tuple[str, str, dict[str, Any]]]) -> list[Any]:
        """Plain text searches in this replica (``speed.local_text_search``), batched as the
        retriever batches them: (model, text, search arguments) -> its result or error."""

        def run() -> list[Any]:
            out: list[Any] = [None] * len(items)
            by_model: dict[str, list[int]] = {}
            for i, (name, _, _) in enumerate(items):
                by_model.setdefault(name, []).append(i)
            for name, rows in by_model.items():
                got = self.local[name].text_queries([items[i][1:] for i in rows])
                for i, r in zip(rows, got, strict=True):
                    out[i] = r
            return out

        return await asyncio.to_thread(run)

    async def _search(self, req: SearchRequest, image: bytes | None, request: Request
                      ) -> SearchResponse:
        self._auth(request, write=False)
        page = self._limits(req)
        name, retr = self._retriever(req.model)
        timings: dict[str, float] = {}
        echo = QueryEcho(text=req.text, searched=req.text)
        if req.image_b64 is not None:
            try:
                image = base64.b64decode(req.image_b64, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPException(400, "image_b64 is not valid base64") from None
        elif req.image_url is not None:
            image = await self._fetch_url(req.image_url)
        elif req.like is not None:
            image = await self._corpus_image(req.like)
        t0 = time.perf_counter()
        if req.text and req.rephrase:
            try:
                r = await self._call(self.rephraser.rephrase.remote(req.text), "rephrase",
                                     self.args.rephraser.timeout_s)
                echo.searched, echo.rephraser = r["text"], r["rephraser"]
                echo.rephrase = "fallback" if r["fallback"] else "ok"
            except HTTPException as e:
                echo.rephrase = "timeout" if e.status_code == 504 else "error"
            timings["rephrase"] = 1000 * (time.perf_counter() - t0)
        rerank_n = self.args.reranker.n if req.rerank else 0
        window = None if req.rerank else (req.offset, page)
        kw = {"k": max(req.k, rerank_n), "index": req.index,
              "aesthetic_weight": req.aesthetic_weight,
              "dedup_threshold": req.dedup_threshold if req.deduplicate else None,
              "page": window, "nprobe": req.nprobe, "k_factor": req.k_factor}
        if (name in self.local and req.text and image is None and req.embedding is None
                and req.text_weight > 0):
            res = await self._call(self._local_text((name, echo.searched, kw)), "search")
        else:
            res = await self._call(retr.query.remote(
                text=echo.searched if req.text else None, image=image, embedding=req.embedding,
                text_weight=req.text_weight, image_weight=req.image_weight, **kw), "search")
        timings.update(res["timings_ms"])
        ids, scores, aes = res["ids"], res["scores"], res["aesthetic"]
        sims = list(scores)
        status = "off"
        if req.rerank:
            t2 = time.perf_counter()
            try:
                rr = await self._call(self.reranker.rerank.remote(
                    scores, aes, req.rerank_weight, text=req.text, ids=ids), "rerank",
                    self.args.reranker.timeout_s)
                order = rr["order"]
                ids = [ids[i] for i in order]
                sims = [sims[i] for i in order]
                aes = [aes[i] for i in order]
                scores = rr["scores"]
                status = "ok"
            except HTTPException as e:
                status = "timeout" if e.status_code == 504 else "error"
            timings["rerank"] = 1000 * (time.perf_counter() - t2)
            ids, sims, aes, scores = ids[:req.k], sims[:req.k], aes[:req.k], scores[:req.k]
        lo, hi = req.offset, req.offset + page
        if "rows" in res:
            rows = res["rows"]
        else:
            rows = await self._call(retr.metadata.remote(ids[lo:hi], res["index"]), "metadata")
        results = [Result(rank=lo + i + 1, id=ids[lo + i], similarity=sims[lo + i],
                          score=scores[lo + i], aesthetic=aes[lo + i],
                          caption=(row or {}).get("caption"), image_url=_image_url(ids[lo + i]))
                   for i, row in enumerate(rows[:max(0, len(ids[lo:hi]))])]
        return SearchResponse(request_id=request.scope.get("state", {}).get("request_id", ""),
                              model=name, index=res["index"], query=echo, k=len(ids),
                              offset=req.offset, ids=ids, results=results,
                              reranked=status == "ok", rerank=status,
                              duplicates_removed=res["removed"],
                              timings_ms={k2: round(v, 3) for k2, v in timings.items()})

    @app.post("/v1/search", response_model=SearchResponse,
              responses=errors(400, 404, 422, 504))
    async def search(self, req: SearchRequest, request: Request) -> SearchResponse:
        """Search by text, an image (base64 or URL), a raw embedding, or text + image."""
        self._auth(request, write=False)
        self._check_names(req.model, req.index)
        return await self._search(req, None, request)

    @app.post("/v1/search/image", response_model=SearchResponse,
              responses=errors(400, 422, 504))
    async def search_image(self, request: Request, file: UploadFile = File(...),  # noqa: B008
                           text: str | None = Form(None, pattern="^$|" + VISIBLE),  # noqa: B008
                           k: int = Form(10, ge=1, le=HARD_MAX_K),  # noqa: B008
                           model: str | None = Form(None),  # noqa: B008
                           index: str | None = Form(None),  # noqa: B008
                           text_weight: float = Form(1.0, ge=0, le=100),  # noqa: B008
                           image_weight: float = Form(1.0, ge=0, le=100),  # noqa: B008
                           rerank: bool = Form(False)) -> SearchResponse:  # noqa: B008
        """Search with an uploaded image file (and optionally text)."""
        self._auth(request, write=False)
        self._check_names(model, index)
        data = await file.read()
        if not data:
            raise HTTPException(400, "the uploaded file is empty")
        try:
            req = SearchRequest(text=text or None, embedding=None, k=k, model=model,
                                index=index, text_weight=text_weight,
                                image_weight=image_weight, rerank=rerank,
                                image_b64=base64.b64encode(data).decode())
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return await self._search(req, None, request)

    # ------------------------------------------------------------------------------ lookups

    @app.get("/v1/health", response_model=Health, responses=errors())
    async def health(self) -> Health:
        """Each deployment answers (or says why not) and the votes database counts."""
        names = {f"retriever_{n}": r for n, r in self.retrievers.items()} | {
            "reranker": self.reranker, "rephraser": self.rephraser, "judge": self.judge}
        states: dict[str, str] = {}
        for n, h in names.items():
            try:
                await self._call(h.describe.remote(), n, 5.0)
                states[n] = "ok"
            except Exception as e:  # noqa: BLE001 - reported, not raised
                states[n] = f"unavailable: {getattr(e, 'detail', e)}"
        counts = await asyncio.to_thread(self.store.counts)
        ok = all(v == "ok" for v in states.values())
        return Health(status="ok" if ok else "degraded", deployments=states,
                      votes={k: counts[k] for k in ("comparisons", "votes")})

    @app.get("/v1/indexes", responses=errors(504))
    async def indexes(self, request: Request) -> dict[str, Any]:
        """The models, their indexes and the other deployments."""
        self._auth(request, write=False)
        models = {n: await self._call(r.describe.remote(), "describe")
                  for n, r in self.retrievers.items()}
        return {"default_model": self.args.default_model, "compare": list(self.args.compare),
                "models": models,
                "reranker": await self._call(self.reranker.describe.remote(), "describe"),
                "rephraser": await self._call(self.rephraser.describe.remote(), "describe"),
                "judge": await self._call(self.judge.describe.remote(), "describe")}

    @app.post("/v1/metadata", response_model=MetadataResponse,
              responses=errors(400, 422, 504))
    async def metadata(self, req: MetadataRequest, request: Request) -> MetadataResponse:
        """Caption and aesthetic score of given ids (for results past the first page)."""
        self._auth(request, write=False)
        if len(req.ids) > self.args.limits.max_metadata_ids:
            raise HTTPException(400, f"{len(req.ids)} ids; the limit is "
                                     f"{self.args.limits.max_metadata_ids}")
        self._check_names(req.model, req.index)
        _, retr = self._retriever(req.model)
        rows = await self._call(retr.metadata.remote(req.ids, req.index), "metadata")
        return MetadataResponse(items=[
            None if r is None else Result(rank=i + 1, id=r["id"], similarity=float("nan"),
                                          score=float("nan"), aesthetic=r.get("aesthetic"),
                                          caption=r.get("caption"), image_url=_image_url(r["id"]))
            for i, r in enumerate(rows)])

    @app.get("/v1/images/{image_id:path}", response_class=Response, responses={
        200: {"description": "the image (its type from its bytes)",
              "content": {m: {"schema": {"type": "string", "format": "binary"}}
                          for m in sorted({*_MIME.values(), "application/octet-stream"})}},
        304: {"description": "not modified (If-None-Match was the ETag)"},
        **errors(400, 404, 422)})
    async def image(self, image_id: str, request: Request) -> Response:
        """A corpus image by id, with its content type and caching headers."""
        self._auth(request, write=False)
        data = await self._corpus_image(image_id)
        etag = '"' + hashlib.sha1(data).hexdigest()[:20] + '"'
        headers = {"Cache-Control": "public, max-age=86400, immutable", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=mime_of(data), headers=headers)

    # ------------------------------------------------------------------------------ compare

    @app.post("/v1/compare", response_model=CompareResponse,
              responses=errors(400, 422, 504))
    async def compare(self, req: CompareRequest, request: Request) -> CompareResponse:
        """Two rows for one query (base and aligned), left/right randomised and recorded."""
        self._auth(request, write=False)
        if len(req.text) > self.args.limits.max_query_chars:
            raise HTTPException(400, f"text is over {self.args.limits.max_query_chars} chars")
        models = list(self.args.compare)
        rows = await asyncio.gather(*[self._search(SearchRequest(text=req.text, k=req.k,
                                                                 model=m), None, request)
                                      for m in models])
        if secrets.randbelow(2):
            models, rows = models[::-1], rows[::-1]
        rec = await asyncio.to_thread(
            self.store.add_comparison, req.text, rows[0].index, req.k, models[0], models[1],
            rows[0].ids, rows[1].ids, client=hashlib.sha1(
                str(request.client).encode()).hexdigest()[:12])
        return CompareResponse(comparison_id=rec["id"], query=req.text,
                               left=Row(results=rows[0].results),
                               right=Row(results=rows[1].results))

    @app.post("/v1/judge", response_model=JudgeResponse,
              responses=errors(400, 422, 502, 504))
    async def judge_rows(self, req: JudgeRequest, request: Request) -> JudgeResponse:
        """Which of two rows is better for the query (order-consistent; the judge is named)."""
        self._auth(request, write=False)
        for i in (*req.left, *req.right):
            _check_id(i)
        out = await self._call(self.judge.compare.remote(req.text, req.left, req.right),
                               "judge", self.args.judge.timeout_s)
        return JudgeResponse(**out)

    # ------------------------------------------------------------------------------ votes

    @app.post("/v1/votes", response_model=VoteResponse, responses=errors(400, 404, 422))
    async def vote(self, req: VoteRequest, request: Request) -> VoteResponse:
        """Record which row a person preferred; the rows' models are revealed in the answer."""
        self._auth(request, write=True)
        # a retry with the same key (header or body) is answered, not counted, again
        key = request.headers.get("idempotency-key") or req.idempotency_key
        if req.idempotency_key and key != req.idempotency_key:
            raise HTTPException(422, "the Idempotency-Key header and idempotency_key differ")
        try:
            v, replayed = await asyncio.to_thread(
                self.store.record_vote, req.comparison_id, req.preferred, req.confidence,
                req.comment, hashlib.sha1(str(request.client).encode()).hexdigest()[:12],
                key or secrets.token_hex(16))
        except KeyError:
            raise HTTPException(404, f"no comparison {req.comparison_id!r}") from None
        except ValueError as e:  # IdempotencyKeyReused too (a key is for one vote)
            raise HTTPException(422, str(e)) from None
        except Exception as e:  # still down after the store's retries: the client retries
            if not self.store.is_transient(e):
                raise
            raise HTTPException(503, "the votes database is unavailable; retry with the same "
                                     "Idempotency-Key", headers={"Retry-After": "1"}) from None
        return VoteResponse(vote_id=v["id"], comparison_id=req.comparison_id,
                            idempotency_key=v["idempotency_key"], replayed=replayed,
                            left_model=v["left_model"], right_model=v["right_model"])

    @app.get("/v1/votes", responses=errors(422))
    async def votes(self, request: Request,
                    limit: int = Query(100, ge=1, le=1000),  # noqa: B008
                    offset: int = Query(0, ge=0, le=1_000_000_000)  # noqa: B008
                    ) -> dict[str, Any]:
        """Recent votes (newest first) and counts by model."""
        self._auth(request, write=True)
        rows = await asyncio.to_thread(self.store.votes, limit, offset)
        return {"counts": await asyncio.to_thread(self.store.counts), "votes": rows}

    @app.get("/v1/votes/export", response_class=Response, responses={
        200: {"description": "the preferences table, one Parquet file", "content": {
            PARQUET: {"schema": {"type": "string", "format": "binary"}}},
            "headers": {n: {"description": d, "required": True, "schema": {"type": "integer"}}
                        for n, d in (("X-Pairs", "preference pairs in the table"),
                                     ("X-Votes", "votes they came from"))}},
        **errors(422)})
    async def export(self, request: Request,
                     min_confidence: int = Query(1, ge=1, le=5)  # noqa: B008
                     ) -> FileResponse:
        """The votes as a preferences table (Parquet; source ``human``) that
        ``jobs.build_preferences extra_tables=`` and ``jobs.align`` read."""
        from serving.votes import export_preferences

        self._auth(request, write=True)
        out = Path(self.args.data_dir) / "exports" / time.strftime("%Y%m%dT%H%M%S")
        counts = await asyncio.to_thread(export_preferences, self.store, out,
                                         min_confidence)
        return FileResponse(out / "preferences.parquet", media_type=PARQUET,
                            filename="preferences.parquet",
                            headers={"X-Pairs": str(counts.get("pairs", 0)),
                                     "X-Votes": str(counts.get("votes", 0))})

    # ------------------------------------------------------------------------------ page

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse,
                   include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The search, compare and vote page."""
        index = STATIC / "index.html"
        if not index.is_file():
            return HTMLResponse("<h1>aesthetic-aligner</h1><p>See <a href='/docs'>/docs</a>.",
                                status_code=200)
        return HTMLResponse(index.read_text(encoding="utf-8"))
