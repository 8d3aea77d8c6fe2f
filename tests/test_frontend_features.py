"""Frontend routing features as a real process: affinity, WebSockets, per-site limits and redirects,
custom hostnames by SNI, strict parsing, streaming in bounded memory, usage reports, a 100k-site table,
and several serving processes.

The upstreams are the test origins of tests/test_frontend.py (HTTPS with a worker certificate, mTLS).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from roles.frontend.config import FrontendConfig
from shared.net import free_port
from tests.support import CloudPKI, RoleProcess, wait_until
from tests.test_frontend import (
    BLOG,
    DOMAIN,
    Origin,
    _frontend_config,
    _SNIConnection,
    fetch,
    http_conn,
    http_port,
    https_conn,
    raw,
)

_versions = iter(range(1, 1_000_000))


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> CloudPKI:
    return CloudPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def origins(cloud: CloudPKI) -> Iterator[tuple[Origin, Origin]]:
    a, b = Origin(cloud, "a").start(), Origin(cloud, "b").start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def frontend(
    cloud: CloudPKI, origins: tuple[Origin, Origin], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RoleProcess]:
    proc = RoleProcess(_frontend_config(cloud, tmp_path_factory.mktemp("frontend")), cloud)
    with proc.running():
        yield proc


def push(frontend: RoleProcess, sites: dict[str, dict[str, Any]]) -> None:
    # A 100k-site snapshot takes seconds to apply, many more on a loaded CI host.
    frontend.push_config({"version": next(_versions), "domain": DOMAIN, "sites": sites}, timeout=120)


def _origin_of(body: bytes) -> str:
    return str(json.loads(body)["origin"])


# -- affinity ---------------------------------------------------------------------------------------


def test_affinity_cookie_keeps_a_visitor_on_one_worker(
    frontend: RoleProcess, cloud: CloudPKI, origins: tuple[Origin, Origin]
) -> None:
    a, b = origins
    push(frontend, {"blog": {"workers": [a.address, b.address], "affinity": True}})
    conn = https_conn(frontend, cloud)
    status, resp, body = fetch(conn, "/echo")
    assert status == 200
    cookie = resp.getheader("Set-Cookie", "")
    assert cookie.startswith("SitecloudAffinity=") and "HttpOnly" in cookie and "Secure" in cookie
    first = _origin_of(body)
    pair = cookie.split(";", 1)[0]
    # With the cookie every request goes to the same worker, and no new cookie is set.
    for _ in range(6):
        status, resp, body = fetch(conn, "/echo", headers={"Cookie": f"theme=dark; {pair}"})
        assert status == 200 and _origin_of(body) == first and resp.getheader("Set-Cookie") is None
    # Without it, balancing goes on as usual (both workers serve), each answer with its cookie.
    served = set()
    for _ in range(4):
        status, resp, body = fetch(conn, "/echo")
        served.add(_origin_of(body))
        assert resp.getheader("Set-Cookie", "").startswith("SitecloudAffinity=")
    assert served == {"a", "b"}
    # A cookie naming no worker of this site gets a fresh one.
    status, resp, _ = fetch(conn, "/echo", headers={"Cookie": "SitecloudAffinity=0000"})
    assert status == 200 and resp.getheader("Set-Cookie", "").startswith("SitecloudAffinity=")
    conn.close()
    # The cookie also pins a WebSocket upgrade.
    for _ in range(3):
        with _ws_connect(http_port(frontend), BLOG, cookie=pair) as ws:
            ws.send("hi")
            assert ws.recv() == f"{first}:hi"
    # A site without affinity sets no cookie.
    push(frontend, {"blog": {"workers": [a.address, b.address]}})
    conn = http_conn(frontend)
    status, resp, _ = fetch(conn, "/echo")
    conn.close()
    assert status == 200 and resp.getheader("Set-Cookie") is None


# -- WebSocket --------------------------------------------------------------------------------------


class _WebSocket:
    """A minimal RFC 6455 client on a socket: text frames only."""

    def __init__(self, sock: socket.socket, head: bytes, rest: bytes) -> None:
        self.sock = sock
        self.head = head
        self._buf = rest

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def send(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        masked = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        if len(payload) < 126:
            header = bytes([0x81, 0x80 | len(payload)])
        else:
            header = bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big")
        self.sock.sendall(header + mask + masked)

    def recv(self) -> str:
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._read(2), "big")
        elif n == 127:
            n = int.from_bytes(self._read(8), "big")
        assert b0 & 0x0F == 1, f"not a text frame: {b0:#x}"
        return self._read(n).decode()

    def __enter__(self) -> _WebSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def _ws_connect(
    port: int, host: str, *, cookie: str = "", tls: ssl.SSLContext | None = None, path: str = "/ws"
) -> _WebSocket:
    sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=5)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=host)
    key = base64.b64encode(os.urandom(16)).decode()
    extra = f"Cookie: {cookie}\r\n" if cookie else ""
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n".encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed during the handshake: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return _WebSocket(sock, head, rest)


def test_websocket_echo_through_the_frontend(
    frontend: RoleProcess, cloud: CloudPKI, origins: tuple[Origin, Origin]
) -> None:
    a, _ = origins
    push(frontend, {"blog": {"workers": [a.address]}})
    config = frontend.config
    assert isinstance(config, FrontendConfig)
    for port, tls in ((config.http_port, None), (config.https_port, cloud.client_ssl(None))):
        with _ws_connect(port, BLOG, tls=tls) as ws:
            assert ws.head.startswith(b"HTTP/1.1 101 ")
            lowered = ws.head.lower()
            assert b"upgrade: websocket" in lowered and b"connection: upgrade" in lowered
            assert b"sec-websocket-accept:" in lowered
            for text in ("hello", "x" * 5000, "last"):
                ws.send(text)
                assert ws.recv() == f"a:{text}"
    # A plain GET to the WebSocket endpoint is not upgraded, and the connection lives on.
    conn = http_conn(frontend)
    status, _, _ = fetch(conn, "/ws")
    assert status in (400, 405, 426)
    assert fetch(conn, "/echo")[0] == 200
    conn.close()
    # An upgrade the worker refuses is answered and the connection closed (no tunnel).
    with _ws_connect(config.http_port, BLOG, path="/status/404") as ws:
        assert ws.head.startswith(b"HTTP/1.1 404 ") and b"Connection: close" in ws.head


# -- retry rules ------------------------------------------------------------------------------------


def test_a_post_is_never_sent_twice(frontend: RoleProcess, origins: tuple[Origin, Origin]) -> None:
    a, b = origins
    push(frontend, {"blog": {"workers": [a.address]}})
    before = a.requests
    conn = http_conn(frontend)
    status, _, body = fetch(conn, "/drop", method="POST", body=b"pay once")
    assert status == 502 and b"could not be reached" in body
    conn.close()
    assert a.requests == before + 1  # it reached the worker once, and was not sent again
    # Two workers: the POST that a worker dropped is not moved to the other either.
    push(frontend, {"blog": {"workers": [a.address, b.address]}})
    seen = a.requests + b.requests
    conn = http_conn(frontend)
    assert fetch(conn, "/drop", method="POST", body=b"pay once")[0] == 502
    conn.close()
    assert a.requests + b.requests == seen + 1


# -- limits -----------------------------------------------------------------------------------------


def test_body_size_limit_per_site_gives_413(frontend: RoleProcess, origins: tuple[Origin, Origin]) -> None:
    a, _ = origins
    push(
        frontend,
        {"blog": {"workers": [a.address], "max_body_bytes": 1000}, "big": {"workers": [a.address]}},
    )
    conn = http_conn(frontend)
    status, _, body = fetch(conn, "/echo", method="POST", body=b"x" * 1000)
    assert status == 200 and json.loads(body)["body_len"] == 1000
    conn.close()
    before = a.requests
    port = http_port(frontend)
    out = raw(
        port, f"POST /echo HTTP/1.1\r\nHost: {BLOG}\r\nContent-Length: 1001\r\n\r\n".encode() + b"x" * 1001
    )
    assert out.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in out
    assert a.requests == before  # refused from the Content-Length alone
    # A chunked body is counted as it arrives.
    chunked = b"".join(b"%x\r\n%s\r\n" % (300, b"y" * 300) for _ in range(5)) + b"0\r\n\r\n"
    out = raw(
        port, f"POST /sink HTTP/1.1\r\nHost: {BLOG}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunked
    )
    assert out.startswith(b"HTTP/1.1 413 ")
    # Another site has no limit.
    conn = http_conn(frontend)
    status, _, body = fetch(conn, "/sink", method="POST", body=b"z" * 5000, host=f"big.{DOMAIN}")
    assert status == 200 and json.loads(body)["body_len"] == 5000
    conn.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST /echo HTTP/1.1\r\nHost: H\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="cl-and-te",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nHost: H\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            id="duplicate-cl",
        ),
        pytest.param(b"POST /echo HTTP/1.1\r\nHost: H\r\nContent-Length: 5, 5\r\n\r\nhello", id="cl-list"),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            id="bad-chunk-size",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
            id="negative-chunk",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
            id="chunk-size-space",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            id="chunk-overflow",
        ),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: H\r\nX-A: 1\r\n folded\r\n\r\n", id="obs-fold"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: H\r\nX-A : 1\r\n\r\n", id="space-before-colon"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: H\r\nX\tA: 1\r\n\r\n", id="tab-in-name"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: H\r\nX-A: a\x00b\r\n\r\n", id="nul-in-value"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: H\r\nX-A: a\x01b\r\n\r\n", id="control-in-value"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: H\r\nX-A: a\rb\r\n\r\n", id="bare-cr-in-value"),
        pytest.param(b"GET /echo HTTP/1.1\r\n Host: H\r\n\r\n", id="leading-space"),
        pytest.param(b"GET /echo HTTP/1.1\nHost: H\n\n", id="bare-lf"),
        pytest.param(b"GET /a\x01b HTTP/1.1\r\nHost: H\r\n\r\n", id="control-in-target"),
    ],
)
def test_smuggling_vectors_get_400(
    frontend: RoleProcess, origins: tuple[Origin, Origin], request_bytes: bytes
) -> None:
    a, _ = origins
    push(frontend, {"blog": {"workers": [a.address]}})
    before = a.requests
    out = raw(http_port(frontend), request_bytes.replace(b"Host: H", b"Host: " + BLOG.encode()))
    assert out.startswith(b"HTTP/1.1 400 "), out[:80]
    assert b"Connection: close" in out and out.count(b"HTTP/1.1 ") == 1
    assert a.requests == before


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_200_mb_body_streams_through_in_bounded_memory(
    frontend: RoleProcess, origins: tuple[Origin, Origin]
) -> None:
    a, _ = origins
    push(frontend, {"blog": {"workers": [a.address]}})
    pid = frontend.health()["pid"]
    before = _rss_kb(pid)
    size = 200 * 1024 * 1024
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    for _ in range(size // len(block)):
        digest.update(block)
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kb(pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with socket.create_connection(("127.0.0.1", http_port(frontend)), timeout=30) as sock:
            sock.sendall(f"POST /sink HTTP/1.1\r\nHost: {BLOG}\r\nContent-Length: {size}\r\n\r\n".encode())
            for _ in range(size // len(block)):
                sock.sendall(block)
            answer = b""
            while b"}" not in answer:
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
    finally:
        done.set()
        watcher.join()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    echo = json.loads(body)
    assert echo["body_len"] == size and echo["body_sha"] == digest.hexdigest()
    growth_mb = (peak[0] - before) / 1024
    print(f"frontend RSS grew by {growth_mb:.1f} MB while 200 MB went through")
    assert growth_mb < 64


# -- HTTPS redirect and custom hostnames ------------------------------------------------------------


def test_https_only_sites_redirect_plain_http(
    frontend: RoleProcess, cloud: CloudPKI, origins: tuple[Origin, Origin]
) -> None:
    a, _ = origins
    push(frontend, {"blog": {"workers": [a.address], "https_only": True}, "open": {"workers": [a.address]}})
    config = frontend.config
    assert isinstance(config, FrontendConfig)
    before = a.requests
    conn = http_conn(frontend)
    status, resp, _ = fetch(conn, "/echo?x=1", host=f"Blog.{DOMAIN}:{config.http_port}")
    assert status == 301
    assert resp.getheader("Location") == f"https://{BLOG}:{config.https_port}/echo?x=1"
    status, resp, _ = fetch(conn, "/echo", method="POST", body=b"data")
    assert status == 308 and resp.getheader("Location") == f"https://{BLOG}:{config.https_port}/echo"
    assert fetch(conn, "/echo", host=f"open.{DOMAIN}")[0] == 200  # a site that did not opt in
    conn.close()
    assert a.requests == before + 1
    tls = https_conn(frontend, cloud)
    assert fetch(tls, "/echo")[0] == 200
    tls.close()


def test_custom_hostnames_are_routed_and_get_their_own_certificate_by_sni(
    frontend: RoleProcess, cloud: CloudPKI, origins: tuple[Origin, Origin], tmp_path: Path
) -> None:
    a, b = origins
    # The tenant's certificate comes from elsewhere (here: another CA), not from the cloud CA.
    other_ca = CloudPKI(tmp_path / "tenant-ca")
    issued = other_ca.ca.issue("www.tenant.example", dns_names=["www.tenant.example"])
    key_file, cert_file = tmp_path / "t.key", tmp_path / "t.pem"
    issued.write(key_file, cert_file)
    push(
        frontend,
        {
            "blog": {
                "workers": [a.address],
                "hostnames": [
                    {
                        "name": "www.tenant.example",
                        "cert": cert_file.read_text(),
                        "key": key_file.read_text(),
                    },
                    "tenant.example",
                ],
            },
            "shop": {
                "workers": [b.address],
                "hostnames": [{"name": "BAD.example", "cert": "nope", "key": "nope"}],
            },
        },
    )
    config = frontend.config
    assert isinstance(config, FrontendConfig)
    tenant_ctx = other_ca.client_ssl(None)
    custom = _SNIConnection(config.https_port, "www.tenant.example", tenant_ctx)
    status, _, body = fetch(custom, "/echo", host="www.tenant.example")
    assert status == 200 and _origin_of(body) == "a"
    assert isinstance(custom.sock, ssl.SSLSocket)
    peer = custom.sock.getpeercert()
    assert peer is not None and ("DNS", "www.tenant.example") in peer["subjectAltName"]
    custom.close()
    # The platform's names still get the wildcard (verified against the cloud CA).
    conn = https_conn(frontend, cloud)
    assert fetch(conn, "/echo")[0] == 200
    conn.close()
    # A hostname without a certificate of its own is routed too (here over plain HTTP).
    conn = http_conn(frontend)
    status, _, body = fetch(conn, "/echo", host="tenant.example")
    assert status == 200 and _origin_of(body) == "a"
    # A site entry with a broken hostname fails alone (the platform's 503 page); the others still apply.
    assert fetch(conn, "/echo", host=f"shop.{DOMAIN}")[0] == 503
    conn.close()
    health = frontend.health()
    assert health["sites"] == 1 and health["hostnames"] == 4
    assert health["status"] == "degraded" and "'shop'" in health["reason"]


def test_stopped_and_suspended_sites_get_a_page_saying_so_not_no_site_here(
    frontend: RoleProcess, cloud: CloudPKI, origins: tuple[Origin, Origin], tmp_path: Path
) -> None:
    # Before, a stopped site's visitors got "No site here ... check the address you typed" (404).
    a, _ = origins
    other_ca = CloudPKI(tmp_path / "tenant-ca")
    issued = other_ca.ca.issue("www.shop.example", dns_names=["www.shop.example"])
    key_file, cert_file = tmp_path / "t.key", tmp_path / "t.pem"
    issued.write(key_file, cert_file)
    frontend.push_config(
        {
            "version": next(_versions),
            "domain": DOMAIN,
            "sites": {"blog": {"workers": [a.address], "hostnames": ["blog.example"]}},
            "offline": {
                "shop": {
                    "state": "stopped",
                    "hostnames": [
                        {
                            "name": "www.shop.example",
                            "cert": cert_file.read_text(),
                            "key": key_file.read_text(),
                        }
                    ],
                },
                "news": {"state": "suspended", "hostnames": ["news.example"]},
                # A name a serving site holds stays that site's.
                "old": {"state": "stopped", "hostnames": ["blog.example"]},
            },
        }
    )
    conn = https_conn(frontend, cloud, f"shop.{DOMAIN}")
    status, resp, body = fetch(conn, "/cart", host=f"shop.{DOMAIN}")
    assert status == 403 and b"This site is stopped" in body, body
    assert resp.getheader("Cache-Control") == "no-store"
    conn.close()
    # Its custom hostname is answered with its own certificate, with the same page.
    config = frontend.config
    assert isinstance(config, FrontendConfig)
    custom = _SNIConnection(config.https_port, "www.shop.example", other_ca.client_ssl(None))
    status, _, body = fetch(custom, "/", host="www.shop.example")
    assert status == 403 and b"This site is stopped" in body, body
    custom.close()
    conn = http_conn(frontend)
    for host in (f"news.{DOMAIN}", "news.example"):
        status, _, body = fetch(conn, "/", host=host)
        assert status == 403 and b"This site is suspended" in body, (host, body)
        # The state and nothing more: no tenant, plan, reason or address.
        assert b"news" not in body and b"subscription" not in body.lower()
    assert fetch(conn, "/", host=f"gone.{DOMAIN}")[0] == 404
    status, _, body = fetch(conn, "/echo", host="blog.example")
    assert status == 200 and _origin_of(body) == "a"
    conn.close()
    health = frontend.health()
    assert health["sites"] == 1 and health["status"] != "degraded", health


def test_a_100k_site_snapshot_applies_and_routes(
    frontend: RoleProcess, origins: tuple[Origin, Origin]
) -> None:
    a, b = origins
    pid = frontend.health()["pid"]
    before = _rss_kb(pid)
    sites: dict[str, dict[str, Any]] = {
        f"s{i}": {"workers": [a.address if i % 2 else b.address], "hostnames": [f"www.s{i}.example"]}
        for i in range(100_000)
    }
    started = time.monotonic()
    push(frontend, sites)
    took = time.monotonic() - started
    health = frontend.health()
    print(
        f"100k sites (200k hostnames): push+apply {took:.2f} s, RSS +{(_rss_kb(pid) - before) / 1024:.0f} MB"
    )
    assert health["sites"] == 100_000 and health["hostnames"] == 200_000
    conn = http_conn(frontend)
    for i in (0, 1, 54_321, 99_999):
        status, _, body = fetch(conn, "/echo", host=f"s{i}.{DOMAIN}")
        assert status == 200 and _origin_of(body) == ("a" if i % 2 else "b")
        status, _, body = fetch(conn, "/echo", host=f"www.s{i}.example")
        assert status == 200 and json.loads(body)["path"] == "/echo"
    assert fetch(conn, "/echo", host=f"s100000.{DOMAIN}")[0] == 404
    conn.close()
    push(frontend, {"blog": {"workers": [a.address]}})
    assert frontend.health()["sites"] == 1


# -- usage metering ---------------------------------------------------------------------------------


class _Controller:
    """Takes usage reports as the controller would (mTLS, controller certificate), on its own thread."""

    def __init__(self, pki: CloudPKI, port: int) -> None:
        self.port = port
        self.reports: list[dict[str, Any]] = []
        cert, key = pki.identity("controller")
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.load_cert_chain(cert, key)
        self._ssl.load_verify_locations(pki.ca_file)
        self._ssl.verify_mode = ssl.CERT_REQUIRED
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _usage(self, request: web.Request) -> web.Response:
        self.reports.append(await request.json())
        return web.json_response({"ok": True})

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/usage", self._usage)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ssl).start()

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def total(self, site: str) -> dict[str, int]:
        out = {"requests": 0, "bytes_in": 0, "bytes_out": 0}
        for report in self.reports:
            for key, value in report["sites"].get(site, {}).items():
                out[key] += value
        return out


def test_usage_is_counted_and_reported_even_after_the_controller_was_down(
    cloud: CloudPKI, origins: tuple[Origin, Origin], tmp_path: Path
) -> None:
    a, _ = origins
    port = free_port()
    config = _frontend_config(
        cloud, tmp_path / "fe", controller_url=f"https://localhost:{port}", usage_interval=0.2
    )
    proc = RoleProcess(config, cloud).start()
    controller = _Controller(cloud, port)
    try:
        proc.push_config({"version": 1, "domain": DOMAIN, "sites": {"blog": {"workers": [a.address]}}})
        conn = http_conn(proc)
        for _ in range(3):
            assert fetch(conn, "/echo", method="POST", body=b"12345")[0] == 200
        assert fetch(conn, "/echo", host=f"nosuch.{DOMAIN}")[0] == 404  # no site: not metered
        conn.close()
        time.sleep(0.5)  # a report or two fails: nothing listens yet
        pending = proc.health()["usage_pending"]
        assert pending["requests"] == 3 and pending["bytes_in"] > 15 and pending["bytes_out"] > 0
        controller.start()
        wait_until(lambda: controller.total("blog")["requests"] == 3, timeout=10, what="the usage report")
        total = controller.total("blog")
        assert total["bytes_in"] == pending["bytes_in"] and total["bytes_out"] == pending["bytes_out"]
        assert len(controller.reports) == 1  # the report that failed, sent again as it was
        report = controller.reports[-1]
        assert report["role"] == "frontend" and report["host"] == "localhost" and report["id"]
        assert set(report) >= {"from", "to", "pid", "sites"} and "nosuch" not in report["sites"]
        wait_until(lambda: proc.health()["usage_pending"]["requests"] == 0, what="counters to drain")
    finally:
        proc.stop()
        controller.stop()


# -- several serving processes ----------------------------------------------------------------------


def test_two_serving_processes_share_the_ports_and_follow_snapshots(
    cloud: CloudPKI, origins: tuple[Origin, Origin], tmp_path: Path
) -> None:
    a, b = origins
    proc = RoleProcess(_frontend_config(cloud, tmp_path / "fe2", processes=2), cloud).start()
    try:
        health = proc.health()
        assert health["processes"] == 2
        wait_until(lambda: len(proc.health()["serving_pids"]) == 2, what="two serving processes")
        proc.push_config({"version": 5, "domain": DOMAIN, "sites": {"blog": {"workers": [a.address]}}})

        def all_serve(origin: str) -> bool:
            # New connections land on either process; every one of them must route the same.
            answers = set()
            for _ in range(8):
                conn = http_conn(proc)
                status, _, body = fetch(conn, "/echo")
                conn.close()
                answers.add(_origin_of(body) if status == 200 else str(status))
            return answers == {origin}

        wait_until(lambda: all_serve("a"), timeout=10, what="both processes on version 5")
        proc.push_config({"version": 6, "domain": DOMAIN, "sites": {"blog": {"workers": [b.address]}}})
        wait_until(lambda: all_serve("b"), timeout=10, what="both processes on version 6")
        # A serving process that dies is replaced.
        victim = proc.health()["serving_pids"][0]
        os.kill(victim, 9)
        wait_until(
            lambda: len(pids := proc.health()["serving_pids"]) == 2 and victim not in pids,
            timeout=10,
            what="the serving process restarted",
        )
        wait_until(lambda: all_serve("b"), timeout=10, what="the new process serving version 6")
        # The main process killed outright: its serving processes do not linger on the ports.
        pids = proc.health()["serving_pids"]
        proc.kill()
        wait_until(lambda: not any(_running(pid) for pid in pids), timeout=10, what="orphans to leave")
    finally:
        proc.stop()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
