"""Access lines from a worker's serving processes (``processes: 2``) reach the site's log.

Fileserver, worker and front end are real processes. The serving processes answer the data port and
hold the front ends' version feeds; they hand their access lines, in batches, to the main process,
which owns each site's log: ``GET /v1/sites/{site}/logs`` (what ``sitecloud site logs`` reads) shows
every request, whichever process answered it, and a follower gets new lines as they come.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from roles.worker._access import AccessRecord
from roles.worker.apps import AppManager
from roles.worker.apps._channel import AppChannel, RemoteApps
from roles.worker.config import WorkerConfig
from shared.contracts.snapshots import WorkerSnapshot
from tests.support import CloudPKI, RoleProcess, call, data_plane, lane_exchange, wait_until

DOMAIN = "sites.test"
SITE, UID = "plain", "c3c3c3c3c3c3c3c3"
PAGE = b"<p>served by a serving process</p>"
_ids = itertools.count(1)


@dataclass
class Stack:
    pki: CloudPKI
    fileserver: RoleProcess
    worker: RoleProcess
    frontend: RoleProcess

    def on_worker(self, path: str, rid: str) -> tuple[int, bytes]:
        """One request on a new connection to the data port (either serving process may take it)."""
        head = (
            f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Sitecloud-Site: {SITE}\r\nX-Request-Id: {rid}\r\n"
            "X-Forwarded-For: 203.0.113.9\r\nUser-Agent: Direct/1.0\r\n\r\n"
        ).encode()
        port = int(self.worker.config.data_port)  # type: ignore[attr-defined]
        [answer] = lane_exchange(self.pki, port, [head], lane=False)
        return answer.status, answer.body

    def visitor(self) -> http.client.HTTPSConnection:
        ctx = self.pki.client_ssl(None)
        port = int(self.frontend.config.https_port)  # type: ignore[attr-defined]
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        conn.sock = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname=f"{SITE}.{DOMAIN}"
        )
        return conn

    def get(self, conn: http.client.HTTPSConnection, path: str) -> tuple[int, bytes, str]:
        conn.request("GET", path, headers={"Host": f"{SITE}.{DOMAIN}"})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("X-Request-Id") or ""

    def cache(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.frontend.health().items() if k.startswith("cache_")}

    def logged_ids(self) -> list[str]:
        url = f"{self.worker.control_url}/v1/sites/{SITE}/logs?lines=5000"
        code, text = call(url, self.pki.client_ssl("management"))
        assert code == 200, text
        lines = bytes(text or b"").decode().splitlines()  # (None: nothing logged yet)
        return [ln.rsplit("id=", 1)[-1] for ln in lines if "[access]" in ln]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("forkedlog")
    with data_plane(root, DOMAIN, worker={"processes": 2}, frontend={"usage_interval": 0.0}) as (
        pki,
        fileserver,
        worker,
        frontend,
    ):
        fileserver.push_config({"version": 1, "sites": {SITE: {"uid": UID, "quota_bytes": 1 << 24}}})
        worker.push_config(
            {"version": 1, "fileserver": fileserver.control_url, "sites": {SITE: {"uid": UID}}}
        )
        frontend.push_config(
            {
                "version": 1,
                "domain": DOMAIN,
                "sites": {SITE: {"workers": [f"localhost:{worker.config.data_port}"]}},
            }
        )
        stack = Stack(pki, fileserver, worker, frontend)
        ctx = pki.client_ssl("publisher")
        url = f"{fileserver.control_url}/v1/sites/{SITE}"
        status, body = call(f"{url}/blobs", ctx, method="POST", data=PAGE)
        assert status == 200, body
        ops = [{"op": "put", "path": "page.html", "sha256": body["sha256"]}]
        status, body = call(f"{url}/commit", ctx, method="POST", body={"ops": ops})
        assert status == 200, body
        wait_until(
            lambda: stack.on_worker("/page.html", "warmup")[1] == PAGE, timeout=20, what="the page served"
        )
        assert worker.health()["processes"] == 2
        yield stack


def test_every_request_a_serving_process_answers_is_in_the_sites_log(stack: Stack) -> None:
    # Direct requests, each on its own connection: both serving processes answer some.
    direct = [f"direct-{next(_ids)}" for _ in range(12)]
    for rid in direct:
        assert stack.on_worker("/page.html", rid) == (200, PAGE)
    missing = [f"direct-{next(_ids)}" for _ in range(3)]
    for rid in missing:
        assert stack.on_worker("/nothing-here.html", rid)[0] == 404

    # Through the front end; once its feed is live, hits are sent from its cache and reported on the
    # feed, which a serving process holds.
    visitor = stack.visitor()
    via_front: list[str] = []
    try:
        wait_until(
            lambda: (
                (via_front.append(stack.get(visitor, "/page.html")[2]) or True)
                and stack.cache().get("cache_feeds_live", 0) >= 1
            ),
            timeout=15,
            what="the worker's feed live",
        )
        held = stack.cache()["cache_held_hits"]
        for _ in range(20):
            status, body, rid = stack.get(visitor, "/page.html")
            assert (status, body) == (200, PAGE)
            via_front.append(rid)
        assert stack.cache()["cache_held_hits"] - held == 20
    finally:
        visitor.close()
    assert "" not in via_front

    expected = direct + missing + via_front

    def not_logged() -> set[str]:
        return set(expected) - set(stack.logged_ids())

    wait_until(lambda: not not_logged(), timeout=10, what="every request's access line")
    logged = stack.logged_ids()
    # Once each, in the same form as a single process writes them.
    assert all(logged.count(rid) == 1 for rid in expected), [r for r in expected if logged.count(r) != 1]
    url = f"{stack.worker.control_url}/v1/sites/{SITE}/logs?lines=5000"
    text = bytes(call(url, stack.pki.client_ssl("management"))[1]).decode()
    # (Ending with the id: "id=direct-1" is also the start of "id=direct-11".)
    line = next(ln for ln in text.splitlines() if ln.endswith(f"id={direct[0]}"))
    # (What was sent counts the answer's head too, as with one process.)
    assert re.search(
        rf'Z \[access\] 203\.0\.113\.9 "GET /page\.html HTTP/1\.1" 200 \d+ "-" "Direct/1\.0" [\d.]+ms id={direct[0]}$',
        line,
    ), line
    line = next(ln for ln in text.splitlines() if ln.endswith(f"id={missing[0]}"))
    assert '"GET /nothing-here.html HTTP/1.1" 404 ' in line, line
    assert "access_lines_dropped" not in stack.worker.health()


def test_a_follower_gets_a_serving_process_s_new_line(stack: Stack) -> None:
    conn = http.client.HTTPSConnection(
        "localhost",
        int(stack.worker.config.control_port),  # type: ignore[attr-defined]
        context=stack.pki.client_ssl("management"),
        timeout=10,
    )
    try:
        conn.request("GET", f"/v1/sites/{SITE}/logs?follow=1&lines=0")
        resp = conn.getresponse()
        assert resp.status == 200
        rids = [f"follow-{next(_ids)}" for _ in range(4)]
        for rid in rids:  # on new connections: more than one serving process answers
            assert stack.on_worker("/page.html", rid) == (200, PAGE)
        seen = b""
        deadline = time.monotonic() + 10
        while not all(f"id={rid}".encode() in seen for rid in rids):
            assert time.monotonic() < deadline, seen
            seen += resp.read1(65536)
        assert b"[access]" in seen
    finally:
        conn.close()


async def test_lines_wait_while_the_channel_restarts_and_beyond_the_bound_are_counted(tmp_path: Path) -> None:
    """The real channel ends, in one process: lines held while the main process's end is away go once
    it is back; those past the bound are dropped, and the main process hears how many."""
    config = WorkerConfig(host="localhost", home=tmp_path / "worker")
    root = tmp_path / "apps"
    root.mkdir()
    manager = AppManager(config, lambda site: (True, None), root)
    manager.apply(WorkerSnapshot.parse({"version": 1, "sites": {"s": {"uid": UID}}}))
    log = manager.access_log("s")
    assert log is not None
    follower = log.follow()
    channel = AppChannel(manager)
    await channel.start()
    remote = RemoteApps(channel.path, held_bytes=20 * 1024)
    try:
        await remote.reload()  # connected, as a serving process is from its start
        sink = remote.log_of("s")
        for i in range(50):
            sink.access(AccessRecord(b"GET", f"/a{i}".encode(), 200, 10, 0.001, {b"x-request-id": b"r"}))
        first = await asyncio.wait_for(follower.get(), 2)
        assert first is not None and '[access] - "GET /a0 HTTP/1.1" 200 10 "-" "-" 1.0ms id=r' in first
        for _ in range(49):
            await asyncio.wait_for(follower.get(), 2)

        await channel.stop()  # the main process's end goes away (a restart) ...
        for i in range(50):
            sink.access(f"held {i}")
        await asyncio.sleep(0.3)
        assert follower.empty()
        # ... and far more than the bound comes meanwhile.
        for i in range(1000):
            sink.access(f"over {i}")
        channel = AppChannel(manager)
        await channel.start()
        got = [await asyncio.wait_for(follower.get(), 5) for _ in range(50)]
        assert [str(g).split("[access] ")[1] for g in got] == [f"held {i}" for i in range(50)]
        await wait_async(lambda: channel.access_dropped > 0)
        kept = 50 + follower.qsize()
        # Every line is either kept or counted as dropped.
        assert kept + channel.access_dropped == 1050 and channel.access_dropped > 500, (
            kept,
            channel.access_dropped,
        )
    finally:
        await remote.close()
        await channel.stop()
        log.flush()
    text = log.path.read_text()
    assert text.count("[access] ") == kept + 50


async def wait_async(predicate: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
