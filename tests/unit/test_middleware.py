"""Who the client is (``X-Forwarded-For`` only from trusted proxies), the rate limit's share per
ingress replica, and the OpenAPI document generated with the running configuration."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from serving.config import LimitArgs
from serving.middleware import Auth, RateLimit, client_of, networks


def scope(peer: str | None, *xff: str) -> dict:
    return {"type": "http", "path": "/v1/search", "client": (peer, 5555) if peer else None,
            "headers": [(b"x-forwarded-for", h.encode()) for h in xff]}


# ----------------------------------------------------------------------------- client_of

def test_without_trusted_proxies_the_header_is_ignored():
    assert client_of(scope("203.0.113.9", "1.2.3.4")) == "203.0.113.9"
    assert client_of(scope("203.0.113.9", "1.2.3.4"), networks(["10.0.0.0/8"])) == \
        "203.0.113.9", "a peer that is not a trusted proxy cannot name another client"
    assert client_of(scope(None)) == "unknown"


def test_behind_trusted_proxies_the_right_most_untrusted_hop_is_the_client():
    lb = networks(["10.0.0.0/8", "192.168.1.1"])
    # the client wrote "6.6.6.6" itself; the load balancer appended what it saw
    assert client_of(scope("10.0.0.2", "6.6.6.6, 198.51.100.7"), lb) == "198.51.100.7"
    # two trusted proxies in a row: skip both
    assert client_of(scope("10.0.0.2", "6.6.6.6, 198.51.100.7, 192.168.1.1"), lb) == \
        "198.51.100.7"
    # several headers are one list, in order
    assert client_of(scope("10.0.0.2", "6.6.6.6", "198.51.100.7"), lb) == "198.51.100.7"
    # every hop a proxy: the left-most; no header: the peer
    assert client_of(scope("10.0.0.2", "10.0.0.9, 10.0.0.8"), lb) == "10.0.0.9"
    assert client_of(scope("10.0.0.2"), lb) == "10.0.0.2"
    assert client_of(scope("10.0.0.2", " , "), lb) == "10.0.0.2"
    # garbage the client wrote is an untrusted hop like any other, never a proxy
    assert client_of(scope("10.0.0.2", "not-an-ip"), lb) == "not-an-ip"


def test_ipv6_and_mapped_addresses():
    lb = networks(["fd00::/8", "10.0.0.0/8"])
    assert client_of(scope("fd00::1", "2001:db8::5"), lb) == "2001:db8::5"
    assert client_of(scope("::ffff:10.0.0.3", "198.51.100.7"), lb) == "198.51.100.7"
    assert client_of(scope("fd00::1", "198.51.100.7, [fd00::2]"), lb) == "198.51.100.7"


# ----------------------------------------------------------------------------- rate limit

def _status(mw, s: dict) -> int:
    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        sent.append(msg)

    mw.app = app
    asyncio.run(mw(s, receive, send))
    return sent[0]["status"]


def test_a_client_that_changes_x_forwarded_for_is_still_limited():
    rl = RateLimit(None, rate=0.001, burst=3)  # type: ignore[arg-type]
    got = [_status(rl, scope("203.0.113.9", f"10.9.{i}.1")) for i in range(6)]
    assert got == [200, 200, 200, 429, 429, 429]
    assert _status(rl, scope("203.0.113.10")) == 200  # another peer has its own bucket


def test_behind_a_trusted_proxy_each_forwarded_client_has_a_bucket():
    rl = RateLimit(None, rate=0.001, burst=2, trusted=networks(["10.0.0.0/8"]))  # type: ignore[arg-type]
    a = [_status(rl, scope("10.0.0.2", "6.6.6.6, 198.51.100.7")) for _ in range(3)]
    b = [_status(rl, scope("10.0.0.3", f"{i}.{i}.{i}.{i}, 198.51.100.8")) for i in range(3)]
    assert a == b == [200, 200, 429], "what the client writes left of the proxy's hop is moot"


def test_health_and_static_are_not_limited():
    rl = RateLimit(None, rate=0.001, burst=1)  # type: ignore[arg-type]
    s = scope("203.0.113.9") | {"path": "/v1/health"}
    assert [_status(rl, s) for _ in range(3)] == [200, 200, 200]


# ----------------------------------------------------------------------------- settings

def test_each_replica_enforces_its_share_of_the_rate():
    assert LimitArgs().replica_rate() == (100.0, 200.0)
    assert LimitArgs(rate_per_s=100, rate_burst=200, rate_replicas=4).replica_rate() == \
        (25.0, 50.0)
    assert LimitArgs(rate_per_s=1, rate_burst=2, rate_replicas=8).replica_rate() == (0.125, 1.0)
    # N replicas at their share admit no more than the configured rate in all: a client
    # whose requests are spread round-robin over 4 replicas for 10 s (at 1000 per second)
    lim = LimitArgs(rate_per_s=10, rate_burst=20, rate_replicas=4)
    rate, burst = lim.replica_rate()
    replicas = [RateLimit(None, rate, burst) for _ in range(4)]  # type: ignore[arg-type]
    admitted = sum(replicas[i % 4].take("c", now=i / 1000) == 0.0 for i in range(10_000))
    assert admitted <= 10 * 10 + 20
    assert admitted >= 10 * 10, "and not much less while every replica runs"


def test_trusted_proxies_are_checked_and_normalised():
    assert LimitArgs(trusted_proxies=["10.0.0.1/8", " 192.168.1.1", "fd00::/8"]
                     ).trusted_proxies == ["10.0.0.0/8", "192.168.1.1/32", "fd00::/8"]
    with pytest.raises(ValidationError, match="not an address or a CIDR"):
        LimitArgs(trusted_proxies=["lb.internal"])
    with pytest.raises(ValidationError, match="rate_replicas"):
        LimitArgs(rate_replicas=0)
    with pytest.raises(ValidationError, match="max_k"):
        LimitArgs(max_k=10**9)  # over the API's hard bound


# ----------------------------------------------------------------------------- auth

def _req(method: str, path: str, key: str | None = None) -> dict:
    hdrs = [(b"authorization", f"Bearer {key}".encode())] if key else []
    return {"type": "http", "method": method, "path": path, "headers": hdrs,
            "client": ("203.0.113.9", 1)}


def test_auth_answers_401_before_the_app_reads_anything():
    writes = {("post", "/v1/votes"), ("get", "/v1/votes")}
    w = Auth(None, "k", "writes", writes, {"/v1/health"})  # type: ignore[arg-type]
    assert _status(w, _req("POST", "/v1/votes")) == 401
    assert _status(w, _req("POST", "/v1/votes", key="wrong")) == 401
    assert _status(w, _req("POST", "/v1/votes", key="k")) == 200
    assert _status(w, _req("POST", "/v1/search")) == 200  # reads stay open
    assert _status(w, _req("OPTIONS", "/v1/votes")) == 200  # the router's 405 answers it
    a = Auth(None, "k", "all", writes, {"/v1/health"})  # type: ignore[arg-type]
    assert _status(a, _req("POST", "/v1/search")) == 401
    assert _status(a, _req("GET", "/v1/health")) == 200 and _status(a, _req("GET", "/")) == 200
    assert _status(Auth(None, None, "all"), _req("GET", "/v1/indexes")) == 503  # type: ignore[arg-type]
    assert _status(Auth(None, None, "none"), _req("POST", "/v1/votes")) == 200  # type: ignore[arg-type]
