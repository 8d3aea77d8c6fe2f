"""The frontend as a real process: visitors over HTTP and HTTPS (SNI, cloud CA), workers over mTLS.

The upstreams here are small aiohttp HTTPS origins holding a worker certificate and requiring a client
certificate: they stand in for an HTTP origin (echo, big bodies, slow answers), not for our routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import itertools
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from roles.frontend._routes import build_routes
from roles.frontend._upstream import Upstream
from roles.frontend.config import FrontendConfig
from shared.contracts.snapshots import FrontendSnapshot
from shared.net import free_port
from shared.pki import role_of_peer
from tests.support import CloudPKI, RoleProcess, wait_until

DOMAIN = "sites.test"
BLOG = f"blog.{DOMAIN}"
_versions = itertools.count(1)


def _pattern(n: int) -> bytes:
    block = bytes(range(256)) * 256
    return (block * (n // len(block) + 1))[:n]


class Origin:
    """An HTTPS origin on its own thread and loop, with a worker certificate; mTLS required."""

    def __init__(self, pki: CloudPKI, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.address = f"localhost:{self.port}"
        # A second listener that answers close-delimited (no length, no chunking), as old servers do.
        self.close_port = free_port()
        self.close_address = f"localhost:{self.close_port}"
        self.requests = 0
        self.in_flight = 0
        cert, key = pki.directory / f"origin-{name}.pem", pki.directory / f"origin-{name}.key"
        pki.ca.issue(
            f"worker@{name}", role="worker", dns_names=["localhost"], ip_addresses=["127.0.0.1"]
        ).write(key, cert)
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.load_cert_chain(cert, key)
        self._ssl.load_verify_locations(pki.ca_file)
        self._ssl.verify_mode = ssl.CERT_REQUIRED
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._close_server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> Origin:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/echo", self._echo)
        app.router.add_get("/big", self._big)
        app.router.add_route("*", "/sleep", self._sleep)
        app.router.add_route("*", "/status/{code}", self._status)
        app.router.add_get("/ws", self._ws)
        app.router.add_post("/sink", self._sink)
        app.router.add_post("/chunks", self._chunks)
        app.router.add_route("*", "/drop", self._drop)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ssl).start()
        self._close_server = await asyncio.start_server(
            self._close_delimited, "127.0.0.1", self.close_port, ssl=self._ssl
        )

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._close_server is not None:
            self._close_server.close()
            await self._close_server.wait_closed()

    async def _close_delimited(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        writer.write(_pattern(300_000))
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    def _seen(self, request: web.Request) -> dict[str, Any]:
        self.requests += 1
        transport = request.transport
        assert transport is not None
        return {
            "origin": self.name,
            "peer_role": role_of_peer(transport.get_extra_info("peercert")),
            "peer_port": transport.get_extra_info("peername")[1],
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k, v] for k, v in request.headers.items()],
        }

    async def _echo(self, request: web.Request) -> web.Response:
        seen = self._seen(request)
        body = await request.read()
        seen.update(
            body_len=len(body),
            body_sha=hashlib.sha256(body).hexdigest(),
            chunked=request.headers.get("Transfer-Encoding"),
        )
        return web.json_response(seen)

    async def _big(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        n = int(request.query["n"])
        data = _pattern(n)
        resp = web.StreamResponse(headers={"X-Origin": self.name})
        if request.query.get("chunked"):
            resp.enable_chunked_encoding()
        else:
            resp.content_length = n
        await resp.prepare(request)
        for i in range(0, n, 65536):
            await resp.write(data[i : i + 65536])
        await resp.write_eof()
        return resp

    async def _sleep(self, request: web.Request) -> web.Response:
        seen = self._seen(request)
        self.in_flight += 1
        try:
            # ?on=NAME: only that origin is slow; the others answer at once.
            if request.query.get("on", self.name) == self.name:
                await asyncio.sleep(float(request.query["s"]))
        finally:
            self.in_flight -= 1
        return web.json_response(seen)

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        """Echoes each text message back with this origin's name in front."""
        self._seen(request)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                await ws.send_str(f"{self.name}:{msg.data}")
        return ws

    async def _sink(self, request: web.Request) -> web.Response:
        """Reads a body of any size in constant memory; answers its length and hash."""
        seen = self._seen(request)
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        seen.update(body_len=size, body_sha=digest.hexdigest())
        return web.json_response(seen)

    async def _chunks(self, request: web.Request) -> web.Response:
        """Counts the HTTP chunks of a chunked body as they came from the front end."""
        seen = self._seen(request)
        chunks, body = 0, b""
        async for data, end_of_chunk in request.content.iter_chunks():
            body += data
            chunks += end_of_chunk
        seen.update(chunks=chunks, body=body.decode())
        return web.json_response(seen)

    async def _drop(self, request: web.Request) -> web.Response:
        """Takes the request, then cuts the connection without a word."""
        self._seen(request)
        assert request.transport is not None
        request.transport.abort()
        await asyncio.sleep(30)  # cancelled with the connection (handler_cancellation)
        return web.Response(status=500)

    async def _status(self, request: web.Request) -> web.Response:
        self._seen(request)
        code = int(request.match_info["code"])
        return web.Response(
            status=code, headers={"X-Origin": self.name}, body=None if code in (204, 304) else b"x" * 10
        )


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> CloudPKI:
    return CloudPKI(tmp_path_factory.mktemp("pki"))


