"""A long request body streams to the app (roles/worker/apps/_proxy.py STREAM_BODY_AFTER), or, when
it comes chunked, waits in a file: the worker holds about a megabyte of it in memory, not all of it,
however many visitors upload at once; one longer than the site accepts gets 413 that says the limit.
Real fileserver and worker (and a front end in front of them, where a visitor's upload slows to the
app's pace end to end), a WSGI, a PHP and a Procfile app.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import http.client
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from roles.frontend.config import FrontendConfig
from roles.worker.apps._proxy import STREAM_BODY_AFTER
from tests.support import RoleProcess, wait_until
from tests.test_app_response_head import MB, vm
from tests.test_worker_apps import AppCloud, running_cloud

pytestmark = pytest.mark.timeout(240)

MAX_BODY = 16 * MB
UPLOADS = 24
# Far below UPLOADS bodies of MAX_BODY (384 MB), which the worker held whole before.
RSS_SLACK = 120 * MB

APP = b"""
import hashlib

def app(environ, start_response):
    digest, n = hashlib.sha256(), 0
    body = environ["wsgi.input"]
    while True:
        chunk = body.read(1 << 20)
        if not chunk:
            break
        digest.update(chunk)
        n += len(chunk)
    out = ("%d %s" % (n, digest.hexdigest())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]
"""

# Answers before it reads any of the body, after a pause (by then the worker has sent what the
# sockets between them hold, and holds the rest), and never reads it nor closes.
EARLY = b"""
import os, socket, threading, time

def serve(conn):
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        data += conn.recv(4096)
    status = b"200 OK"
    if data.startswith(b"POST"):
        time.sleep(1)
        status = b"403 Forbidden"
    conn.sendall(b"HTTP/1.1 " + status + b"\\r\\nContent-Length: 4\\r\\n\\r\\nnope")
    time.sleep(120)

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(os.environ["PORT"])))
srv.listen(64)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

PHP = b"""<?php
$body = file_get_contents("php://input");
echo strlen($body) . " " . hash("sha256", $body);
"""


@pytest.fixture(scope="module")
def cloud() -> Iterator[AppCloud]:
    with running_cloud(app_start_timeout=15.0, package_index_url="none", app_max_body=MAX_BODY) as c:
        c.add_site("upload")
        c.publish_and_wait("upload", {"app.py": APP}, "/", b"0 ")
        yield c


def post(cloud: AppCloud, site: str, path: str, body: bytes, *, chunked: bool = False) -> tuple[int, bytes]:
    """``body`` with its length, or chunked (in pieces of 1 MB, as a client that streams sends it)."""
    conn = http.client.HTTPSConnection(
        "localhost", cloud.config.data_port, context=cloud.pki.client_ssl("frontend"), timeout=60
    )
    sent = iter([body[i : i + MB] for i in range(0, len(body), MB)]) if chunked else body
    try:
        conn.request("POST", path, body=sent, headers={"X-Sitecloud-Site": site}, encode_chunked=chunked)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def expected(body: bytes) -> bytes:
    return b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())


