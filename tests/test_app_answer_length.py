"""An app's answer is held to the Content-Length its head gives, in the worker, before it reaches the
front end's kept connection to the worker, which carries other sites' requests next. FastCGI frames no
body by that length: a PHP script that says ``Content-Length: 5``, sends 5 bytes, flushes and then
prints a whole HTTP answer had that answer read by the front end as the answer to the next request on
the connection, another tenant's (its page, its cookies). A body short of its length cuts the
connection instead of leaving the front end to read the next answer into it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator

import pytest

from tests.test_worker_apps import WSGI_APP, AppCloud, running_cloud

pytestmark = pytest.mark.timeout(240)

SMUGGLE_PHP = b"""<?php
if (isset($_GET["forge"])) { header("X-Sitecloud-Version: 999999"); header("X-Sitecloud-Fresh: 1"); echo "forged"; exit; }
while (ob_get_level()) ob_end_flush();
header("Content-Length: " . ($_GET["cl"] ?? "5"));
echo "first";
flush();
usleep(300000);
echo "HTTP/1.1 200 OK\\r\\nSet-Cookie: planted=1\\r\\nContent-Length: 8\\r\\n\\r\\nINJECTED";
flush();
"""


@pytest.fixture(scope="module")
def cloud() -> Iterator[AppCloud]:
    with running_cloud(app_start_timeout=15.0, max_active_apps=10, package_index_url="none") as c:
        c.add_site("smuggler", runtime="php")
        c.publish_and_wait("smuggler", {"index.php": SMUGGLE_PHP}, "/", b"first")
        c.add_site("bystander")
        c.publish_and_wait("bystander", {"app.py": WSGI_APP}, "/hi", b"wsgi GET /hi")
        yield c


def _read_answer(tls: ssl.SSLSocket) -> bytes:
    """One answer with a Content-Length, read as a front end reads it (head, then that many bytes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = tls.recv(65536)
        assert got, data
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        got = tls.recv(65536)
        assert got, data
        body += got
    assert len(body) == length, "more than the answer's length came in its read"
    return head + b"\r\n\r\n" + body


def _ask(site: str, path: str) -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: %b\r\nX-Sitecloud-Site: %b\r\n\r\n" % (
        path.encode(),
        site.encode(),
        site.encode(),
    )


@contextlib.contextmanager
def _front_end_connection(cloud: AppCloud) -> Iterator[ssl.SSLSocket]:
    """A connection to the worker's data port as a front end makes it."""
    ctx = cloud.pki.client_ssl("frontend")
    with (
        socket.create_connection(("localhost", cloud.config.data_port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        yield tls


def test_bytes_past_an_apps_content_length_never_reach_the_next_sites_answer(cloud: AppCloud) -> None:
    with _front_end_connection(cloud) as tls:
        tls.sendall(_ask("smuggler", "/"))
        first = _read_answer(tls)
        assert first.endswith(b"\r\n\r\nfirst")
        # The connection is free as far as the front end can tell: another site's request goes on it.
        tls.sendall(_ask("bystander", "/hi"))
        second = _read_answer(tls)
    assert b"INJECTED" not in second and b"planted" not in second
    assert second.startswith(b"HTTP/1.1 200 ") and b"\r\n\r\nwsgi GET /hi" in second


def test_an_answer_short_of_its_content_length_cuts_the_connection(cloud: AppCloud) -> None:
    with _front_end_connection(cloud) as tls:
        tls.sendall(_ask("smuggler", "/?cl=1000"))
        data = b""
        while got := tls.recv(65536):
            data += got
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-length: 1000" in head.lower()
    # Cut as soon as the app ended: the front end never waits for the rest nor reads on into another answer.
    assert len(body) < 1000
    assert any("short of its Content-Length" in ln for ln in cloud.log("smuggler").splitlines())


def test_an_app_cannot_say_the_platforms_own_fields(cloud: AppCloud) -> None:
    # The content version a front end keeps an answer under is the worker's to say: an app's forged
    # one would have its answer kept as another version's.
    status, headers, body = cloud.get("smuggler", "/?forge=1")
    assert (status, body) == (200, b"forged")
    assert headers.get("x-sitecloud-version") != "999999"
    assert "x-sitecloud-fresh" not in headers