def _frontend_config(cloud: CloudPKI, home: Path, **fields: Any) -> FrontendConfig:
    short = {
        "header_timeout": 0.6,
        "response_timeout": 1.5,
        "connect_timeout": 2.0,
        "max_header_bytes": 8192,
        "idle_timeout": 1.5,
        "body_timeout": 5.0,
        "handshake_timeout": 1.5,
    }
    config = cloud.role_config(FrontendConfig, "frontend", home, **{**short, **fields})
    cloud.ca.issue_wildcard(DOMAIN).write(config.wildcard_key_file, config.wildcard_cert_file)
    return config


@pytest.fixture(scope="module")
def frontend(
    cloud: CloudPKI, origins: tuple[Origin, Origin], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RoleProcess]:
    # Depends on the origins so that it stops first, closing its pooled connections to them.
    proc = RoleProcess(_frontend_config(cloud, tmp_path_factory.mktemp("frontend")), cloud)
    with proc.running():
        yield proc


@pytest.fixture(scope="module")
def origins(cloud: CloudPKI) -> Iterator[tuple[Origin, Origin]]:
    a, b = Origin(cloud, "a").start(), Origin(cloud, "b").start()
    yield a, b
    a.stop()
    b.stop()


def route(frontend: RoleProcess, sites: dict[str, list[str]], *, active: int = 0) -> None:
    snapshot = {
        "version": next(_versions),
        "domain": DOMAIN,
        "sites": {
            name: {"workers": workers, **({"active": active} if active else {})}
            for name, workers in sites.items()
        },
    }
    frontend.push_config(snapshot)


# -- clients ----------------------------------------------------------------------------------------


class _SNIConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 with the site's name as SNI, verified against the cloud CA."""

    def __init__(self, port: int, server_name: str, ctx: ssl.SSLContext) -> None:
        super().__init__("127.0.0.1", port, context=ctx, timeout=10)
        self._server_name = server_name
        self._ctx = ctx

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self._server_name)


def https_conn(frontend: RoleProcess, cloud: CloudPKI, host: str = BLOG) -> http.client.HTTPConnection:
    config = frontend.config
    assert isinstance(config, FrontendConfig)
    return _SNIConnection(config.https_port, host, cloud.client_ssl(None))


def http_conn(frontend: RoleProcess) -> http.client.HTTPConnection:
    config = frontend.config
    assert isinstance(config, FrontendConfig)
    return http.client.HTTPConnection("127.0.0.1", config.http_port, timeout=10)


def fetch(
    conn: http.client.HTTPConnection,
    path: str,
    *,
    host: str = BLOG,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPResponse, bytes]:
    conn.request(
        method,
        path,
        body=body,
        headers={"Host": host, **(headers or {})},
        encode_chunked=body is not None and not isinstance(body, bytes),
    )
    resp = conn.getresponse()
    return resp.status, resp, resp.read()


