"""Fetch a client's ``image_url`` without letting it reach private networks (SSRF).

:func:`fetch` follows redirects itself, and at every hop:

* the scheme must be ``http`` or ``https`` (no ``file:``, ``ftp:``, ``gopher:`` ...);
* the host is resolved **once** and every address it resolves to must be allowed
  (:func:`is_public` unless the policy says otherwise): a name with one private address
  among public ones is refused;
* the connection goes to the address that was checked (it is never resolved again, so a
  name that answers a public address to the check and a private one to the connection, DNS
  rebinding, cannot get through); the request carries the original ``Host`` header, and for
  ``https`` the TLS handshake sends the host name (SNI) and verifies the certificate against it.

The number of redirects, the body size and the time are bounded. Every failure is a
:class:`FetchError` with a message meant for the client (the ingress answers it as a 400).
No Ray or FastAPI here: the standard library only (``http.client``, ``socket``, ``ssl``).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
Connector = Callable[[tuple[str, int], float], socket.socket]
REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchError(Exception):
    """An image URL that was refused or could not be fetched (the message says why)."""


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (an IP literal is itself), in resolver order."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _embedded(ip: Address) -> list[Address]:
    """IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo, NAT64)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    out: list[Address] = []
    if ip.ipv4_mapped:
        out.append(ip.ipv4_mapped)
    if ip.sixtofour:
        out.append(ip.sixtofour)
    if ip.teredo:
        out.extend(ip.teredo)
    if ip in _NAT64:
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def is_public(ip: Address) -> bool:
    """A globally routable unicast address (not loopback, private, link-local such as the
    cloud metadata address 169.254.169.254, shared, reserved or multicast), including the
    IPv4 address inside an IPv6 one."""
    if not ip.is_global or ip.is_multicast:
        return False
    return all(is_public(inner) for inner in _embedded(ip))


def _everything(ip: Address) -> bool:
    return True


def _connect(address: tuple[str, int], timeout: float) -> socket.socket:
    return socket.create_connection(address, timeout)


@dataclass
class FetchPolicy:
    """What :func:`fetch` allows.

    ``allowed`` decides which addresses may be connected to (default :func:`is_public`;
    ``allow_private=True`` allows every address); ``resolver`` maps a host name and port to
    its addresses (default :func:`resolve`, the system resolver); ``connect`` opens the TCP
    connection (default :func:`socket.create_connection`); ``ssl_context`` verifies https
    (default: the system's trust store, host names checked). Tests inject the last four.
    """

    max_bytes: int = 8 << 20
    timeout_s: float = 5.0
    max_redirects: int = 3
    allow_private: bool = False
    allowed: Callable[[Address], bool] = is_public
    resolver: Resolver = resolve
    connect: Connector = _connect
    ssl_context: ssl.SSLContext | None = None
    user_agent: str = "aesthetic-aligner/1"
    headers: dict[str, str] = field(default_factory=dict)

    def permits(self, ip: Address) -> bool:
        return True if self.allow_private else self.allowed(ip)


class _Pinned(http.client.HTTPConnection):
    """An HTTP(S) connection to ``host`` that connects to one given address (TLS: the SNI and
    the certificate check use ``host``)."""

    def __init__(self, host: str, port: int, address: str, timeout: float,
                 policy: FetchPolicy, tls: bool) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address, self.policy, self.tls = address, policy, tls
        self.default_port = 443 if tls else 80  # the Host header omits the default port
        self.pinned: socket.socket | None = None  # outlives conn.sock (the response reads it)

    def connect(self) -> None:
        sock = self.policy.connect((self.address, self.port), self.timeout)
        if self.tls:
            ctx = self.policy.ssl_context or ssl.create_default_context()
            try:
                sock = ctx.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        self.sock = self.pinned = sock


@dataclass
class _Target:
    url: str
    scheme: str
    host: str
    port: int
    path: str


