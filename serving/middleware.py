"""ASGI middleware of the ingress: body-size limit, per-client rate limit, request ids, logs.

* :class:`BodyLimit` answers 413 when a body is larger than the limit, whether it says so in
  ``Content-Length`` or streams past it (chunked uploads are counted as they arrive).
* :class:`RateLimit` is a token bucket per client (:func:`client_of`: the peer address, or
  the ``X-Forwarded-For`` client behind a trusted proxy) in each ingress replica: ``rate``
  requests per second, bursts up to ``burst`` (the ingress gives each replica its share of the
  application's rate, ``serving.config.LimitArgs``); over it, 429 with ``Retry-After``.
  Health checks and static files are not limited.
* :class:`Auth` answers 401 (``WWW-Authenticate: Bearer``) before anything else reads the
  request when a route that ``auth.protect`` covers comes without the bearer token, so an
  unauthenticated request learns nothing from validation errors (the ingress's routes check
  the token again).
* :class:`RequestLog` gives every request an id (``X-Request-ID``, taken from the request when
  given), logs one structured line per request (JSON: id, method, path, status, ms, client),
  and counts requests and their latency in Prometheus (``aligner_requests``,
  ``aligner_request_ms``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any

log = logging.getLogger("serving.requests")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
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


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """CIDR strings (or single addresses) as networks."""
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs)


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in trusted)


def client_of(scope: Scope, trusted: Sequence[Network] = ()) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy, the right-most
    ``X-Forwarded-For`` hop that is not a trusted proxy (every hop trusted: the left-most).

    A hop is appended by each proxy on the way, so only the hops added by trusted proxies
    can be believed; whatever the client wrote itself is further left and is never used
    while a proxy's hop is to its right. Without trusted proxies the header is ignored.
    """
    peer = scope.get("client")
    addr = str(peer[0]) if peer else "unknown"
    if not trusted or not _trusted(addr, trusted):
        return addr
    hops = [h.strip() for k, v in scope.get("headers") or []
            if k.lower() == b"x-forwarded-for" for h in v.decode("latin-1").split(",")]
    hops = [h for h in hops if h]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop
    return hops[0] if hops else addr


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

    def __init__(self, app: ASGIApp, rate: float, burst: float,
                 trusted: Sequence[Network] = ()) -> None:
        self.app, self.rate, self.burst = app, float(rate), float(burst)
        self.trusted = tuple(trusted)
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
        wait = self.take(client_of(scope, self.trusted))
        if wait > 0:
            return await _answer(send, 429, "too many requests: slow down",
                                 {"retry-after": str(max(1, round(wait)))})
        await self.app(scope, receive, send)


class Auth:
    """The bearer token on the routes ``protect`` covers (see the module docstring):
    ``"all"``: every path under ``/v1/`` but ``public``; ``"writes"``: the ``(method, path)``
    pairs of ``writes`` (lower-case method); ``"none"``: nothing."""

    def __init__(self, app: ASGIApp, key: str | None, protect: str,
                 writes: Iterable[tuple[str, str]] = (), public: Iterable[str] = ()) -> None:
        self.app, self.key, self.protect = app, key, protect
        self.writes, self.public = set(writes), set(public)

    def covers(self, method: str, path: str) -> bool:
        if self.protect == "all":
            return path.startswith("/v1/") and path not in self.public
        return self.protect == "writes" and (method.lower(), path) in self.writes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.covers(scope.get("method", ""),
                                                        scope.get("path", "")):
            return await self.app(scope, receive, send)
        if not self.key:
            return await _answer(send, 503, "this route needs an API key and none is "
                                            "configured")
        scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.strip().encode(), self.key.encode()):
            return await _answer(send, 401, "a valid API key is needed: Authorization: "
                                            "Bearer <key>", {"www-authenticate": "Bearer"})
        await self.app(scope, receive, send)


class RequestLog:
    """Request ids, one structured log line per request, Prometheus counts and latency."""

    def __init__(self, app: ASGIApp, enabled: bool = True,
                 trusted: Sequence[Network] = ()) -> None:
        from ray.serve.metrics import Counter, Histogram

        from serving.retriever_core import STEP_MS_BOUNDARIES

        self.app, self.enabled, self.trusted = app, enabled, tuple(trusted)
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
                                     "client": client_of(scope, self.trusted)}))