@pytest.mark.parametrize("chunked", [False, True])
def test_a_long_body_reaches_the_app_whole_and_in_order(cloud: AppCloud, chunked: bool) -> None:
    for size in (STREAM_BODY_AFTER + 1, 5 * MB + 3, MAX_BODY):
        body = bytes(i * 7 % 251 for i in range(256)) * (size // 256) + b"e" * (size % 256)
        assert post(cloud, "upload", "/", body, chunked=chunked) == (200, expected(body))


def test_a_long_body_for_an_app_not_running_yet_waits_for_it_then_streams(cloud: AppCloud) -> None:
    cloud.add_site("cold")
    cloud.publish("cold", {"app.py": APP})
    wait_until(lambda: cloud.app("cold")["runtime"] == "python", what="python detected from app.py")
    assert cloud.app("cold")["state"] == "idle"
    body = b"c" * (8 * MB)
    assert post(cloud, "cold", "/", body) == (200, expected(body))


@pytest.mark.parametrize("chunked", [False, True])
def test_many_long_uploads_at_once_cost_the_worker_little_memory(cloud: AppCloud, chunked: bool) -> None:
    assert cloud.worker.proc is not None
    pid = cloud.worker.proc.pid
    fds = Path(f"/proc/{pid}/fd")
    fds_before = len(list(fds.iterdir()))
    peak_before = vm(pid, "VmHWM")
    body = b"u" * MAX_BODY
    with concurrent.futures.ThreadPoolExecutor(UPLOADS) as pool:
        answers = list(pool.map(lambda _: post(cloud, "upload", "/", body, chunked=chunked), range(UPLOADS)))
    assert answers == [(200, expected(body))] * UPLOADS
    peak = vm(pid, "VmHWM")
    assert peak - peak_before < RSS_SLACK, (peak_before // MB, peak // MB)
    # Nothing is left open (a chunked body's file included).
    assert len(list(fds.iterdir())) - fds_before < 2


def test_an_app_that_answers_without_reading_the_body_leaves_the_worker_no_connection(
    cloud: AppCloud,
) -> None:
    cloud.add_site("early")
    cloud.publish_and_wait("early", {"Procfile": b"web: python3 early.py\n", "early.py": EARLY}, "/", b"nope")
    assert cloud.worker.proc is not None
    fds = Path(f"/proc/{cloud.worker.proc.pid}/fd")
    before = len(list(fds.iterdir()))
    body = b"e" * MAX_BODY
    for _ in range(4):
        assert post(cloud, "early", "/", body) == (403, b"nope")
    # Each connection to the app is dropped with what the app left unread, not held open for it.
    assert len(list(fds.iterdir())) - before < 2


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_longer_than_the_site_accepts_gets_413_with_the_limit(cloud: AppCloud, chunked: bool) -> None:
    status, page = post(cloud, "upload", "/", b"x" * (MAX_BODY + 1), chunked=chunked)
    assert status == 413 and b"(16 MiB)" in page
    # The worker goes on with the site.
    assert post(cloud, "upload", "/", b"small") == (200, expected(b"small"))


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_is_refused_at_once_and_the_rest_not_read(
    cloud: AppCloud, chunked: bool
) -> None:
    # Before, the worker read (and dropped) the whole body, or waited for it, before its 413.
    head = b"POST / HTTP/1.1\r\nHost: upload\r\nX-Sitecloud-Site: upload\r\n"
    if chunked:  # just past the limit, and no last chunk: the rest would follow
        parts = [head + b"Transfer-Encoding: chunked\r\n\r\n"] + [b"100000\r\n" + b"x" * MB + b"\r\n"] * 17
    else:  # its head alone: no byte of the body
        parts = [head + b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)]
    raw = socket.create_connection(("localhost", cloud.config.data_port), timeout=5)
    with cloud.pki.client_ssl("frontend").wrap_socket(raw, server_hostname="localhost") as conn:
        for part in parts:
            conn.sendall(part)
        answer = b""
        while chunk := conn.recv(65536):  # to the end: the connection closes after it
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"Connection: close" in answer and b"(16 MiB)" in answer, answer
    assert post(cloud, "upload", "/", b"small") == (200, expected(b"small"))


@pytest.mark.skipif(shutil.which("php-cgi") is None, reason="php-cgi is not installed")
def test_a_long_body_streams_to_php_as_fastcgi_stdin(cloud: AppCloud) -> None:
    cloud.add_site("phpup", runtime="php")
    cloud.publish_and_wait("phpup", {"up.php": PHP}, "/up.php", b"0 ")
    for size in (100, 3 * MB + 5):
        body = bytes(range(256)) * (size // 256) + b"p" * (size % 256)
        assert post(cloud, "phpup", "/up.php", body) == (200, expected(body))
        # Chunked: php-cgi needs the length first, which the body's file gives.
        assert post(cloud, "phpup", "/up.php", body, chunked=True) == (200, expected(body))


def test_an_upload_through_the_front_end_reaches_the_app_whole(cloud: AppCloud) -> None:
    pki = cloud.pki
    fe_config = pki.role_config(
        FrontendConfig, "frontend", cloud.config.home.parent / "frontend", usage_interval=0.0
    )
    pki.ca.issue_wildcard("sites.test").write(fe_config.wildcard_key_file, fe_config.wildcard_cert_file)
    front = RoleProcess(fe_config, pki).start()
    try:
        front.push_config(
            {
                "version": 1,
                "domain": "sites.test",
                "sites": {"upload": {"workers": [f"localhost:{cloud.config.data_port}"]}},
            }
        )
        body = bytes(range(256)) * (MAX_BODY // 256)
        for chunked in (False, True):
            conn = http.client.HTTPConnection("127.0.0.1", fe_config.http_port, timeout=60)
            try:
                sent = iter(body[i : i + MB] for i in range(0, len(body), MB)) if chunked else body
                conn.request(
                    "POST", "/", body=sent, headers={"Host": "upload.sites.test"}, encode_chunked=chunked
                )
                resp = conn.getresponse()
                assert (resp.status, resp.read()) == (200, expected(body)), chunked
            finally:
                conn.close()
        # One over the limit: the worker's 413 reaches the visitor at once, its body unsent.
        with socket.create_connection(("127.0.0.1", fe_config.http_port), timeout=5) as conn:
            conn.sendall(
                b"POST / HTTP/1.1\r\nHost: upload.sites.test\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
            )
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 413 ") and b"(16 MiB)" in answer, answer[:300]
    finally:
        front.stop()


def _spooled_bytes(pid: int) -> int:
    """What ``pid`` holds in unnamed (deleted) files: the chunked bodies it spooled."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).endswith(" (deleted)"):
                total += fd.stat().st_size
    return total


def test_chunked_bodies_left_unfinished_hold_at_most_the_workers_spool_total() -> None:
    # Any visitor may send any app a chunked body and never end it: each waited on the worker's
    # disk, the one every site's content is on, with no bound on them all.
    with running_cloud(app_start_timeout=15.0, package_index_url="none", app_spool_total=8 * MB) as c:
        c.add_site("upload")
        c.publish_and_wait("upload", {"app.py": APP}, "/", b"0 ")
        assert c.worker.proc is not None
        pid = c.worker.proc.pid
        context = c.pki.client_ssl("frontend")
        head = b"POST / HTTP/1.1\r\nHost: x\r\nX-Sitecloud-Site: upload\r\nTransfer-Encoding: chunked\r\n\r\n"
        piece = b"%x\r\n%s\r\n" % (MB, b"h" * MB)
        held: list[socket.socket] = []
        try:
            for _ in range(4):
                sock = context.wrap_socket(
                    socket.create_connection(("localhost", c.config.data_port), timeout=10),
                    server_hostname="localhost",
                )
                held.append(sock)
                sock.sendall(head + piece * 3)  # 3 MB each, and never the last chunk
            wait_until(lambda: _spooled_bytes(pid) >= 6 * MB, timeout=10, what="the bodies on disk")
            time.sleep(0.5)
            assert _spooled_bytes(pid) <= 8 * MB, _spooled_bytes(pid) // MB
            body = b"n" * (3 * MB)
            assert post(c, "upload", "/", body, chunked=True)[0] == 503
            assert "request bodies on disk already" in c.worker.log()
        finally:
            for done in held:
                done.close()
        # Their files go with their connections: the next body is taken again.
        wait_until(lambda: _spooled_bytes(pid) == 0, timeout=10, what="the held bodies to be dropped")
        assert post(c, "upload", "/", body, chunked=True) == (200, expected(body))


def _unfinished_upload(c: AppCloud, site: str, megabytes: int) -> socket.socket:
    """A chunked POST of ``megabytes`` that never sends its last chunk."""
    sock = c.pki.client_ssl("frontend").wrap_socket(
        socket.create_connection(("localhost", c.config.data_port), timeout=10), server_hostname="localhost"
    )
    head = b"POST / HTTP/1.1\r\nHost: x\r\nX-Sitecloud-Site: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
    sock.sendall(head % site.encode() + (b"%x\r\n%s\r\n" % (MB, b"h" * MB)) * megabytes)
    return sock


def test_one_tenants_unfinished_uploads_give_way_to_another_tenants_upload() -> None:
    # One tenant may fill the worker's whole spool while nobody else wants it; a bystander's upload
    # then drops the hog's unfinished bodies (503 with Retry-After when they end) instead of getting
    # a 503 itself.
    with running_cloud(
        app_start_timeout=15.0, request_timeout=30.0, package_index_url="none", app_spool_total=8 * MB
    ) as c:
        c.add_site("hog", subscription=1)
        c.add_site("bystander", subscription=2)
        c.publish_and_wait("hog", {"app.py": APP}, "/", b"0 ")
        c.publish_and_wait("bystander", {"app.py": APP}, "/", b"0 ")
        assert c.worker.proc is not None
        pid = c.worker.proc.pid
        held = [_unfinished_upload(c, "hog", 2) for _ in range(4)]
        try:
            wait_until(lambda: _spooled_bytes(pid) >= 8 * MB, timeout=10, what="the hog's bodies on disk")
            # The hog itself gets no more while it holds it all.
            assert post(c, "hog", "/", b"m" * (3 * MB), chunked=True)[0] == 503
            body = b"n" * (3 * MB)
            assert post(c, "bystander", "/", body, chunked=True) == (200, expected(body))
            assert "another needs room" in c.log("hog")
            assert "refused" not in c.log("bystander")
            # A dropped body's visitor gets 503 with a Retry-After once it ends.
            dropped = []
            for sock in held:
                sock.sendall(b"0\r\n\r\n")
                answer = sock.recv(65536)
                if answer.startswith(b"HTTP/1.1 503 "):
                    assert b"\r\nRetry-After: " in answer, answer[:300]
                    dropped.append(sock)
                else:
                    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
            assert 1 <= len(dropped) <= 2, len(dropped)
        finally:
            for done in held:
                done.close()
        wait_until(lambda: _spooled_bytes(pid) == 0, timeout=10, what="the held bodies to be dropped")
