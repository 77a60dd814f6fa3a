"""``serving.fetch``: image URLs cannot reach private networks (SSRF), one case per way in.

Local HTTP(S) servers on loopback addresses (threads). A test that needs a "public" server
treats 127.0.0.2 as public through the policy's ``allowed`` predicate and maps names to
loopback addresses through an injected resolver; every connection goes through a guard that
records it and refuses anything outside 127.0.0.0/8, so no test can send a packet elsewhere.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving.fetch import FetchError, FetchPolicy, fetch, is_public

PUBLIC = "127.0.0.2"  # stands for a public address in these tests
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


class Server:
    """A threaded HTTP server on ``host``; ``routes`` maps a path to a handler function
    ``(handler) -> None``; every request's (path, Host header) is recorded."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.routes, self.seen = routes or {}, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                outer.seen.append((self.path, self.headers.get("host")))
                route = outer.routes.get(self.path.split("?")[0])
                if route is None:
                    reply(self, 404, b"not here")
                else:
                    route(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.host, self.port = host, self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str | None = None, scheme: str = "http") -> str:
        return f"{scheme}://{host or self.host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(h: BaseHTTPRequestHandler, status: int, body: bytes = b"",
          headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def image(h: BaseHTTPRequestHandler) -> None:
    reply(h, 200, IMAGE, {"Content-Type": "image/png"})


def redirect(to: str, status: int = 302) -> Callable[[BaseHTTPRequestHandler], None]:
    return lambda h: reply(h, status, b"", {"Location": to})


