"""The front end's per-address connection limit (max_connections_per_ip): a real front end process and
raw sockets on both listeners; the count itself as a unit (IPv6 per /64, the log line once a minute);
the admin's setting from cloud.json."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from roles.controller.config import CloudConfig
from roles.controller.home import CloudHome
from roles.frontend._admission import AddressLimit
from roles.frontend.config import FrontendConfig
from shared.errors import InvalidInput
from shared.logs import get_logger
from shared.metrics import HttpCounts
from shared.net import free_port
from tests.support import CloudPKI, RoleProcess, wait_until
from tests.test_metrics import scrape, value

DOMAIN = "sites.test"
LIMIT = 4


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CloudPKI:
    return CloudPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def frontend(pki: CloudPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoleProcess]:
    # Long read and handshake timeouts: the connections held here stay open until the test closes them.
    config = pki.role_config(
        FrontendConfig,
        "frontend",
        tmp_path_factory.mktemp("frontend"),
        max_connections_per_ip=LIMIT,
        header_timeout=30.0,
        handshake_timeout=30.0,
        metrics_port=free_port(),
        usage_interval=0,
    )
    pki.ca.issue_wildcard(DOMAIN).write(config.wildcard_key_file, config.wildcard_cert_file)
    proc = RoleProcess(config, pki)
    with proc.running():
        proc.push_config({"version": 1, "domain": DOMAIN, "sites": {}})
        yield proc


def _ports(frontend: RoleProcess) -> tuple[int, int]:
    config = frontend.config
    assert isinstance(config, FrontendConfig)
    return config.http_port, config.https_port


def _read_all(sock: socket.socket) -> bytes:
    """What the front end sends before it closes (a reset ends it too)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _healthz_http(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return _read_all(sock)


def _healthz_https(pki: CloudPKI, port: int) -> bytes:
    ctx = pki.client_ssl(None)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=f"x.{DOMAIN}") as sock,
    ):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x.sites.test\r\nConnection: close\r\n\r\n")
        chunks = []
        with contextlib.suppress(ssl.SSLEOFError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


@contextlib.contextmanager
def _held(port: int, n: int) -> Iterator[list[socket.socket]]:
    """``n`` connections that send nothing: idle keep-alives (HTTP), handshakes never begun (HTTPS)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _admitted_again(frontend: RoleProcess) -> None:
    """Wait until the front end has seen the held connections close (a new one is served)."""
    http_port, _ = _ports(frontend)
    wait_until(lambda: _healthz_http(http_port).startswith(b"HTTP/1.1 200 "), what="a connection admitted")


def test_an_address_holding_the_limit_is_refused_on_both_listeners_until_one_closes(
    frontend: RoleProcess, pki: CloudPKI
) -> None:
    http_port, https_port = _ports(frontend)
    # Counted together on both listeners, from accept: TLS connections before any handshake byte.
    with _held(http_port, LIMIT // 2), _held(https_port, LIMIT - LIMIT // 2) as tls_held:
        time.sleep(0.2)  # (accepted by now)
        with socket.create_connection(("127.0.0.1", http_port), timeout=10) as sock:
            refused = _read_all(sock)
        head, _, body = refused.partition(b"\r\n\r\n")
        head += b"\r\n"
        assert head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), refused
        assert b"\r\nRetry-After: 1\r\n" in head and b"\r\nConnection: close\r\n" in head
        assert b"Too many connections" in body
        # A TLS connection is dropped at once, with no handshake: no ServerHello, nothing at all.
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", https_port), timeout=10) as sock:
            assert _read_all(sock) == b""
        assert time.monotonic() - started < 2
        with (
            socket.create_connection(("127.0.0.1", https_port), timeout=10) as raw,
            pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)),
        ):
            pki.client_ssl(None).wrap_socket(raw, server_hostname=f"x.{DOMAIN}")
        # One held connection closes: its place is free again, and a full HTTPS request goes through.
        tls_held.pop().close()
        wait_until(
            lambda: _healthz_https(pki, https_port).startswith(b"HTTP/1.1 200 "),
            what="an HTTPS connection admitted",
        )
    _admitted_again(frontend)
    # With nothing held, well more than the limit one after the other are all served.
    for _ in range(3 * LIMIT):
        assert _healthz_http(http_port).startswith(b"HTTP/1.1 200 ")


def test_refusals_are_counted_in_metrics_and_health_and_logged_once_a_minute(
    frontend: RoleProcess,
) -> None:
    http_port, https_port = _ports(frontend)
    config = frontend.config
    metrics_url = f"http://127.0.0.1:{config.metrics_port}"
    _admitted_again(frontend)
    before = value(scrape(metrics_url, None), "sitecloud_frontend_connections_refused_total")
    logged = frontend.log().count("refusing connections from 127.0.0.1")
    with _held(http_port, LIMIT):
        time.sleep(0.2)
        for port in (http_port, https_port, http_port):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                _read_all(sock)
    _admitted_again(frontend)
    after = value(scrape(metrics_url, None), "sitecloud_frontend_connections_refused_total")
    assert after - before == 3
    assert frontend.health()["connections_refused"] == after
    # At most one line per address per minute (the first test's refusals already logged one).
    assert frontend.log().count("refusing connections from 127.0.0.1") == max(logged, 1) == 1


def test_with_serving_processes_each_holds_the_limit_and_the_main_process_sums_refusals(
    pki: CloudPKI, tmp_path: Path
) -> None:
    config = pki.role_config(
        FrontendConfig,
        "frontend",
        tmp_path / "fe",
        processes=2,
        max_connections_per_ip=1,
        header_timeout=30.0,
        metrics_port=free_port(),
        usage_interval=0,
    )
    pki.ca.issue_wildcard(DOMAIN).write(config.wildcard_key_file, config.wildcard_cert_file)
    proc = RoleProcess(config, pki)
    with proc.running(), _held(config.http_port, 10) as socks:
        # Whichever process accepts each: at most one per process stays open, every other one is told.
        refused = 0
        for sock in socks:
            sock.settimeout(1.0)
            with contextlib.suppress(TimeoutError):
                refused += _read_all(sock).startswith(b"HTTP/1.1 429 ")
        assert 8 <= refused <= 9
        metrics_url = f"http://127.0.0.1:{config.metrics_port}"
        seen: list[float] = []

        def summed() -> bool:
            seen.append(value(scrape(metrics_url, None), "sitecloud_frontend_connections_refused_total"))
            return seen[-1] == refused

        with contextlib.suppress(AssertionError):  # (said below, with what was seen)
            wait_until(summed, timeout=5, what="the refusals summed over the serving processes")
        assert seen and seen[-1] == refused, (refused, seen[-3:])


def _peer(address: str) -> asyncio.BaseTransport:
    """A transport as far as the limit reads it."""
    return asyncio.BaseTransport(extra={"peername": (address, 40000)})


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_count_is_per_ipv4_address_and_per_ipv6_64(caplog: pytest.LogCaptureFixture) -> None:
    counts, clock = HttpCounts(), _Clock()
    limit = AddressLimit(2, counts, get_logger("frontend", host="test"), clock=clock)
    a = [limit.admit(_peer("2001:db8:1:2::1")), limit.admit(_peer("2001:db8:1:2:ffff::9"))]
    assert a == ["2001:db8:1:2::/64"] * 2
    assert limit.admit(_peer("2001:db8:1:2::77")) is None  # the same /64
    assert limit.admit(_peer("2001:db8:1:3::1")) == "2001:db8:1:3::/64"  # the next one is another host
    assert limit.admit(_peer("::ffff:192.0.2.1")) == "192.0.2.1"
    assert limit.admit(_peer("192.0.2.2")) == "192.0.2.2"
    limit.release("2001:db8:1:2::/64")
    assert limit.admit(_peer("2001:db8:1:2::5")) == "2001:db8:1:2::/64"
    for key in ("2001:db8:1:2::/64", "2001:db8:1:2::/64", "2001:db8:1:3::/64", "192.0.2.1", "192.0.2.2"):
        limit.release(key)
    assert limit.open == {}  # nothing left behind for addresses that left
    assert counts.refused_connections == 1
    # One log line per address per minute, however many it is refused.
    caplog.clear()
    held = [limit.admit(_peer("198.51.100.7")) for _ in range(2)]
    for _ in range(5):
        assert limit.admit(_peer("198.51.100.7")) is None
    clock.now += 61
    assert limit.admit(_peer("198.51.100.7")) is None
    assert [r.getMessage().count("198.51.100.7") for r in caplog.records] == [1, 1]
    assert counts.refused_connections == 7 and held == ["198.51.100.7"] * 2
    # 0: no limit, nothing counted.
    off = AddressLimit(0, counts, get_logger("frontend", host="test"))
    assert all(off.admit(_peer("192.0.2.1")) == "" for _ in range(1000)) and off.open == {}


def test_the_admins_frontend_setting_reaches_the_front_ends_config(tmp_path: Path) -> None:
    home_dir = tmp_path / "cloud"
    home_dir.mkdir()
    assert FrontendConfig(role="frontend", host="h", home=tmp_path).max_connections_per_ip == 256
    (home_dir / "cloud.json").write_text(json.dumps({"frontend": {"max_connections_per_ip": 1000}}))
    home = CloudHome(CloudConfig(home=home_dir))
    home.prepare()
    written = json.loads((home.role_home("frontend") / "role.json").read_text())
    assert written["max_connections_per_ip"] == 1000
    remote = home.remote_role_config("frontend", "fe1.example.net", Path("/srv/fe"), controller_url="x")
    assert isinstance(remote, FrontendConfig) and remote.max_connections_per_ip == 1000
    (home_dir / "cloud.json").write_text(json.dumps({"frontend": {"max_connections_per_ip": -1}}))
    with pytest.raises(InvalidInput, match="max_connections_per_ip must be a whole number"):
        CloudHome(CloudConfig(home=home_dir)).prepare()
