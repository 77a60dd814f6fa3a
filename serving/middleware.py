"""ASGI middleware of the ingress: body-size limit, per-client rate limit, request ids, logs.

* :class:`BodyLimit` answers 413 when a body is larger than the limit, whether it says so in
  ``Content-Length`` or streams past it (chunked uploads are counted as they arrive).
* :class:`RateLimit` is a token bucket per client (``X-Forwarded-For``, else the peer
  address) in each ingress replica: ``rate`` requests per second, bursts up to ``burst``;
  over it, 429 with ``Retry-After``. Health checks and static files are not limited.
* :class:`RequestLog` gives every request an id (``X-Request-ID``, taken from the request when
  given), logs one structured line per request (JSON: id, method, path, status, ms, client),
  and counts requests and their latency in Prometheus (``aligner_requests``,
  ``aligner_request_ms``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger("serving.requests")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
UNLIMITED = ("/v1/health", "/static", "/favicon.ico")


async def _answer(send: Send, status: int, detail: str, headers: dict[str, str] | None = None
                  ) -> None:
    body = json.dumps({"detail": detail}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers") or []:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def client_of(scope: Scope) -> str:
    """The client's address: the first ``X-Forwarded-For`` hop, else the peer."""
    fwd = _header(scope, b"x-forwarded-for")
    if fwd:
        return fwd.split(",")[0].strip()
    peer = scope.get("client")
    return str(peer[0]) if peer else "unknown"


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for bodies over ``max_bytes`` (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _answer(send, 413, f"request body of {declared} bytes is over the "
                                            f"limit of {self.max_bytes}")
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return msg

        async def tracked(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await _answer(send, 413, f"request body is over the limit of {self.max_bytes}"
                                         " bytes")


class RateLimit:
    """Token bucket per client (see the module docstring)."""

    def __init__(self, app: ASGIApp, rate: float, burst: int) -> None:
        self.app, self.rate, self.burst = app, float(rate), float(burst)
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def take(self, client: str, now: float | None = None) -> float:
        """Take one token; returns 0 when allowed, else the seconds until the next token."""
        now = time.monotonic() if now is None else now
        with self.lock:
            tokens, last = self.buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self.buckets[client] = (tokens - 1.0, now)
                return 0.0
            self.buckets[client] = (tokens, now)
            if len(self.buckets) > 100_000:  # forget idle clients
                self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < 60}
            return (1.0 - tokens) / self.rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(UNLIMITED):
            return await self.app(scope, receive, send)
        wait = self.take(client_of(scope))
        if wait > 0:
            return await _answer(send, 429, "too many requests: slow down",
                                 {"retry-after": str(max(1, round(wait)))})
        await self.app(scope, receive, send)


class RequestLog:
    """Request ids, one structured log line per request, Prometheus counts and latency."""

    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        from ray.serve.metrics import Counter, Histogram

        from serving.deployments import STEP_MS_BOUNDARIES

        self.app, self.enabled = app, enabled
        self.count = Counter("aligner_requests", description="HTTP requests by route and status",
                             tag_keys=("route", "status"))
        self.latency = Histogram("aligner_request_ms", description="request latency (ms)",
                                 boundaries=STEP_MS_BOUNDARIES, tag_keys=("route",))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        rid = (_header(scope, b"x-request-id") or state.get("request_id")
               or uuid.uuid4().hex[:16])[:64]
        state["request_id"] = rid
        status = 500
        t0 = time.perf_counter()

        async def stamped(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
                headers = list(msg.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", rid.encode()))
                msg["headers"] = headers
            await send(msg)

        try:
            await self.app(scope, receive, stamped)
        finally:
            ms = 1000 * (time.perf_counter() - t0)
            path = scope.get("path", "")
            route = "/".join(path.split("/")[:3]) or "/"  # /v1/images/<id> -> /v1/images
            self.count.inc(tags={"route": route, "status": str(status)})
            self.latency.observe(ms, tags={"route": route})
            if self.enabled:
                log.info(json.dumps({"request_id": rid, "method": scope.get("method"),
                                     "path": path, "status": status, "ms": round(ms, 2),
                                     "client": client_of(scope)}))