@pytest.fixture()
def servers():
    made: list[Server] = []

    def make(*args, **kwargs) -> Server:
        made.append(Server(*args, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


class Guard:
    """The policy's ``connect``: records (address, port) and refuses non-loopback ones."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, address: tuple[str, int], timeout: float) -> socket.socket:
        self.calls.append(address)
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"a test tried to connect to {address}")
        return socket.create_connection(address, timeout)


def names(table: dict[str, list[str]]) -> Callable[[str, int], list[str]]:
    """A resolver: IP literals are themselves, names come from ``table`` (else no address)."""
    def resolve(host: str, port: int) -> list[str]:
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            if host not in table:
                raise socket.gaierror(f"unknown test name {host}") from None
            return table[host]
    return resolve


def policy(guard: Guard, table: dict[str, list[str]] | None = None, **over) -> FetchPolicy:
    """Only 127.0.0.2 counts as public (plus ``over``)."""
    kw = {"allowed": lambda ip: ip == ipaddress.ip_address(PUBLIC), "connect": guard,
          "resolver": names(table or {}), "timeout_s": 3.0, "max_bytes": 1 << 20}
    kw.update(over)
    return FetchPolicy(**kw)


# ----------------------------------------------------------------------------- addresses

@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::1", "64:ff9b::a9fe:a9fe",
    "2001:0:4136:e378:8000:63bf:80ff:fffe"])
def test_private_loopback_link_local_and_embedded_addresses_are_not_public(address):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111",
                                     "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_global_addresses_are_public(address):
    assert is_public(ipaddress.ip_address(address))


# ----------------------------------------------------------------------------- SSRF cases

def test_a_direct_private_address_is_refused_before_connecting(servers):
    s = servers(routes={"/img": image})
    guard = Guard()
    with pytest.raises(FetchError, match="127.0.0.1, which is not a public address"):
        fetch(s.url("/img"), FetchPolicy(connect=guard))  # the real predicate and resolver
    assert guard.calls == [] and s.seen == []


def test_a_public_looking_name_that_resolves_to_a_private_address_is_refused(servers):
    s = servers(routes={"/img": image})
    guard = Guard()
    with pytest.raises(FetchError, match="images.example.com resolves to 127.0.0.1"):
        fetch(s.url("/img", host="images.example.com"),
              FetchPolicy(connect=guard, resolver=names({"images.example.com": ["127.0.0.1"]})))
    # one private address among public ones is enough to refuse the name
    mixed = names({"cdn.example.com": ["93.184.216.34", "10.0.0.7"]})
    with pytest.raises(FetchError, match="10.0.0.7"):
        fetch("http://cdn.example.com/img", FetchPolicy(connect=guard, resolver=mixed))
    assert guard.calls == [] and s.seen == []


def test_dns_rebinding_connects_to_the_checked_address_and_never_resolves_again(servers):
    good = servers(PUBLIC, routes={"/img": image})
    evil = servers("127.0.0.3", good.port, routes={"/img": lambda h: reply(h, 200, b"secret")})
    answers = [[PUBLIC], ["127.0.0.3"], ["127.0.0.3"]]  # public to the check, then private
    asked = []

    def rebinding(host: str, port: int) -> list[str]:
        asked.append(host)
        return answers[len(asked) - 1]

    guard = Guard()
    got = fetch(good.url("/img", host="rebind.test"),
                policy(guard, resolver=rebinding))
    assert got == IMAGE
    assert asked == ["rebind.test"], "the name is resolved once"
    assert guard.calls == [(PUBLIC, good.port)] and evil.seen == []
    assert good.seen == [("/img", f"rebind.test:{good.port}")], "the original Host header"


def test_a_redirect_to_loopback_is_refused(servers):
    secret = servers("127.0.0.1", routes={"/secret": lambda h: reply(h, 200, b"secret")})
    public = servers(PUBLIC, routes={"/img": redirect(secret.url("/secret"))})
    guard = Guard()
    with pytest.raises(FetchError, match="127.0.0.1, which is not a public address"):
        fetch(public.url("/img"), policy(guard))
    assert guard.calls == [(PUBLIC, public.port)] and secret.seen == []
    # by name too: the redirect's host is resolved and checked like the first one
    public.routes["/named"] = redirect(f"http://internal.test:{secret.port}/secret")
    with pytest.raises(FetchError, match="internal.test resolves to 127.0.0.1"):
        fetch(public.url("/named"), policy(guard, {"internal.test": ["127.0.0.1"]}))
    assert secret.seen == []


def test_a_redirect_to_the_metadata_address_is_refused(servers):
    public = servers(PUBLIC, routes={
        "/img": redirect("http://169.254.169.254/latest/meta-data/iam/"),
        "/named": redirect("http://metadata.test/computeMetadata/v1/", 307)})
    guard = Guard()
    with pytest.raises(FetchError, match="169.254.169.254, which is not a public"):
        fetch(public.url("/img"), policy(guard))
    with pytest.raises(FetchError, match="169.254.169.254"):
        fetch(public.url("/named"), policy(guard, {"metadata.test": ["169.254.169.254"]}))
    assert all(a == PUBLIC for a, _ in guard.calls)  # only the public server was reached


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.2/x.png",
                                      "gopher://127.0.0.2:70/_x", "javascript:alert(1)",
                                      "data:image/png;base64,iVBORw0KGgo="])
def test_a_redirect_to_another_scheme_is_refused(servers, location):
    public = servers(PUBLIC, routes={"/img": redirect(location)})
    with pytest.raises(FetchError, match="only http and https"):
        fetch(public.url("/img"), policy(Guard()))


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x", "//x/y",
                                 "http:///nohost", "http://user:pw@127.0.0.2/x",
                                 "http://127.0.0.2:99999/x"])
def test_urls_that_are_not_plain_http_are_refused(url):
    with pytest.raises(FetchError):
        fetch(url, policy(Guard()))


def test_too_many_redirects_are_refused_and_a_few_are_followed(servers):
    s = servers(PUBLIC, routes={"/loop": redirect("/loop"), "/img": image,
                                "/a": redirect("/b", 301), "/b": redirect("/img", 308)})
    with pytest.raises(FetchError, match="over 3 redirects"):
        fetch(s.url("/loop"), policy(Guard(), max_redirects=3))
    assert len(s.seen) == 4  # the first request and 3 redirects, then it stops
    assert fetch(s.url("/a"), policy(Guard(), max_redirects=2)) == IMAGE
    with pytest.raises(FetchError, match="over 0 redirects"):
        fetch(s.url("/a"), policy(Guard(), max_redirects=0))


def test_an_oversize_body_is_refused_declared_or_streamed(servers):
    def undeclared(h: BaseHTTPRequestHandler) -> None:  # no Content-Length: read to the close
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        for _ in range(50):
            h.wfile.write(b"x" * 100)

    def chunked(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for _ in range(50):
            h.wfile.write(b"64\r\n" + b"x" * 100 + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")

    s = servers(PUBLIC, routes={"/declared": lambda h: reply(h, 200, b"x" * 5000),
                                "/undeclared": undeclared, "/chunked": chunked})
    for path in ("/declared", "/undeclared", "/chunked"):
        with pytest.raises(FetchError, match="over the limit of 4999"):
            fetch(s.url(path), policy(Guard(), max_bytes=4999))
        assert fetch(s.url(path), policy(Guard(), max_bytes=5000)) == b"x" * 5000


def test_private_addresses_are_fetched_when_allowed(servers):
    s = servers("127.0.0.1", routes={"/img": image, "/moved": redirect("/img")})
    guard = Guard()
    assert fetch(s.url("/moved"), FetchPolicy(allow_private=True, connect=guard)) == IMAGE
    assert guard.calls == [("127.0.0.1", s.port)] * 2
    assert [p for p, _ in s.seen] == ["/moved", "/img"]


def test_errors_and_slow_servers_are_fetch_errors(servers):
    def slow(h: BaseHTTPRequestHandler) -> None:
        time.sleep(1.5)
        image(h)

    def drip(h: BaseHTTPRequestHandler) -> None:  # each byte in time, the whole too slow
        h.send_response(200)
        h.send_header("Content-Length", "100")
        h.end_headers()
        for _ in range(100):
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.1)

    s = servers(PUBLIC, routes={"/slow": slow, "/drip": drip,
                                "/nolocation": lambda h: reply(h, 302)})
    for path in ("/slow", "/drip"):
        t0 = time.monotonic()
        with pytest.raises(FetchError, match="timed out"):
            fetch(s.url(path), policy(Guard(), timeout_s=0.5))
        assert time.monotonic() - t0 < 1.2
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(s.url("/missing"), policy(Guard()))
    with pytest.raises(FetchError, match="without a Location"):
        fetch(s.url("/nolocation"), policy(Guard()))
    with pytest.raises(FetchError, match="unknown test name"):
        fetch("http://nowhere.test/x", policy(Guard()))
    closed = socket.socket()
    closed.bind((PUBLIC, 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(FetchError, match="cannot fetch"):
        fetch(f"http://{PUBLIC}:{port}/x", policy(Guard()))


# ----------------------------------------------------------------------------- https

@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A CA, and a server certificate for images.test signed by it: (server context, client
    context trusting only that CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool):
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                critical=False)
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]),
                                critical=False)
            b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer_key.public_key()), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("test CA", ca_key, "test CA", ca_key, True)
    leaf = cert("images.test", key, "test CA", ca_key, False)
    d = tmp_path_factory.mktemp("tls")
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(d / "leaf.pem", d / "key.pem")
    client = ssl.create_default_context(cafile=str(d / "ca.pem"))
    return server, client


def test_https_is_pinned_sends_the_name_and_verifies_the_certificate(servers, tls):
    server_ctx, client_ctx = tls
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: sni.append(name)
    s = servers(PUBLIC, routes={"/img": image}, tls=server_ctx)
    table = {"images.test": [PUBLIC], "other.test": [PUBLIC]}
    guard = Guard()
    got = fetch(s.url("/img", host="images.test", scheme="https"),
                policy(guard, table, ssl_context=client_ctx))
    assert got == IMAGE and guard.calls == [(PUBLIC, s.port)]
    assert sni[-1] == "images.test" and s.seen[-1] == ("/img", f"images.test:{s.port}")
    with pytest.raises(FetchError, match="TLS with other.test failed"):  # not its certificate
        fetch(s.url("/img", host="other.test", scheme="https"),
              policy(guard, table, ssl_context=client_ctx))
    with pytest.raises(FetchError, match="TLS with images.test failed"):  # an unknown CA
        fetch(s.url("/img", host="images.test", scheme="https"), policy(guard, table))
