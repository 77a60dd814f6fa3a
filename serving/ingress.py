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
unreachable ``image_url`` 400. A slow rephraser or re-ranker degrades the answer (results
without it, flagged in ``query.rephrase`` / ``rerank``) instead of failing it; a slow search
is a 504 after ``limits.request_timeout_s``.
"""


import asyncio
import base64
import binascii
import collections
import hashlib
import ipaddress
import logging
import secrets
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve

from serving.config import AppArgs
from serving.middleware import BodyLimit, RateLimit, RequestLog
from serving.schemas import (
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
    rate_burst = 200
    log_requests = True


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
app.add_middleware(_Deferred, make=lambda a: BodyLimit(a, SETTINGS.max_body_bytes))
app.add_middleware(_Deferred, make=lambda a: RateLimit(a, SETTINGS.rate_per_s,
                                                       SETTINGS.rate_burst))
app.add_middleware(_Deferred, make=lambda a: RequestLog(a, SETTINGS.log_requests))
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


def _public_address(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved:
            return False
    return True


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
        SETTINGS.max_body_bytes, SETTINGS.rate_per_s = lim.max_body_bytes, lim.rate_per_s
        SETTINGS.rate_burst, SETTINGS.log_requests = lim.rate_burst, self.args.log_requests
        self.retrievers, self.reranker = retrievers, reranker
        self.rephraser, self.judge = rephraser, judge
        self.key = self.args.auth.key()
        self.store = VoteStore(self.args.database_url())
        self.images: collections.OrderedDict[str, bytes] = collections.OrderedDict()

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
            resp.cancel()
            raise HTTPException(504, f"{what} timed out") from None
        if isinstance(out, dict) and "error" in out:
            raise HTTPException(out["error"]["status"], out["error"]["detail"])
        return out

    def _retriever(self, model: str | None) -> tuple[str, Any]:
        name = model or self.args.default_model
        if name not in self.retrievers:
            raise HTTPException(400, f"unknown model {name!r}; models: "
                                     f"{sorted(self.retrievers)}")
        return name, self.retrievers[name]

    async def _fetch_url(self, url: str) -> bytes:
        lim = self.args.limits
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HTTPException(400, "image_url must be an http(s) URL")
        if not lim.allow_private_image_urls and not await asyncio.to_thread(
                _public_address, parts.hostname):
            raise HTTPException(400, f"image_url host {parts.hostname} is not a public "
                                     "address (limits.allow_private_image_urls)")

        def get() -> bytes:
            req = urllib.request.Request(url, headers={"User-Agent": "aesthetic-aligner/1"})
            with urllib.request.urlopen(req, timeout=lim.image_url_timeout_s) as r:
                data = r.read(lim.image_url_max_bytes + 1)
            if len(data) > lim.image_url_max_bytes:
                raise ValueError(f"over {lim.image_url_max_bytes} bytes")
            return data

        try:
            return await asyncio.wait_for(asyncio.to_thread(get), lim.image_url_timeout_s + 1)
        except (OSError, ValueError, TimeoutError) as e:
            raise HTTPException(400, f"cannot fetch image_url: {type(e).__name__}: {e}") from None

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
        res = await self._call(retr.query.remote(
            text=echo.searched if req.text else None, image=image, embedding=req.embedding,
            text_weight=req.text_weight, image_weight=req.image_weight,
            k=max(req.k, rerank_n), index=req.index, aesthetic_weight=req.aesthetic_weight,
            dedup_threshold=req.dedup_threshold if req.deduplicate else None, page=window,
            nprobe=req.nprobe, k_factor=req.k_factor),
            "search")
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

    @app.post("/v1/search", response_model=SearchResponse)
    async def search(self, req: SearchRequest, request: Request) -> SearchResponse:
        """Search by text, an image (base64 or URL), a raw embedding, or text + image."""
        return await self._search(req, None, request)

    @app.post("/v1/search/image", response_model=SearchResponse)
    async def search_image(self, request: Request, file: UploadFile = File(...),  # noqa: B008
                           text: str | None = Form(None), k: int = Form(10),  # noqa: B008
                           model: str | None = Form(None),  # noqa: B008
                           index: str | None = Form(None),  # noqa: B008
                           text_weight: float = Form(1.0),  # noqa: B008
                           image_weight: float = Form(1.0),  # noqa: B008
                           rerank: bool = Form(False)) -> SearchResponse:  # noqa: B008
        """Search with an uploaded image file (and optionally text)."""
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

    @app.get("/v1/health", response_model=Health)
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

    @app.get("/v1/indexes")
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

    @app.post("/v1/metadata", response_model=MetadataResponse)
    async def metadata(self, req: MetadataRequest, request: Request) -> MetadataResponse:
        """Caption and aesthetic score of given ids (for results past the first page)."""
        self._auth(request, write=False)
        if len(req.ids) > self.args.limits.max_metadata_ids:
            raise HTTPException(400, f"{len(req.ids)} ids; the limit is "
                                     f"{self.args.limits.max_metadata_ids}")
        _, retr = self._retriever(req.model)
        rows = await self._call(retr.metadata.remote(req.ids, req.index), "metadata")
        return MetadataResponse(items=[
            None if r is None else Result(rank=i + 1, id=r["id"], similarity=float("nan"),
                                          score=float("nan"), aesthetic=r.get("aesthetic"),
                                          caption=r.get("caption"), image_url=_image_url(r["id"]))
            for i, r in enumerate(rows)])

    @app.get("/v1/images/{image_id:path}")
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

    @app.post("/v1/compare", response_model=CompareResponse)
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

    @app.post("/v1/judge", response_model=JudgeResponse)
    async def judge_rows(self, req: JudgeRequest, request: Request) -> JudgeResponse:
        """Which of two rows is better for the query (order-consistent; the judge is named)."""
        self._auth(request, write=False)
        for i in (*req.left, *req.right):
            _check_id(i)
        out = await self._call(self.judge.compare.remote(req.text, req.left, req.right),
                               "judge", self.args.judge.timeout_s)
        return JudgeResponse(**out)

    # ------------------------------------------------------------------------------ votes

    @app.post("/v1/votes", response_model=VoteResponse)
    async def vote(self, req: VoteRequest, request: Request) -> VoteResponse:
        """Record which row a person preferred; the rows' models are revealed in the answer."""
        self._auth(request, write=True)
        try:
            v = await asyncio.to_thread(self.store.add_vote, req.comparison_id, req.preferred,
                                        req.confidence, req.comment,
                                        rater=hashlib.sha1(str(request.client).encode()
                                                           ).hexdigest()[:12])
        except KeyError:
            raise HTTPException(404, f"no comparison {req.comparison_id!r}") from None
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return VoteResponse(vote_id=v["id"], comparison_id=req.comparison_id,
                            left_model=v["left_model"], right_model=v["right_model"])

    @app.get("/v1/votes")
    async def votes(self, request: Request, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """Recent votes (newest first) and counts by model."""
        self._auth(request, write=True)
        limit = max(1, min(limit, 1000))
        rows = await asyncio.to_thread(self.store.votes, limit, max(0, offset))
        return {"counts": await asyncio.to_thread(self.store.counts), "votes": rows}

    @app.get("/v1/votes/export")
    async def export(self, request: Request, min_confidence: int = 1) -> FileResponse:
        """The votes as a preferences table (Parquet; source ``human``) that
        ``jobs.build_preferences extra_tables=`` and ``jobs.align`` read."""
        from serving.votes import export_preferences

        self._auth(request, write=True)
        out = Path(self.args.data_dir) / "exports" / time.strftime("%Y%m%dT%H%M%S")
        counts = await asyncio.to_thread(export_preferences, self.store, out,
                                         max(1, min(5, min_confidence)))
        return FileResponse(out / "preferences.parquet", media_type="application/octet-stream",
                            filename="preferences.parquet",
                            headers={"X-Pairs": str(counts.get("pairs", 0)),
                                     "X-Votes": str(counts.get("votes", 0))})

    # ------------------------------------------------------------------------------ page

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The search, compare and vote page."""
        index = STATIC / "index.html"
        if not index.is_file():
            return HTMLResponse("<h1>aesthetic-aligner</h1><p>See <a href='/docs'>/docs</a>.",
                                status_code=200)
        return HTMLResponse(index.read_text(encoding="utf-8"))
