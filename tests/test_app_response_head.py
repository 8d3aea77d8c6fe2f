"""An app's response head is bounded in the worker: an app that never ends its head (endless header
lines, one endless line, too many fields) gets its visitor a 502 at once, with the reason in the
site's log, and costs the worker no more memory than a bounded buffer; the worker's other sites keep
answering. A 204 goes on with no length and no body, whatever the app said. Real fileserver and
worker; the hostile app is a Procfile app on a raw socket, and the PHP one a script that prints
header lines.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator

import pytest

from roles.worker.apps._fastcgi import parse_cgi_head
from roles.worker.apps._head import MAX_HEAD_BYTES, MAX_HEAD_FIELDS, MAX_INTERIM_HEADS, HeadTooLarge
from tests.support import wait_until
from tests.test_worker_apps import WSGI_APP, AppCloud, running_cloud

pytestmark = pytest.mark.timeout(240)

MB = 1024 * 1024
# Far more than any sane head: without a bound the worker would hold all of it (and many times
# its size in Python objects). The app stops there and holds the connection, so an unbounded worker
# neither runs away with the machine's memory nor gets an end to its head.
FLOOD_MB = 96
# How much the worker's peak RSS may grow over the attack: a bounded buffer per connection is far
# below it, and the flood without a bound far above it.
RSS_SLACK = 200 * MB

FLOOD_APP = b"""
import os, socket, threading, time
from urllib.parse import parse_qs, urlsplit

LIMIT = int(os.environ["FLOOD_MB"]) * 1024 * 1024

def flood(conn, how):
    sent = 0
    if how == "lines":
        conn.sendall(b"HTTP/1.1 200 OK\\r\\n")
        line = b"X-Filler-%08d: " + b"a" * 40 + b"\\r\\n"
        n = 0
        while sent < LIMIT:
            chunk = b"".join(line % (n + i) for i in range(1000))
            n += 1000
            conn.sendall(chunk)
            sent += len(chunk)
    elif how == "one-line":
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nX-Endless: ")
        chunk = b"b" * 65536
        while sent < LIMIT:
            conn.sendall(chunk)
            sent += len(chunk)
    elif how == "status":
        conn.sendall(b"HTTP/1.1 200 ")
        chunk = b"c" * 65536
        while sent < LIMIT:
            conn.sendall(chunk)
            sent += len(chunk)
    elif how == "no-such-status":
        conn.sendall(b"HTTP/1.1 999 Whatever\\r\\nContent-Length: 2\\r\\n\\r\\nok")
        return
    elif how == "wide":
        # Complete and with a body, and in one read: but far past the bound in bytes.
        value = b"w" * 4096
        head = b"HTTP/1.1 200 OK\\r\\n" + b"".join(b"X-W%d: %s\\r\\n" % (i, value) for i in range(40))
        conn.sendall(head + b"Content-Length: 2\\r\\n\\r\\nok")
        return
    elif how == "interim":
        # Each head complete, but never the answer: 1xx after 1xx, for as long as it is read.
        chunk = b"HTTP/1.1 103 Early Hints\\r\\nLink: </a.css>; rel=preload\\r\\n\\r\\n" * 1000
        while sent < LIMIT:
            conn.sendall(chunk)
            sent += len(chunk)
    elif how == "fields":
        # Small in bytes, but more fields than any proxy takes: complete, with a body.
        head = b"HTTP/1.1 200 OK\\r\\n" + b"".join(b"X-F%d: 1\\r\\n" % i for i in range(%(fields)d))
        conn.sendall(head + b"Content-Length: 2\\r\\n\\r\\nok")
        return
    time.sleep(60)

def serve(conn):
    with conn:
        try:
            data = b""
            while b"\\r\\n\\r\\n" not in data:
                got = conn.recv(65536)
                if not got:
                    return
                data += got
            target = data.split(b" ", 2)[1].decode()
            url = urlsplit(target)
            if url.path == "/flood":
                flood(conn, parse_qs(url.query)["how"][0])
            else:
                conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 8\\r\\nConnection: close\\r\\n\\r\\nflood ok")
        except OSError:
            pass

srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(os.environ["PORT"])))
srv.listen(64)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
""".replace(b"%(fields)d", b"%d" % (MAX_HEAD_FIELDS + 20))

# php-cgi's answer is a CGI head: header() fields, as many and as long as asked.
FLOOD_PHP = b"""<?php
$n = (int)($_GET["n"] ?? 0);
$value = str_repeat("a", (int)($_GET["len"] ?? 1));
for ($i = 0; $i < $n; $i++) {
    header("X-Filler-$i: $value");
}
echo "php ok";
"""


# A WSGI app (behind our app server, on kept connections) that sets as many fields as asked.
WSGI_FIELDS = b"""
def app(environ, start_response):
    n = int(environ["QUERY_STRING"] or 0)
    headers = [("X-F%d" % i, "1") for i in range(n)] + [("Content-Length", "7")]
    start_response("200 OK", headers)
    return [b"wsgi ok"]
"""


# Answers with no content that say they have some, and send it anyway (then close).
BODYLESS_APP = b"""
import os, socket, threading

ANSWERS = {
    "/204": b"HTTP/1.1 204 No Content\\r\\nContent-Length: 10\\r\\nX-Kind: 204\\r\\n\\r\\n0123456789",
    "/204-chunked": b"HTTP/1.1 204 No Content\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n5\\r\\nhello\\r\\n0\\r\\n\\r\\n",
    "/304": b'HTTP/1.1 304 Not Modified\\r\\nContent-Length: 10\\r\\nETag: "v1"\\r\\n\\r\\n0123456789',
}

def serve(conn):
    with conn:
        data = b""
        while b"\\r\\n\\r\\n" not in data:
            got = conn.recv(65536)
            if not got:
                return
            data += got
        path = data.split(b" ", 2)[1].decode()
        conn.sendall(ANSWERS.get(path, b"HTTP/1.1 200 OK\\r\\nContent-Length: 11\\r\\n\\r\\nbodyless ok"))

srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(os.environ["PORT"])))
srv.listen(64)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def vm(pid: int, field: str) -> int:
    """A field of /proc/<pid>/status in bytes (VmRSS, VmHWM: the peak RSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture(scope="module")
def cloud() -> Iterator[AppCloud]:
    with running_cloud(
        app_start_timeout=15.0, app_response_timeout=60.0, max_active_apps=10, package_index_url="none"
    ) as c:
        c.add_site("flood", env={"FLOOD_MB": str(FLOOD_MB)})
        c.publish_and_wait(
            "flood", {"Procfile": b"web: python3 flood.py\n", "flood.py": FLOOD_APP}, "/", b"flood ok"
        )
        c.add_site("bystander")
        c.publish_and_wait("bystander", {"app.py": WSGI_APP}, "/hi", b"wsgi GET /hi")
        yield c


def worker_pid(cloud: AppCloud) -> int:
    assert cloud.worker.proc is not None
    return cloud.worker.proc.pid


@pytest.mark.parametrize("how", ["lines", "one-line", "status"])
def test_an_endless_head_gets_a_quick_502_and_the_worker_stays_bounded(cloud: AppCloud, how: str) -> None:
    pid = worker_pid(cloud)
    peak_before = vm(pid, "VmHWM")
    started = time.monotonic()
    status, _, body = cloud.get("flood", f"/flood?how={how}")
    took = time.monotonic() - started
    assert status == 502, (status, body[:200])
    assert took < 5, took
    peak = vm(pid, "VmHWM")
    assert peak - peak_before < RSS_SLACK, (peak_before // MB, peak // MB)
    wait_until(
        lambda: any("too large" in ln and "/flood" in ln for ln in cloud.log("flood").splitlines()),
        timeout=5,
        what="the reason in the site's log",
    )
    # The worker goes on: the same site answers its next request, and another site too.
    assert cloud.get("flood", "/")[2] == b"flood ok"
    assert cloud.get("bystander", "/hi")[0:3:2] == (200, b"wsgi GET /hi  greeting=- cookie=- body=")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_endless_interim_heads_get_a_quick_502_and_cost_the_worker_little(cloud: AppCloud) -> None:
    # Each 1xx head is dropped, but parsed in the worker's CPU, shared by every site: without a
    # bound the worker parsed them for as long as the app sent them.
    pid = worker_pid(cloud)
    cpu = cpu_seconds(pid)
    started = time.monotonic()
    status, _, body = cloud.get("flood", "/flood?how=interim")
    took, used = time.monotonic() - started, cpu_seconds(pid) - cpu
    assert status == 502, (status, body[:200])
    assert took < 5 and used < 2, (took, used)
    wait_until(
        lambda: f"more than {MAX_INTERIM_HEADS} interim (1xx) heads" in cloud.log("flood"),
        timeout=5,
        what="the reason in the site's log",
    )
    assert cloud.get("flood", "/")[2] == b"flood ok"
    assert cloud.get("bystander", "/hi")[0] == 200


def test_a_head_with_too_many_fields_gets_a_502(cloud: AppCloud) -> None:
    status, _, _ = cloud.get("flood", "/flood?how=fields")
    assert status == 502
    assert any(f"more than {MAX_HEAD_FIELDS} fields" in ln for ln in cloud.log("flood").splitlines())
    assert cloud.get("bystander", "/hi")[0] == 200


def test_a_status_http_does_not_have_gets_a_502_saying_so(cloud: AppCloud) -> None:
    # (llhttp reads any three digits; a 999 handed on would be a visitor's client's or a cache's guess.)
    assert cloud.get("flood", "/flood?how=no-such-status")[0] == 502
    wait_until(
        lambda: any("status 999, which HTTP does not have" in ln for ln in cloud.log("flood").splitlines()),
        timeout=5,
        what="the reason in the site's log",
    )


def test_a_complete_head_past_the_bound_in_bytes_gets_a_502(cloud: AppCloud) -> None:
    def too_large() -> int:
        return sum(f"more than {MAX_HEAD_BYTES} bytes" in ln for ln in cloud.log("flood").splitlines())

    before = too_large()
    assert cloud.get("flood", "/flood?how=wide")[0] == 502
    wait_until(lambda: too_large() > before, timeout=5, what="the reason in the site's log")


def test_a_wsgi_app_with_too_many_fields_gets_a_502_and_its_kept_connections_stay_sound(
    cloud: AppCloud,
) -> None:
    cloud.add_site("wsgifields")
    cloud.publish_and_wait("wsgifields", {"app.py": WSGI_FIELDS}, "/", b"wsgi ok")
    for _ in range(3):
        assert cloud.get("wsgifields", f"/?{MAX_HEAD_FIELDS + 1}")[0] == 502
        status, headers, body = cloud.get("wsgifields", f"/?{MAX_HEAD_FIELDS - 10}")
        assert (status, body) == (200, b"wsgi ok") and headers["x-f0"] == "1"
    assert any(f"more than {MAX_HEAD_FIELDS} fields" in ln for ln in cloud.log("wsgifields").splitlines())


@pytest.mark.skipif(shutil.which("php-cgi") is None, reason="php-cgi is not installed")
def test_a_cgi_head_from_php_past_the_bounds_gets_a_502(cloud: AppCloud) -> None:
    cloud.add_site("phpflood", runtime="php")
    cloud.publish_and_wait("phpflood", {"flood.php": FLOOD_PHP}, "/flood.php", b"php ok")
    pid = worker_pid(cloud)
    peak_before = vm(pid, "VmHWM")
    fields = MAX_HEAD_FIELDS + 20
    assert cloud.get("phpflood", f"/flood.php?n={fields}")[0] == 502
    assert any(f"more than {MAX_HEAD_FIELDS} fields" in ln for ln in cloud.log("phpflood").splitlines())
    # 4 MB of fields, each within the count.
    assert cloud.get("phpflood", f"/flood.php?n={MAX_HEAD_FIELDS // 2}&len={80 * 1024}")[0] == 502
    assert vm(pid, "VmHWM") - peak_before < RSS_SLACK
    # Neither answer's connection was kept: the next request gets a whole answer.
    assert cloud.get("phpflood", f"/flood.php?n={MAX_HEAD_FIELDS // 2}")[0:3:2] == (200, b"php ok")
    assert cloud.get("bystander", "/hi")[0] == 200


def test_a_cgi_head_within_the_bounds_is_read_and_one_past_them_refused() -> None:
    fields = b"".join(b"X-F%d: 1\r\n" % i for i in range(MAX_HEAD_FIELDS - 1))
    status, headers = parse_cgi_head(b"Status: 404 Not Found\r\n" + fields)
    assert status == 404 and len(headers) == MAX_HEAD_FIELDS - 1
    with pytest.raises(HeadTooLarge, match=f"more than {MAX_HEAD_FIELDS} fields"):
        parse_cgi_head(b"Status: 404\r\nX-One-More: 1\r\n" + fields)
    with pytest.raises(HeadTooLarge, match=f"more than {MAX_HEAD_BYTES} bytes"):
        parse_cgi_head(b"X-Big: " + b"b" * MAX_HEAD_BYTES)
    # CGI has no interim answers, and a Status must be one.
    for bad in (b"abc", b"101", b"2000", b"99"):
        with pytest.raises(ValueError, match="is not an HTTP status"):
            parse_cgi_head(b"Status: " + bad)


def _heads_and_rest(answer: bytes, n: int) -> tuple[list[dict[bytes, bytes]], list[int], bytes]:
    """The first ``n`` answers of ``answer``, each taken as bodyless: their fields, statuses, and what
    follows them (the next answer must start right after each blank line)."""
    heads, statuses = [], []
    for _ in range(n):
        head, _, answer = answer.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        statuses.append(int(status_line.split()[1]))
        heads.append({k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines)})
        assert answer.startswith(b"HTTP/1.1 "), (statuses, answer[:40])  # no body bytes in between
    return heads, statuses, answer


def test_a_204_goes_on_with_no_length_and_no_body_and_a_304_keeps_its_length(cloud: AppCloud) -> None:
    cloud.add_site("bodyless")
    cloud.publish_and_wait(
        "bodyless", {"Procfile": b"web: python3 app.py\n", "app.py": BODYLESS_APP}, "/", b"bodyless ok"
    )
    ask = b"GET %b HTTP/1.1\r\nHost: bodyless\r\nX-Sitecloud-Site: bodyless\r\n%b\r\n"
    paths = [b"/204", b"/204-chunked", b"/304"]
    requests = b"".join(ask % (p, b"") for p in paths) + ask % (b"/", b"Connection: close\r\n")
    # Pipelined on one kept connection, as a front end's: a stray body would be read as the next answer.
    ctx = cloud.pki.client_ssl("frontend")
    with (
        socket.create_connection(("localhost", cloud.config.data_port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(requests)
        chunks = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
    heads, statuses, last = _heads_and_rest(b"".join(chunks), len(paths))
    assert statuses == [204, 204, 304]
    # RFC 9110 section 8.6: no Content-Length on a 204; nor any other framing.
    for head in heads[:2]:
        assert b"content-length" not in head and b"transfer-encoding" not in head, head
    assert heads[0][b"x-kind"] == b"204"
    # A 304 may say the length a 200 would have had; its body is still never sent.
    assert heads[2][b"content-length"] == b"10" and heads[2][b"etag"] == b'"v1"'
    assert last.startswith(b"HTTP/1.1 200 ") and last.endswith(b"\r\n\r\nbodyless ok")
