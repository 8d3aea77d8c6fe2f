"""An app's chunked answer reaches the front end in as many chunks as the worker made writes, not as
many as the app made chunks: 4 million one-byte chunks (24 MB from an app that spent 0.2 s of CPU on
them) cost the front end 5 s of CPU, one parse, one re-framing and one write each, and every other
site on that front end waited behind them.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from roles.worker.apps._upstream import PIECES_PER_SECOND
from tests.test_worker_apps import AppCloud, running_cloud

pytestmark = pytest.mark.timeout(240)

CHUNKS = 20000
THROTTLED = 250_000

# A raw HTTP server as a Procfile app: every answer is ``FIRST`` one-byte chunks, a pause of
# ``PAUSE`` seconds, then ``REST`` more and the end (%-formatted with those three).
CHUNKING_APP = b"""
import os, socket, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(os.environ["PORT"])))
srv.listen(16)
while True:
    conn, _ = srv.accept()
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        got = conn.recv(65536)
        if not got:
            break
        data += got
    conn.sendall(b"HTTP/1.1 200 OK\\r\\nTransfer-Encoding: chunked\\r\\nConnection: close\\r\\n\\r\\n"
                 + b"1\\r\\nx\\r\\n" * %d)
    time.sleep(%s)
    conn.sendall(b"1\\r\\nx\\r\\n" * %d + b"0\\r\\n\\r\\n")
    conn.close()
"""
# Half, then a pause (the worker sends the head on before the end, so chunked), then the rest.
TINY_CHUNKS_APP = CHUNKING_APP % (CHUNKS // 2, b"0.3", CHUNKS // 2)
FLOOD_APP = CHUNKING_APP % (THROTTLED, b"0", 0)


def _get(cloud: AppCloud, site: str) -> tuple[bytes, bytes]:
    """A GET as a front end asks the worker: the answer's head and its raw (chunked) body."""
    ctx = cloud.pki.client_ssl("frontend")
    with (
        socket.create_connection(("localhost", cloud.config.data_port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(
            b"GET / HTTP/1.1\r\nHost: %b\r\nX-Sitecloud-Site: %b\r\nConnection: close\r\n\r\n"
            % (site.encode(), site.encode())
        )
        data = b""
        while got := tls.recv(65536):
            data += got
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def _dechunk(body: bytes) -> tuple[bytes, int]:
    """A chunked body's payload and how many chunks carried it."""
    chunks, payload = 0, b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return payload, chunks
        payload += body[:size]
        body = body[size + 2 :]
        chunks += 1


@pytest.fixture(scope="module")
def cloud() -> Iterator[AppCloud]:
    with running_cloud(app_start_timeout=15.0, max_active_apps=10, package_index_url="none") as c:
        c.add_site("tiny")
        c.publish_and_wait(
            "tiny", {"Procfile": b"web: python3 app.py\n", "app.py": TINY_CHUNKS_APP}, "/", b"x" * 100
        )
        c.add_site("flood")
        c.publish_and_wait(
            "flood", {"Procfile": b"web: python3 app.py\n", "app.py": FLOOD_APP}, "/", b"x" * 100
        )
        yield c


def test_an_apps_tiny_chunks_reach_the_front_end_as_few_chunks(cloud: AppCloud) -> None:
    head, body = _get(cloud, "tiny")
    assert b"transfer-encoding: chunked" in head.lower()
    payload, chunks = _dechunk(body)
    assert payload == b"x" * CHUNKS
    assert chunks < CHUNKS // 100, chunks


def test_an_answer_in_a_flood_of_tiny_chunks_is_read_at_a_bounded_pace(cloud: AppCloud) -> None:
    # Each piece costs the worker a parse callback in its own CPU, which no app cgroup pays: past
    # PIECES_PER_SECOND a second, the app's connection is read no faster, and the answer stays whole.
    started = time.monotonic()
    head, body = _get(cloud, "flood")
    took = time.monotonic() - started
    assert head.startswith(b"HTTP/1.1 200 ")
    assert _dechunk(body)[0] == b"x" * THROTTLED
    # A full bucket's worth at once, then the rest at the bucket's pace, less the last read's (which
    # ends the answer before its pause): over 1.5 s, where the worker alone reads it in about 0.1 s.
    least = (THROTTLED - PIECES_PER_SECOND - 256 * 1024 / 6) / PIECES_PER_SECOND
    assert took >= min(least, 1.5), took
