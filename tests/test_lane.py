"""The lane (docs/architecture.md): a front end's GETs pipelined to a worker over one mTLS connection.

Fileserver, worker and front end are real processes. The worker is asked directly (as a front end
would, with a front-end certificate) to see the lane's contract, then visitors go through the front
end; one test gives the front end a worker stand-in whose lane answers fall out of step.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import itertools
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from roles.worker.config import WorkerConfig
from shared.net import free_port
from shared.tls import LANE_ALPN
from tests.support import CloudPKI, RoleProcess, call, data_plane, lane_exchange, wait_until

DOMAIN = "sites.test"
UID = "0123456789abcdef"
# The front end takes only snapshots newer than the one it has: one counter for this module's pushes.
_versions = itertools.count(10)
SMALL = b"<p>" + b"small page " * 180 + b"</p>"
MID = os.urandom(16 * 1024)  # the largest file on a lane: more than one TLS record, read in pieces
BIG = os.urandom(300 * 1024)  # above the worker's whole-file limit: it streams, so never on a lane


@dataclass
class Stack:
    pki: CloudPKI
    worker: RoleProcess
    frontend: RoleProcess
    fileserver: RoleProcess
    root: Path

    @property
    def data_port(self) -> int:
        return int(self.worker.config.data_port)  # type: ignore[attr-defined]

    def visitor(self) -> http.client.HTTPSConnection:
        ctx = self.pki.client_ssl(None)
        port = int(self.frontend.config.https_port)  # type: ignore[attr-defined]

        class _SNI(http.client.HTTPSConnection):
            def connect(self) -> None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                self.sock = ctx.wrap_socket(sock, server_hostname=f"blog.{DOMAIN}")

        return _SNI("127.0.0.1", port, context=ctx, timeout=10)


def _get(path: str, tag: int | None, *extra: str, method: str = "GET", site: str = "blog") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", f"X-Sitecloud-Site: {site}", *extra]
    if tag is not None:
        lines.append(f"X-Sitecloud-Lane: {tag}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("lane")
    with data_plane(root, DOMAIN, frontend={"usage_interval": 0.0}) as (pki, fileserver, worker, frontend):
        uid = UID
        fileserver.push_config({"version": 1, "sites": {"blog": {"uid": uid, "quota_bytes": 1 << 24}}})
        worker.push_config(
            {"version": 1, "fileserver": fileserver.control_url, "sites": {"blog": {"uid": uid}}}
        )
        frontend.push_config(
            {
                "version": 1,
                "domain": DOMAIN,
                "sites": {"blog": {"workers": [f"localhost:{worker.config.data_port}"]}},
            }
        )
        ctx = pki.client_ssl("publisher")
        ops = []
        for path, data in {"small.html": SMALL, "mid.bin": MID, "big.bin": BIG}.items():
            status, body = call(
                f"{fileserver.control_url}/v1/sites/blog/blobs", ctx, method="POST", data=data
            )
            assert status == 200, body
            ops.append({"op": "put", "path": path, "sha256": body["sha256"]})
        status, body = call(
            f"{fileserver.control_url}/v1/sites/blog/commit", ctx, method="POST", body={"ops": ops}
        )
        assert status == 200, body
        s = Stack(pki, worker, frontend, fileserver, root)
        wait_until(
            lambda: lane_exchange(pki, s.data_port, [_get("/small.html", 1)])[0].body == SMALL,
            what="the published page on the worker",
        )
        yield s


def test_a_lane_answers_pipelined_gets_in_order_each_with_its_tag(stack: Stack) -> None:
    first = lane_exchange(stack.pki, stack.data_port, [_get("/small.html", 7)])[0]
    etag = first.header("ETag")
    assert etag and first.status == 200
    answers = lane_exchange(
        stack.pki,
        stack.data_port,
        [
            _get("/small.html", 1),
            _get("/missing", 2),
            _get("/big.bin", 3),  # (also refused: any file above LANE_MAX_FILE)
            _get("/small.html", 4, f"If-None-Match: {etag}"),
            _get("/small.html", 5, "Range: bytes=0-9"),
            _get("/", 6, site="nosuch"),
        ],
    )
    # The tag comes right after the status line, so a front end finds it without parsing the rest.
    assert [a.headers[0] for a in answers] == [("X-Sitecloud-Lane", str(n)) for n in range(1, 7)]
    assert [a.status for a in answers] == [200, 404, 421, 304, 206, 404]
    assert answers[0].body == SMALL and answers[4].body == SMALL[:10]
    # A file that would stream is refused, for this request only; the front end asks again elsewhere.
    assert answers[2].header("X-Sitecloud-Lane-Refused") == "request" and answers[2].body == b""
    assert all(a.header("Content-Length") is not None for a in answers if a.status not in (304, 421))


def test_a_lane_refuses_what_it_cannot_answer_at_once_and_untagged_requests(stack: Stack) -> None:
    # HEAD is framed like its GET, which a pipelined reader could not tell apart: refused.
    [head] = lane_exchange(stack.pki, stack.data_port, [_get("/small.html", 1, method="HEAD")])
    assert (head.status, head.header("X-Sitecloud-Lane-Refused")) == (421, "request")
    # A request without its tag could put every later answer out of step: 400, untagged, and closed.
    answers = lane_exchange(stack.pki, stack.data_port, [_get("/small.html", None), _get("/small.html", 2)])
    assert len(answers) == 1 and answers[0].status == 400
    assert answers[0].header("X-Sitecloud-Lane") is None and answers[0].header("Connection") == "close"


def test_an_ordinary_connection_echoes_no_tag_and_streams_big_files(stack: Stack) -> None:
    [answer] = lane_exchange(stack.pki, stack.data_port, [_get("/big.bin", 9)], lane=False)
    assert answer.status == 200 and answer.body == BIG
    assert answer.header("X-Sitecloud-Lane") is None


def test_visitors_through_the_front_end_share_lanes_and_big_files_go_around(stack: Stack) -> None:
    errors: list[str] = []
    files = {"/small.html": SMALL, "/mid.bin": MID, "/big.bin": BIG}
    digests = {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}

    def visitor(n: int) -> None:
        conn = stack.visitor()
        try:
            for i in range(12):
                path = "/big.bin" if (n + i) % 5 == 0 else "/mid.bin" if (n + i) % 3 == 0 else "/small.html"
                conn.request("GET", path, headers={"Host": f"blog.{DOMAIN}", "X-Sitecloud-Lane": "1"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200 or hashlib.sha256(body).hexdigest() != digests[path]:
                    errors.append(f"visitor {n} {path}: {resp.status} {body[:80]!r}")
                if resp.getheader("X-Sitecloud-Lane") or resp.getheader("X-Sitecloud-Lane-Refused"):
                    errors.append(f"visitor {n}: the lane's own header reached a visitor")
                if resp.getheader("Connection") not in (None, "keep-alive"):
                    errors.append(f"visitor {n}: Connection {resp.getheader('Connection')}")
            conn.request("HEAD", "/small.html", headers={"Host": f"blog.{DOMAIN}"})
            resp = conn.getresponse()
            if (resp.status, resp.read(), resp.getheader("Content-Length")) != (200, b"", str(len(SMALL))):
                errors.append(f"visitor {n}: HEAD answered {resp.status}")
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"visitor {n}: {exc!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=visitor, args=(n,)) for n in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert stack.frontend.health()["upstream_lanes"] >= 1


def test_a_lane_answer_gets_the_sites_affinity_cookie_and_the_visitors_connection_header(
    stack: Stack,
) -> None:
    worker = f"localhost:{stack.data_port}"
    stack.frontend.push_config(
        {
            "version": next(_versions),
            "domain": DOMAIN,
            "sites": {"blog": {"workers": [worker], "affinity": True}},
        }
    )
    try:
        conn = stack.visitor()
        conn.request("GET", "/small.html", headers={"Host": f"blog.{DOMAIN}"})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, SMALL)
        assert (resp.getheader("Set-Cookie") or "").startswith("SitecloudAffinity=")
        conn.request("GET", "/small.html", headers={"Host": f"blog.{DOMAIN}", "Connection": "close"})
        resp = conn.getresponse()
        assert (resp.status, resp.read(), resp.getheader("Connection")) == (200, SMALL, "close")
        conn.close()
    finally:
        stack.frontend.push_config(
            {"version": next(_versions), "domain": DOMAIN, "sites": {"blog": {"workers": [worker]}}}
        )


class _OutOfStepWorker:
    """A worker stand-in whose lane answers carry the wrong tag; ordinary connections answer right."""

    def __init__(self, pki: CloudPKI) -> None:
        self.port = free_port()
        cert, key = pki.directory / "oos.pem", pki.directory / "oos.key"
        pki.ca.issue("worker@oos", role="worker", dns_names=["localhost"], ip_addresses=["127.0.0.1"]).write(
            key, cert
        )
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.load_cert_chain(cert, key)
        self._ssl.load_verify_locations(pki.ca_file)
        self._ssl.verify_mode = ssl.CERT_REQUIRED
        self._ssl.set_alpn_protocols([LANE_ALPN, "http/1.1"])
        self.lane_requests = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> _OutOfStepWorker:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self._ssl)

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        lane = writer.get_extra_info("ssl_object").selected_alpn_protocol() == LANE_ALPN
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                if lane:
                    self.lane_requests += 1
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nX-Sitecloud-Lane: 999\r\nContent-Length: 5\r\n\r\nWRONG"
                    )
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nRIGHT")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def test_a_lane_out_of_step_is_cut_and_its_requests_answered_elsewhere(stack: Stack) -> None:
    with _OutOfStepWorker(stack.pki) as oos:
        stack.frontend.push_config(
            {
                "version": next(_versions),
                "domain": DOMAIN,
                "sites": {"blog": {"workers": [f"localhost:{oos.port}"]}},
            }
        )
        try:
            conn = stack.visitor()
            bodies = []
            for _ in range(8):
                conn.request("GET", "/page", headers={"Host": f"blog.{DOMAIN}"})
                resp = conn.getresponse()
                bodies.append((resp.status, resp.read()))
            conn.close()
            assert bodies == [(200, b"RIGHT")] * 8  # never the out-of-step answer
            # The lane was tried and cut, and the worker is not trusted with one again for a while.
            assert 1 <= oos.lane_requests <= 2  # (a second lane may have been open already)
            assert "bad answer on the lane" in stack.frontend.log()
        finally:
            stack.frontend.push_config(
                {
                    "version": next(_versions),
                    "domain": DOMAIN,
                    "sites": {"blog": {"workers": [f"localhost:{stack.data_port}"]}},
                }
            )


def test_gets_waiting_on_a_lane_to_a_killed_worker_go_to_the_other_worker(stack: Stack) -> None:
    """kill -9 a worker while visitors keep GETs in flight on its lane: each one that had not been
    answered is sent again (on a connection of its own, to the worker left), so no visitor sees an
    error."""
    config = stack.pki.role_config(WorkerConfig, "worker", stack.root / "worker2", version_grace=0.3)
    second = RoleProcess(config, stack.pki).start()
    first = f"localhost:{stack.data_port}"
    try:
        second.push_config(
            {"version": 1, "fileserver": stack.fileserver.control_url, "sites": {"blog": {"uid": UID}}}
        )
        wait_until(
            lambda: lane_exchange(stack.pki, config.data_port, [_get("/small.html", 1)])[0].body == SMALL,
            what="the second worker serving the site",
        )
        stack.frontend.push_config(
            {
                "version": next(_versions),
                "domain": DOMAIN,
                "sites": {"blog": {"workers": [first, f"localhost:{config.data_port}"]}},
            }
        )
        stop = threading.Event()
        errors: list[str] = []
        served = [0]

        def visitor() -> None:
            conn = stack.visitor()
            try:
                while not stop.is_set():
                    conn.request("GET", "/small.html", headers={"Host": f"blog.{DOMAIN}"})
                    resp = conn.getresponse()
                    body = resp.read()
                    if (resp.status, body) != (200, SMALL):
                        errors.append(f"{resp.status} {body[:80]!r}")
                    served[0] += 1
            except (OSError, http.client.HTTPException) as exc:
                errors.append(repr(exc))
            finally:
                conn.close()

        threads = [threading.Thread(target=visitor) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: served[0] > 300, what="visitors under way")
            wait_until(lambda: stack.frontend.health()["upstream_lanes"] == 2, what="a lane to each worker")
            second.kill()
            before = served[0]
            wait_until(lambda: served[0] > before + 300, what="visitors served by the worker left")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert errors == []
    finally:
        stack.frontend.push_config(
            {"version": next(_versions), "domain": DOMAIN, "sites": {"blog": {"workers": [first]}}}
        )
        second.stop()