def raw(port: int, data: bytes, *, pause: float = 0.0, timeout: float = 5.0) -> bytes:
    """Send ``data`` on plain TCP and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if pause:
            time.sleep(pause)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def http_port(frontend: RoleProcess) -> int:
    assert isinstance(frontend.config, FrontendConfig)
    return frontend.config.http_port


def _headers(echo: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k.lower() == name.lower()]


# -- routing and headers ----------------------------------------------------------------------------


def test_https_with_sni_forwards_to_the_site_with_trusted_headers(
    frontend: RoleProcess, cloud: CloudPKI, origins: tuple[Origin, Origin]
) -> None:
    a, _ = origins
    route(frontend, {"blog": [a.address]})
    conn = https_conn(frontend, cloud)
    status, _resp, body = fetch(
        conn,
        "/echo?x=1",
        headers={
            "X-Sitecloud-Site": "someone-else",
            "X-Forwarded-For": "10.0.0.1",
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "gopher",
            "Connection": "keep-alive, X-Private",
            "X-Private": "hop",
            "Keep-Alive": "timeout=5",
            "X-Custom": "kept",
        },
    )
    conn.close()
    assert status == 200, body
    echo = json.loads(body)
    assert echo["origin"] == "a" and echo["peer_role"] == "frontend"
    assert echo["method"] == "GET" and echo["path"] == "/echo?x=1"
    assert _headers(echo, "X-Sitecloud-Site") == ["blog"]
    assert _headers(echo, "X-Forwarded-For") == ["10.0.0.1, 127.0.0.1"]
    assert _headers(echo, "X-Forwarded-Proto") == ["https"]
    assert _headers(echo, "X-Forwarded-Host") == [BLOG]
    assert _headers(echo, "Host") == [BLOG]
    assert _headers(echo, "X-Custom") == ["kept"]
    for hop in ("X-Private", "Keep-Alive"):
        assert _headers(echo, hop) == []


_PROXY_TRUST = {
    "Forwarded": "for=6.6.6.6;proto=http;host=evil.example",
    "X-Forwarded-Port": "1",
    "X-Forwarded-Prefix": "/evil",
    "X-Forwarded-Ssl": "off",
    "X-Forwarded-Scheme": "http",
    "X-Forwarded-Server": "evil.example",
    "X-Forwarded-Uri": "/admin",
    "X-Real-IP": "6.6.6.6",
    "X-Original-URL": "/admin",
    "X-Rewrite-URL": "/admin",
    "X-Original-Host": "evil.example",
    "X-Host": "evil.example",
    "Front-End-Https": "off",
}


def test_headers_that_frameworks_take_from_their_proxy_are_never_a_visitors(
    frontend: RoleProcess, cloud: CloudPKI, origins: tuple[Origin, Origin]
) -> None:
    # An app behind the platform trusts its proxy (it must, for the scheme): Rails and Laravel build
    # links and redirects on X-Forwarded-Port, Werkzeug's ProxyFix and Spring put every link under
    # X-Forwarded-Prefix, Spring and Symfony read Forwarded. A visitor's own went through as ours.
    a, _ = origins
    route(frontend, {"blog": [a.address]})
    conn = https_conn(frontend, cloud)
    status, _resp, body = fetch(conn, "/echo", headers=_PROXY_TRUST)
    conn.close()
    assert status == 200, body
    echo = json.loads(body)
    assert [name for name in _PROXY_TRUST if _headers(echo, name)] == []
    assert _headers(echo, "X-Forwarded-Proto") == ["https"] and _headers(echo, "X-Forwarded-Host") == [BLOG]


def test_plain_http_and_unknown_hosts(frontend: RoleProcess, origins: tuple[Origin, Origin]) -> None:
    a, _ = origins
    route(frontend, {"blog": [a.address]})
    conn = http_conn(frontend)
    status, _, body = fetch(conn, "/echo", host=f"BLOG.{DOMAIN}:{http_port(frontend)}")
    assert status == 200
    echo = json.loads(body)
    assert _headers(echo, "X-Forwarded-Proto") == ["http"] and _headers(echo, "X-Sitecloud-Site") == ["blog"]
    before = a.requests
    for host in (f"nosuch.{DOMAIN}", DOMAIN, f"{BLOG}.evil.example", "blog", "127.0.0.1"):
        status, resp, body = fetch(conn, "/echo", host=host)
        assert status == 404, host
        assert b"No site here" in body and resp.getheader("Content-Type", "").startswith("text/html")
    assert a.requests == before  # nothing reached the site
    # The connection survived the 404s (keep-alive).
    status, _, _ = fetch(conn, "/echo")
    assert status == 200
    conn.close()


def test_host_header_must_be_there_once(frontend: RoleProcess, origins: tuple[Origin, Origin]) -> None:
    route(frontend, {"blog": [origins[0].address]})
    port = http_port(frontend)
    assert raw(port, b"GET /echo HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    dup = raw(port, f"GET /echo HTTP/1.1\r\nHost: {BLOG}\r\nHost: other.{DOMAIN}\r\n\r\n".encode())
    assert dup.startswith(b"HTTP/1.1 400 ")
    # HTTP/1.0 without Host: no site, not an error; and the connection closes after it.
    assert raw(port, b"GET /echo HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 404 ")


def test_a_host_whose_port_is_not_a_number_is_refused_and_reaches_no_app(
    frontend: RoleProcess, origins: tuple[Origin, Origin]
) -> None:
    # The routes key on the name before the last colon: the rest went to the app as it came, and an
    # app that builds its links from Host (a password reset mail's) sent its visitors to evil.example.
    a, _ = origins
    route(frontend, {"blog": [a.address]})
    port = http_port(frontend)
    before = a.requests
    for host in (f"{BLOG}:443@evil.example", f"{BLOG}:80/x", f"{BLOG}:x", f"me@{BLOG}"):
        answer = raw(port, f"GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 400 "), (host, answer[:80])
    # As an absolute-form target a URL parser reads it: the userinfo goes, the host is evil.example's.
    target = f"http://{BLOG}:443@evil.example/echo"
    answer = raw(port, f"GET {target} HTTP/1.1\r\nHost: {BLOG}\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:80]
    assert a.requests == before
    answer = raw(port, f"GET /echo HTTP/1.1\r\nHost: {BLOG}:{port}\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 ") and f'"{BLOG}:{port}"'.encode() in answer


# -- bodies -----------------------------------------------------------------------------------------


def test_request_and_response_bodies_stream_through(
    frontend: RoleProcess, cloud: CloudPKI, origins: tuple[Origin, Origin]
) -> None:
    a, _ = origins
    route(frontend, {"blog": [a.address]})
    payload = _pattern(3 * 1024 * 1024 + 17)
    conn = https_conn(frontend, cloud)
    status, _, body = fetch(conn, "/echo", method="POST", body=payload)
    assert status == 200
    echo = json.loads(body)
    assert echo["body_len"] == len(payload) and echo["body_sha"] == hashlib.sha256(payload).hexdigest()
    assert _headers(echo, "Content-Length") == [str(len(payload))]

    chunks = [payload[i : i + 100_000] for i in range(0, len(payload), 100_000)]
    status, _, body = fetch(conn, "/echo", method="PUT", body=iter(chunks))
    assert status == 200
    echo = json.loads(body)
    assert echo["body_len"] == len(payload) and echo["body_sha"] == hashlib.sha256(payload).hexdigest()
    assert echo["chunked"] == "chunked"

    n = 5 * 1024 * 1024 + 3
    for chunked in ("", "1"):
        status, resp, body = fetch(conn, f"/big?n={n}&chunked={chunked}")
        assert status == 200 and body == _pattern(n)
        assert resp.getheader("X-Origin") == "a"
        if chunked:
            assert resp.getheader("Transfer-Encoding") == "chunked"
        else:
            assert resp.getheader("Content-Length") == str(n)
    conn.close()


def test_a_bodys_tiny_chunks_go_on_as_one_chunk_per_read(
    frontend: RoleProcess, origins: tuple[Origin, Origin]
) -> None:
    # A visitor's one-byte chunks each cost the worker a parse and its app a write: 2,000 of them in
    # one send reach the worker as a handful of chunks, the same bytes.
    a, _ = origins
    route(frontend, {"blog": [a.address]})
    body = "".join(f"{c:x}\r\n{'y' * c}\r\n" for c in [1] * 2000) + "0\r\n\r\n"
    request = (
        f"POST /chunks HTTP/1.1\r\nHost: {BLOG}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    out = raw(http_port(frontend), (request + body).encode(), timeout=10)
    head, _, answer = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), out[:300]
    seen = json.loads(answer)
    assert seen["body"] == "y" * 2000
    assert 1 <= seen["chunks"] <= 20, seen["chunks"]


def test_head_and_bodiless_statuses(frontend: RoleProcess, origins: tuple[Origin, Origin]) -> None:
    route(frontend, {"blog": [origins[0].address]})
    conn = http_conn(frontend)
    status, resp, body = fetch(conn, "/big?n=1000", method="HEAD")
    assert status == 200 and body == b"" and resp.getheader("Content-Length") == "1000"
    status, _, body = fetch(conn, "/status/204")
    assert status == 204 and body == b""
    status, _, body = fetch(conn, "/status/418")
    assert status == 418 and body == b"x" * 10
    # The connection is still in step after all of them.
    status, _, body = fetch(conn, "/big?n=10")
    assert status == 200 and body == _pattern(10)
    conn.close()


def test_close_delimited_responses_are_reframed(
    frontend: RoleProcess, origins: tuple[Origin, Origin]
) -> None:
    route(frontend, {"blog": [origins[0].close_address]})
    conn = http_conn(frontend)
    for _ in range(2):  # chunked to an HTTP/1.1 client, which keeps its connection
        status, resp, body = fetch(conn, "/")
        assert status == 200 and body == _pattern(300_000)
        assert resp.getheader("Transfer-Encoding") == "chunked" and resp.getheader("Connection") is None
    conn.close()
    out = raw(
        http_port(frontend), f"GET / HTTP/1.0\r\nHost: {BLOG}\r\nConnection: keep-alive\r\n\r\n".encode()
    )
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head and b"chunked" not in head
    assert body == _pattern(300_000)  # HTTP/1.0: the body ends with the connection


def test_expect_100_continue(frontend: RoleProcess, origins: tuple[Origin, Origin]) -> None:
    route(frontend, {"blog": [origins[0].address]})
    with socket.create_connection(("127.0.0.1", http_port(frontend)), timeout=5) as sock:
        sock.sendall(
            f"POST /echo HTTP/1.1\r\nHost: {BLOG}\r\nExpect: 100-continue\r\nContent-Length: 5\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        out = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    echo = json.loads(body)
    assert echo["body_len"] == 5 and _headers(echo, "Expect") == []


def test_pipelined_requests_are_answered_in_order(
    frontend: RoleProcess, origins: tuple[Origin, Origin]
) -> None:
    route(frontend, {"blog": [origins[0].address]})
    one = f"GET /big?n=5 HTTP/1.1\r\nHost: {BLOG}\r\n\r\n"
    missing = f"GET / HTTP/1.1\r\nHost: nosuch.{DOMAIN}\r\n\r\n"
    last = f"GET /big?n=7 HTTP/1.1\r\nHost: {BLOG}\r\nConnection: close\r\n\r\n"
    out = raw(http_port(frontend), (one + missing + last).encode())
    assert out.count(b"HTTP/1.1 ") == 3
    first, second, third = out.index(b"HTTP/1.1 200"), out.index(b"HTTP/1.1 404"), out.rindex(b"HTTP/1.1 200")
    assert first < second < third
    assert out.endswith(_pattern(7))


def _tls_records(
    cloud: CloudPKI, port: int, send: Callable[[ssl.SSLObject, ssl.MemoryBIO, socket.socket], None]
) -> bytes:
    """A TLS session whose records and TCP writes the test shapes (``send`` writes records with the
    ``SSLObject``, takes their bytes from the BIO and sends them); returns the plaintext answered until
    the front end closes."""
    ctx = cloud.client_ssl(None)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=BLOG)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        sock.sendall(outgoing.read())
        send(tls, outgoing, sock)
        plain = []
        while data := sock.recv(65536):
            incoming.write(data)
            try:
                while chunk := tls.read(65536):
                    plain.append(chunk)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
    return b"".join(plain)


def test_tls_records_cut_anywhere_are_read_whole(
    frontend: RoleProcess, cloud: CloudPKI, origins: tuple[Origin, Origin]
) -> None:
    """Requests reach the front end in records cut at any byte and in TCP writes that split record
    headers: three pipelined requests, the second one spread over many small records."""
    route(frontend, {"blog": [origins[0].address]})
    one = f"GET /big?n=3 HTTP/1.1\r\nHost: {BLOG}\r\n\r\n".encode()
    two = f"GET /big?n=4 HTTP/1.1\r\nHost: {BLOG}\r\nX-Pad: {'p' * 3000}\r\n\r\n".encode()
    last = f"GET /big?n=5 HTTP/1.1\r\nHost: {BLOG}\r\nConnection: close\r\n\r\n".encode()

    def send(tls: ssl.SSLObject, outgoing: ssl.MemoryBIO, sock: socket.socket) -> None:
        tls.write(one)
        for at in range(0, len(two), 700):
            tls.write(two[at : at + 700])
        tls.write(last)
        wire = outgoing.read()
        # TCP writes of 1, 2, 3 ... bytes: record headers land across them.
        at, size = 0, 1
        while at < len(wire):
            sock.sendall(wire[at : at + size])
            at, size = at + size, size % 11 + 1
            if size == 1:
                time.sleep(0.002)

    out = _tls_records(cloud, frontend.config.https_port, send)  # type: ignore[attr-defined]
    assert out.count(b"HTTP/1.1 200") == 3
    assert out.endswith(_pattern(5))
    assert _pattern(3) in out and _pattern(4) in out


def test_plain_http_to_the_https_port_is_told_to_use_https(frontend: RoleProcess) -> None:
    assert isinstance(frontend.config, FrontendConfig)
    out = raw(frontend.config.https_port, f"GET / HTTP/1.1\r\nHost: {BLOG}\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 400 ") and b"https://" in out


def test_a_tls_handshake_that_stalls_is_dropped(frontend: RoleProcess) -> None:
    """A visitor that opens a connection and sends part of a ClientHello holds nothing for long."""
    assert isinstance(frontend.config, FrontendConfig)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", frontend.config.https_port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01\x02")
        assert sock.recv(100) == b""
    assert time.monotonic() - started < 8


def test_a_close_notify_ends_the_visitor_s_side_whatever_follows_it(
    frontend: RoleProcess, cloud: CloudPKI, origins: tuple[Origin, Origin]
) -> None:
    """A close_notify read together with the start of another record (a read that ends mid-record)
    closes that one connection at once: the front end neither spins nor stops serving others."""
    route(frontend, {"blog": [origins[0].address]})
    missing = f"GET / HTTP/1.1\r\nHost: nosuch.{DOMAIN}\r\n\r\n".encode()

    def send(tls: ssl.SSLObject, outgoing: ssl.MemoryBIO, sock: socket.socket) -> None:
        tls.write(missing)
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.unwrap()  # the close_notify, without waiting for the front end's
        sock.sendall(outgoing.read() + b"\x17\x03")

    started = time.monotonic()
    out = _tls_records(cloud, frontend.config.https_port, send)  # type: ignore[attr-defined]
    assert out.startswith(b"HTTP/1.1 404 ")  # what came before the close_notify is answered
    assert time.monotonic() - started < 3  # closed at once, not by a timeout
    conn = https_conn(frontend, cloud)
    conn.timeout = 5
    status, _resp, body = fetch(conn, "/big?n=3")
    assert (status, body) == (200, _pattern(3))
    conn.close()


# -- strict parsing and limits ----------------------------------------------------------------------


def test_ambiguous_framing_is_refused(frontend: RoleProcess, origins: tuple[Origin, Origin]) -> None:
    a, _ = origins
    route(frontend, {"blog": [a.address]})
    port = http_port(frontend)
    before = a.requests
    smuggle = (
        f"POST /echo HTTP/1.1\r\nHost: {BLOG}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        "0\r\n\r\nGET /echo HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    for bad in (
        smuggle,
        f"POST /echo HTTP/1.1\r\nHost: {BLOG}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        f"POST /echo HTTP/1.1\r\nHost: {BLOG}\r\nContent-Length: -3\r\n\r\nabc",
        f"POST /echo HTTP/1.1\r\nHost: {BLOG}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "GET /echo HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    ):
        out = raw(port, bad.encode())
        assert out.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 501 ")), (bad, out[:100])
        assert b"Connection: close" in out and out.count(b"HTTP/1.1 ") == 1
    assert a.requests == before


def test_oversized_headers_get_431(frontend: RoleProcess, origins: tuple[Origin, Origin]) -> None:
    route(frontend, {"blog": [origins[0].address]})
    port = http_port(frontend)
    big = f"GET /echo HTTP/1.1\r\nHost: {BLOG}\r\nX-Big: {'a' * 20000}\r\n\r\n".encode()
    assert raw(port, big).startswith(b"HTTP/1.1 431 ")
    many = f"GET /echo HTTP/1.1\r\nHost: {BLOG}\r\n".encode() + b"".join(
        b"X-%d: 1\r\n" % i for i in range(200)
    )
    assert raw(port, many + b"\r\n").startswith(b"HTTP/1.1 431 ")
    # A header that never ends is cut off too, not buffered forever.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {BLOG}\r\nX-Endless: ".encode())
        with pytest.raises(OSError):
            for _ in range(100):
                sock.sendall(b"a" * 4096)
                time.sleep(0.001)
        assert sock.recv(100).startswith(b"HTTP/1.1 431 ")


def test_idle_keep_alive_connections_are_closed(
    frontend: RoleProcess, origins: tuple[Origin, Origin]
) -> None:
    route(frontend, {"blog": [origins[0].address]})
    conn = http_conn(frontend)
    assert fetch(conn, "/big?n=3")[0] == 200
    assert conn.sock is not None
    conn.sock.settimeout(5)
    started = time.monotonic()
    assert conn.sock.recv(1) == b""  # closed by the frontend, without a response
    assert 1.0 <= time.monotonic() - started < 4
    conn.close()


def test_slow_headers_get_408(frontend: RoleProcess, origins: tuple[Origin, Origin]) -> None:
    route(frontend, {"blog": [origins[0].address]})
    started = time.monotonic()
    out = raw(http_port(frontend), f"GET /echo HTTP/1.1\r\nHost: {BLOG}\r\n".encode())
    assert out.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in out
    assert 0.5 <= time.monotonic() - started < 4


# -- upstream failures ------------------------------------------------------------------------------


def test_worker_down_gives_502(frontend: RoleProcess, cloud: CloudPKI) -> None:
    route(frontend, {"blog": [f"localhost:{free_port()}"]})
    conn = https_conn(frontend, cloud)
    status, _, body = fetch(conn, "/echo")
    assert status == 502 and b"could not be reached" in body
    conn.close()


def test_worker_too_slow_gives_504(frontend: RoleProcess, origins: tuple[Origin, Origin]) -> None:
    route(frontend, {"blog": [origins[0].address]})
    conn = http_conn(frontend)
    started = time.monotonic()
    status, _, body = fetch(conn, "/sleep?s=4")
    assert status == 504 and b"too long" in body
    assert time.monotonic() - started < 3.5
    conn.close()


def test_get_moves_on_when_a_worker_refuses(frontend: RoleProcess, origins: tuple[Origin, Origin]) -> None:
    a, _ = origins
    route(frontend, {"blog": [f"localhost:{free_port()}", a.address]})
    for _ in range(4):
        conn = http_conn(frontend)
        status, _, body = fetch(conn, "/echo")
        assert status == 200 and json.loads(body)["origin"] == "a"
        conn.close()


# -- pooling and balancing --------------------------------------------------------------------------


def test_keep_alive_reuses_both_connections(
    frontend: RoleProcess, cloud: CloudPKI, origins: tuple[Origin, Origin]
) -> None:
    a, _ = origins
    route(frontend, {"blog": [a.address]})
    conn = https_conn(frontend, cloud)
    _, _, first = fetch(conn, "/echo")
    client_sock = conn.sock
    _, _, second = fetch(conn, "/echo", method="POST", body=b"hello")
    assert conn.sock is client_sock  # one client connection
    assert json.loads(first)["peer_port"] == json.loads(second)["peer_port"]  # one pooled worker connection
    conn.close()
    health = frontend.health()
    assert health["upstream_connections"] >= 1 and health["sites"] == 1


def test_balancing_prefers_the_least_busy_worker(
    frontend: RoleProcess, origins: tuple[Origin, Origin]
) -> None:
    a, b = origins
    route(frontend, {"blog": [a.address, b.address]})
    conn = http_conn(frontend)
    served = [json.loads(fetch(conn, "/echo")[2])["origin"] for _ in range(6)]
    assert served.count("a") == 3 and served.count("b") == 3  # idle workers: round robin

    slow: list[str] = []

    def slow_call() -> None:
        c = http_conn(frontend)
        slow.append(json.loads(fetch(c, "/sleep?s=1")[2])["origin"])
        c.close()

    wait_until(lambda: a.in_flight + b.in_flight == 0, what="earlier tests' requests to end")
    thread = threading.Thread(target=slow_call)
    thread.start()
    wait_until(lambda: a.in_flight + b.in_flight == 1, what="a slow request in flight")
    busy = "a" if a.in_flight else "b"
    served = [json.loads(fetch(conn, "/echo")[2])["origin"] for _ in range(4)]
    thread.join()
    assert slow == [busy] and busy not in served
    conn.close()


def test_a_site_of_one_instance_is_served_by_its_first_worker_and_the_next_only_while_it_cannot(
    frontend: RoleProcess, origins: tuple[Origin, Origin]
) -> None:
    """One instance, one app: balanced over two workers, its SQLite database and PHP sessions would
    be two. The second worker stands by."""
    a, b = origins
    route(frontend, {"blog": [a.address, b.address]}, active=1)
    conn = http_conn(frontend)
    served = [json.loads(fetch(conn, "/echo")[2])["origin"] for _ in range(6)]
    assert served == ["a"] * 6
    conn.close()
    # The first refuses connections (its host is gone): the one standing by takes the requests.
    dead = f"localhost:{free_port()}"
    route(frontend, {"blog": [dead, b.address]}, active=1)
    conn = http_conn(frontend)
    served = [json.loads(fetch(conn, "/echo")[2])["origin"] for _ in range(4)]
    assert served == ["b"] * 4
    conn.close()
    # Two instances of three workers: the first two share the requests, the third stands by.
    route(frontend, {"blog": [b.address, a.address, dead]}, active=2)
    conn = http_conn(frontend)
    served = [json.loads(fetch(conn, "/echo")[2])["origin"] for _ in range(6)]
    assert served.count("a") == 3 and served.count("b") == 3
    conn.close()


def test_a_new_snapshot_reroutes_without_a_restart(
    frontend: RoleProcess, cloud: CloudPKI, origins: tuple[Origin, Origin]
) -> None:
    a, b = origins
    pid = frontend.health()["pid"]
    route(frontend, {"blog": [a.address]})
    conn = https_conn(frontend, cloud)
    assert json.loads(fetch(conn, "/echo")[2])["origin"] == "a"
    route(frontend, {"blog": [b.address], "shop": [a.address]})
    assert json.loads(fetch(conn, "/echo")[2])["origin"] == "b"  # same client connection
    assert json.loads(fetch(conn, "/echo", host=f"shop.{DOMAIN}")[2])["origin"] == "a"
    route(frontend, {"shop": [a.address]})
    status, _, body = fetch(conn, "/echo")
    assert status == 404 and b"No site here" in body
    conn.close()
    health = frontend.health()
    assert health["pid"] == pid and health["sites"] == 1 and health["https"] is True


def test_a_get_waiting_on_a_worker_that_leaves_the_routes_goes_to_another(
    cloud: CloudPKI, origins: tuple[Origin, Origin], tmp_path: Path
) -> None:
    """A worker cut off the network never answers: when the controller routes around it, requests
    that may be sent again move to a current worker instead of waiting out the response timeout."""
    a, b = origins
    proc = RoleProcess(_frontend_config(cloud, tmp_path / "fe", response_timeout=30.0), cloud)
    with proc.running():
        route(proc, {"blog": [a.address]})
        wait_until(lambda: a.in_flight == 0, what="earlier requests to a to end")
        result: dict[str, Any] = {}

        def slow_get() -> None:
            conn = https_conn(proc, cloud)
            status, _, body = fetch(conn, "/sleep?s=25&on=a")
            result.update(status=status, origin=json.loads(body)["origin"])
            conn.close()

        def slow_post() -> None:
            conn = https_conn(proc, cloud)
            status, _, body = fetch(conn, "/sleep?s=2&on=a", method="POST", body=b"once")
            result.update(post_status=status, post_origin=json.loads(body)["origin"])
            conn.close()

        threads = [threading.Thread(target=slow_get), threading.Thread(target=slow_post)]
        for t in threads:
            t.start()
        wait_until(lambda: a.in_flight == 2, what="both requests waiting on a")
        route(proc, {"blog": [b.address]})
        for t in threads:
            t.join(15)
        # The GET was sent again to b at once; the POST, which must never be sent twice, finished on a.
        assert (result["status"], result["origin"]) == (200, "b")
        assert (result["post_status"], result["post_origin"]) == (200, "a")


# -- lifecycle --------------------------------------------------------------------------------------


def test_drain_on_stop_and_last_known_good_on_start(
    cloud: CloudPKI, origins: tuple[Origin, Origin], tmp_path: Path
) -> None:
    a, _ = origins
    proc = RoleProcess(_frontend_config(cloud, tmp_path / "fe", drain_timeout=5.0), cloud).start()
    try:
        route(proc, {"blog": [a.address]})
        result: list[int] = []

        def slow_call() -> None:
            c = http_conn(proc)
            result.append(fetch(c, "/sleep?s=0.5")[0])
            c.close()

        thread = threading.Thread(target=slow_call)
        thread.start()
        wait_until(lambda: a.in_flight == 1, what="a request in flight")
        assert proc.stop() == 0
        thread.join()
        assert result == [200]  # the request in flight finished before the process left

        proc.start()  # no push: it serves from the persisted snapshot
        conn = http_conn(proc)
        status, _, body = fetch(conn, "/echo")
        assert status == 200 and json.loads(body)["origin"] == "a"
        conn.close()
    finally:
        proc.stop()


def test_a_swapped_address_is_served_by_the_other_slot_s_workers_under_its_name() -> None:
    snapshot: dict[str, Any] = {
        "domain": "sites.localhost",
        "sites": {
            "app": {"workers": ["web2:7412"], "serve_as": "app-staging", "hostnames": ["www.app.example"]},
            "app-staging": {"workers": ["web1:7412"], "serve_as": "app"},
            "bad": {"workers": ["web1:7412"], "serve_as": "../etc"},
        },
    }
    routes = build_routes(
        FrontendSnapshot.parse({"version": 1, **snapshot}),
        lambda h, p, t: Upstream(h, p, t),
        lambda s: [0, 0, 0],
    )
    production = routes.hosts[b"app.sites.localhost"]
    assert routes.hosts[b"www.app.example"] is production
    # Workers are told the site by the name they know its content under; retries find it by address.
    assert (production.name, production.address) == ("app-staging", "app")
    assert production.header == b"X-Sitecloud-Site: app-staging\r\n"
    assert [(u.host, u.port) for u in production.upstreams] == [("web2", 7412)]
    assert routes.hosts[b"app-staging.sites.localhost"].name == "app"
    # A name that is not a site's fails that entry alone.
    assert "bad" in routes.failed and routes.sites == 2


def test_visitors_that_stop_reading_are_cut_past_the_bound_longest_stalled_first(
    cloud: CloudPKI, origins: tuple[Origin, Origin], tmp_path: Path
) -> None:
    # Each visitor that stops reading a big answer holds about a megabyte of the front end (the answer
    # read ahead from the worker, TLS buffers): past max_stalled_readers, the longest stalled go.
    a, _ = origins
    proc = RoleProcess(
        _frontend_config(cloud, tmp_path / "fe", max_stalled_readers=2, stalled_grace=0.5, body_timeout=60.0),
        cloud,
    )
    with proc.running():
        route(proc, {"blog": [a.address]})
        port = http_port(proc)
        stalled: list[socket.socket] = []
        try:
            for _ in range(5):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", port))
                sock.sendall(f"GET /big?n={50 * 1024 * 1024} HTTP/1.1\r\nHost: {BLOG}\r\n\r\n".encode())
                stalled.append(sock)
                time.sleep(0.3)  # each stalls after the one before: the first ones go first

            def cut() -> list[int]:
                return [i for i, s in enumerate(stalled) if _closed_by_peer(s)]

            assert wait_until(lambda: len(cut()) >= 3 and cut(), timeout=15, what="3 cut") == [0, 1, 2]
            assert proc.health()["stalled_readers_cut"] >= 3
            # Others are served as ever.
            conn = http_conn(proc)
            try:
                status, _, body = fetch(conn, "/echo")
            finally:
                conn.close()
            assert status == 200 and json.loads(body)["origin"] == "a"
        finally:
            for sock in stalled:
                sock.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer closed or reset ``sock`` (what was sent before is drained, unread)."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)