def _target(url: str) -> _Target:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise FetchError(f"not a valid URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError(f"only http and https URLs are fetched, not {scheme or 'no scheme'!r}")
    if not parts.hostname:
        raise FetchError("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise FetchError("URLs with credentials are not fetched")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if any(c in path for c in "\r\n ") or any(ord(c) < 0x21 or ord(c) > 0x7E for c in path):
        path = urllib.parse.quote(path, safe="/?&=%:@!$'()*+,;~-._")
    return _Target(url, scheme, parts.hostname, port or (443 if scheme == "https" else 80), path)


def _address(t: _Target, policy: FetchPolicy) -> str:
    """The address to connect to: the host resolved once, every address checked."""
    try:
        found = list(policy.resolver(t.host, t.port))
    except (OSError, UnicodeError) as e:
        raise FetchError(f"cannot resolve {t.host}: {e}") from None
    if not found:
        raise FetchError(f"{t.host} resolves to no address")
    for a in found:
        try:
            ip = ipaddress.ip_address(a.split("%", 1)[0])
        except ValueError:
            raise FetchError(f"{t.host} resolves to {a!r}, not an address") from None
        if not policy.permits(ip):
            raise FetchError(f"{t.host} resolves to {ip}, which is not a public address "
                             "(limits.allow_private_image_urls)")
    return found[0]


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("timed out")
    return left


def _get(t: _Target, address: str, policy: FetchPolicy, deadline: float
         ) -> tuple[int, str | None, bytes]:
    """(status, Location, body) of one GET; the body only for a 2xx answer."""
    conn = _Pinned(t.host, t.port, address, _left(deadline), policy, t.scheme == "https")
    try:
        conn.request("GET", t.path, headers={"User-Agent": policy.user_agent,
                                             "Accept": "image/*", **policy.headers})
        resp = conn.getresponse()
        if resp.status in REDIRECTS or not 200 <= resp.status < 300:
            return resp.status, resp.getheader("location"), b""
        declared = resp.getheader("content-length")
        if declared is not None and declared.strip().isdigit() and \
                int(declared) > policy.max_bytes:
            raise FetchError(f"the image is {int(declared)} bytes, over the limit of "
                             f"{policy.max_bytes}")
        chunks, size = [], 0
        while True:
            if conn.pinned is not None:  # each read waits at most until the deadline
                conn.pinned.settimeout(_left(deadline))
            chunk = resp.read1(min(65536, policy.max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > policy.max_bytes:
                raise FetchError(f"the image is over the limit of {policy.max_bytes} bytes")
        return resp.status, None, b"".join(chunks)
    finally:
        conn.close()


def fetch(url: str, policy: FetchPolicy | None = None) -> bytes:
    """The body of ``url`` (a 2xx answer), following at most ``policy.max_redirects``
    redirects, each hop checked (see the module docstring).

    Raises:
        FetchError: the URL or a redirect was refused, the server failed or answered other
            than 2xx, the body is over ``max_bytes``, or it took over ``timeout_s`` in all.
    """
    policy = policy or FetchPolicy()
    deadline = time.monotonic() + policy.timeout_s
    t = _target(url)
    for hop in range(policy.max_redirects + 1):
        address = _address(t, policy)
        try:
            status, location, body = _get(t, address, policy, deadline)
        except FetchError:
            raise
        except ssl.SSLError as e:
            why = getattr(e, "verify_message", None) or e.reason or e
            raise FetchError(f"TLS with {t.host} failed: {why}") from None
        except TimeoutError:
            raise FetchError("timed out") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise FetchError(f"cannot fetch from {t.host}: {type(e).__name__}: {e}") from None
        if status not in REDIRECTS:
            if not 200 <= status < 300:
                raise FetchError(f"{t.host} answered HTTP {status}")
            return body
        if not location:
            raise FetchError(f"{t.host} answered a redirect ({status}) without a Location")
        if hop == policy.max_redirects:
            break
        t = _target(urllib.parse.urljoin(t.url, location.strip()))
    raise FetchError(f"over {policy.max_redirects} redirects")
