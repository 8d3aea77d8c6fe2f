"""The front end's cache of static answers (roles/frontend/_cache.py, roles/frontend/_feed.py).

Fileserver, worker and front end are real processes; visitors go through the front end over HTTPS.
A held answer is only ever sent when the worker said its content version is still the one served:
for that very request, or ahead of time on its version feed, on which a new version is announced
and acknowledged before the worker serves it. A publish is never hidden, two sites never share an
answer, and a visitor cannot claim a version to get a stale one.
"""

from __future__ import annotations

import gzip
import http.client
import itertools
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from roles.frontend._cache import CacheEntry, ResponseCache, cacheable, without_date
from tests.support import CloudPKI, RoleProcess, call, data_plane, lane_exchange, publish_files, wait_until

DOMAIN = "sites.test"
SITES = {"alpha": "a1a1a1a1a1a1a1a1", "beta": "b2b2b2b2b2b2b2b2"}
_generations = itertools.count(10)
BIG = bytes(range(256)) * 1200  # 300 KB: above a lane's usual limit, still kept


@dataclass
class Stack:
    pki: CloudPKI
    fileserver: RoleProcess
    worker: RoleProcess
    frontend: RoleProcess

    @property
    def data_port(self) -> int:
        return int(self.worker.config.data_port)  # type: ignore[attr-defined]

    def get(self, site: str, path: str, **headers: str) -> tuple[int, bytes, http.client.HTTPResponse]:
        ctx = self.pki.client_ssl(None)
        port = int(self.frontend.config.https_port)  # type: ignore[attr-defined]
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        tls = ctx.wrap_socket(sock, server_hostname=f"{site}.{DOMAIN}")
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        conn.sock = tls
        try:
            conn.request("GET", path, headers={"Host": f"{site}.{DOMAIN}", **headers})
            resp = conn.getresponse()
            return resp.status, resp.read(), resp
        finally:
            conn.close()

    def publish(self, site: str, files: dict[str, bytes]) -> None:
        publish_files(self.pki, self.fileserver, site, files)

    def on_worker(self, site: str, path: str) -> bytes:
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Sitecloud-Site: {site}\r\n\r\n".encode()
        [answer] = lane_exchange(self.pki, self.data_port, [head], lane=False)
        return answer.body

    def cache(self) -> dict[str, int]:
        health = self.frontend.health()
        return {k: int(v) for k, v in health.items() if k.startswith("cache_")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("fecache")
    with data_plane(root, DOMAIN, frontend={"usage_interval": 0.0}) as (pki, fileserver, worker, frontend):
        quota = 1 << 24
        fileserver.push_config(
            {"version": 1, "sites": {s: {"uid": u, "quota_bytes": quota} for s, u in SITES.items()}}
        )
        worker.push_config(
            {
                "version": 1,
                "fileserver": fileserver.control_url,
                "sites": {s: {"uid": u} for s, u in SITES.items()},
            }
        )
        frontend.push_config(
            {
                "version": next(_generations),
                "domain": DOMAIN,
                "sites": {s: {"workers": [f"localhost:{worker.config.data_port}"]} for s in SITES},
            }
        )
        yield Stack(pki, fileserver, worker, frontend)


def _live(stack: Stack, site: str, path: str, body: bytes) -> None:
    wait_until(lambda: stack.on_worker(site, path) == body, timeout=20, what=f"{site}{path} on the worker")


def test_a_publish_is_never_hidden_by_a_held_answer(stack: Stack) -> None:
    v1, v2 = b"<p>version one</p>", b"<p>version two, longer</p>"
    stack.publish("alpha", {"page.html": v1, "big.bin": BIG})
    _live(stack, "alpha", "/page.html", v1)
    assert stack.get("alpha", "/page.html")[:2] == (200, v1)
    assert stack.get("alpha", "/page.html")[:2] == (200, v1)  # (the lane may open on the first)
    before = stack.cache()
    status, body, resp = stack.get("alpha", "/page.html")
    after = stack.cache()
    # The second fetch came from the front end's copy (the worker only said it is still current).
    assert (status, body) == (200, v1) and after["cache_hits"] == before["cache_hits"] + 1
    assert resp.getheader("X-Sitecloud-Version") is None and resp.getheader("X-Sitecloud-Fresh") is None
    assert resp.getheader("Date") and resp.getheader("Content-Length") == str(len(v1))
    # A file too big for a lane otherwise is kept too, and served whole.
    assert stack.get("alpha", "/big.bin")[:2] == (200, BIG)
    hits = stack.cache()["cache_hits"]
    assert stack.get("alpha", "/big.bin")[:2] == (200, BIG)
    assert stack.cache()["cache_hits"] == hits + 1

    stack.publish("alpha", {"page.html": v2})
    _live(stack, "alpha", "/page.html", v2)
    # The very next fetch once the worker serves v2 is v2, with no snapshot or purge in between.
    assert stack.get("alpha", "/page.html")[:2] == (200, v2)
    assert stack.get("alpha", "/page.html")[:2] == (200, v2)


def test_a_hit_is_still_in_the_sites_access_log_as_the_200_the_visitor_got(stack: Stack) -> None:
    page = b"<p>logged even when kept</p>"
    stack.publish("beta", {"logged.html": page})
    _live(stack, "beta", "/logged.html", page)
    _feed_live(stack, "beta", "/logged.html")
    for _ in range(2):
        stack.get("beta", "/logged.html")
    before = stack.cache()
    agent, referer = "Probe/1.0 (Mixed Case)", "https://Ref.Example/Some/Page"
    status, body, resp = stack.get("beta", "/logged.html", **{"User-Agent": agent, "Referer": referer})
    after = stack.cache()
    assert (status, body) == (200, page)
    # Given by the front end alone: its line comes from the report on the worker's feed.
    assert after["cache_held_hits"] == before["cache_held_hits"] + 1, (before, after)
    rid = resp.getheader("X-Request-Id")
    assert rid

    def logged() -> str:
        url = f"{stack.worker.control_url}/v1/sites/beta/logs?lines=200"
        code, text = call(url, stack.pki.client_ssl("controller"))
        assert code == 200
        return next((ln for ln in bytes(text).decode().splitlines() if f"id={rid}" in ln), "")

    line = wait_until(logged, timeout=10, what="the hit's access line")
    assert f'"GET /logged.html HTTP/1.1" 200 {len(page)} ' in line and "[access]" in line
    # The visitor's own User-Agent and Referer, as sent.
    assert f'"{referer}" "{agent}"' in line, line


def test_every_hit_of_a_burst_longer_than_one_report_is_in_the_access_log(stack: Stack) -> None:
    """Held hits go to the worker in short lines (a few hundred at most each): a burst of more than
    that loses none of them."""
    page = b"<p>a burst</p>"
    stack.publish("beta", {"burst.html": page})
    _live(stack, "beta", "/burst.html", page)
    _feed_live(stack, "beta", "/burst.html")
    visitor = Visitor(stack, "beta")
    rids: set[str] = set()
    try:
        held = stack.cache()["cache_held_hits"]
        for _ in range(450):
            visitor.conn.request("GET", "/burst.html", headers={"Host": visitor.host})
            resp = visitor.conn.getresponse()
            assert (resp.status, resp.read()) == (200, page)
            rids.add(resp.getheader("X-Request-Id") or "")
        assert stack.cache()["cache_held_hits"] - held >= 400
    finally:
        visitor.close()
    assert len(rids) == 450 and "" not in rids

    def missing() -> set[str]:
        url = f"{stack.worker.control_url}/v1/sites/beta/logs?lines=2000"
        code, text = call(url, stack.pki.client_ssl("controller"))
        assert code == 200
        logged = {ln.rsplit("id=", 1)[-1] for ln in bytes(text).decode().splitlines() if "/burst.html" in ln}
        return rids - logged

    wait_until(lambda: not missing(), timeout=15, what="every hit of the burst in the access log")


class Visitor:
    """One keep-alive HTTPS connection to the front end, for many GETs in a row."""

    def __init__(self, stack: Stack, site: str) -> None:
        port = int(stack.frontend.config.https_port)  # type: ignore[attr-defined]
        ctx = stack.pki.client_ssl(None)
        self.host = f"{site}.{DOMAIN}"
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn.sock = ctx.wrap_socket(sock, server_hostname=self.host)

    def get(self, path: str) -> tuple[int, bytes]:
        self.conn.request("GET", path, headers={"Host": self.host})
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    def close(self) -> None:
        self.conn.close()


def _feed_live(stack: Stack, site: str = "alpha", path: str = "/page.html") -> None:
    # The worker's version feed opens once the front end keeps one of its answers (again after a
    # freeze, once its reconnect's back-off ends: longer on a loaded machine).
    wait_until(
        lambda: stack.get(site, path)[0] == 200 and stack.cache().get("cache_feeds_live", 0) >= 1,
        timeout=30,
        what="a live feed",
    )


def test_hits_are_sent_without_the_hop_while_the_workers_feed_is_live(stack: Stack) -> None:
    page = b"<p>kept and sent from the front end</p>"
    stack.publish("alpha", {"held.html": page})
    _live(stack, "alpha", "/held.html", page)
    _feed_live(stack)
    visitor = Visitor(stack, "alpha")
    try:
        for _ in range(3):
            assert visitor.get("/held.html") == (200, page)
        before = stack.cache()
        for _ in range(20):
            assert visitor.get("/held.html") == (200, page)
        after = stack.cache()
    finally:
        visitor.close()
    assert after["cache_held_hits"] - before["cache_held_hits"] == 20, (before, after)


def test_a_publish_then_fetching_at_once_many_times_never_shows_the_old_page(stack: Stack) -> None:
    """Each round publishes a new page and fetches it through the front end in a tight loop from the
    moment the publish is committed: the new page shows up as fast as the worker serves it, and once
    it has, the old one never comes back (nor after the worker said it serves the new one)."""
    _feed_live(stack)
    stack.publish("beta", {"race.html": b"round 0"})
    _live(stack, "beta", "/race.html", b"round 0")
    visitor = Visitor(stack, "beta")
    waits: list[float] = []
    try:
        held = stack.cache()["cache_held_hits"]
        for n in range(1, 16):
            for _ in range(3):  # the page is held again (and sent without the hop) before the publish
                assert visitor.get("/race.html") == (200, b"round %d" % (n - 1))
            new, old = b"round %d" % n, b"round %d" % (n - 1)
            stack.publish("beta", {"race.html": new})
            committed = time.monotonic()
            seen: list[bytes] = []
            while not seen or seen[-1] != new:
                status, body = visitor.get("/race.html")
                assert status == 200 and body in (old, new), body
                seen.append(body)
                assert time.monotonic() - committed < 20, "the new page never came"
            waits.append(time.monotonic() - committed)
            for _ in range(30):
                assert visitor.get("/race.html") == (200, new)
            # The worker serves the new page: so does the front end, on a new connection too.
            assert stack.on_worker("beta", "/race.html") == new
            assert stack.get("beta", "/race.html")[:2] == (200, new)
        assert stack.cache()["cache_held_hits"] > held + 15 * 20
    finally:
        visitor.close()
    waits.sort()
    print(
        f"publish committed -> new page through the front end: median {waits[len(waits) // 2] * 1000:.0f} ms"
    )


def test_a_front_end_that_stops_answering_its_feed_never_serves_a_replaced_page(stack: Stack) -> None:
    """The worker waits for a frozen front end's lease to run out (then cuts its feed) before it
    serves a new version; thawed, the front end asks the worker again rather than trust its copy."""
    old, new = b"<p>before the freeze</p>", b"<p>published while frozen</p>"
    stack.publish("alpha", {"frozen.html": old})
    _live(stack, "alpha", "/frozen.html", old)
    _feed_live(stack)
    for _ in range(3):
        assert stack.get("alpha", "/frozen.html")[:2] == (200, old)
    assert stack.frontend.proc is not None
    pid = stack.frontend.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        stack.publish("alpha", {"frozen.html": new})
        started = time.monotonic()
        _live(stack, "alpha", "/frozen.html", new)
        waited = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert waited < 15, waited
    for _ in range(5):
        assert stack.get("alpha", "/frozen.html")[:2] == (200, new)
    _feed_live(stack)  # (the feed comes back)
    for _ in range(5):
        assert stack.get("alpha", "/frozen.html")[:2] == (200, new)


def test_two_sites_same_path_never_mix(stack: Stack) -> None:
    a, b = b"alpha's own index", b"beta's very own index page"
    stack.publish("alpha", {"index.html": a})
    stack.publish("beta", {"index.html": b})
    _live(stack, "alpha", "/index.html", a)
    _live(stack, "beta", "/index.html", b)
    for _ in range(3):
        assert stack.get("alpha", "/index.html")[:2] == (200, a)
        assert stack.get("beta", "/index.html")[:2] == (200, b)


def test_a_visitor_cannot_claim_a_version_nor_get_a_part_or_304_from_the_cache(stack: Stack) -> None:
    page = b"<p>only the worker says what is fresh</p>"
    stack.publish("beta", {"claim.html": page})
    _live(stack, "beta", "/claim.html", page)
    assert stack.get("beta", "/claim.html")[:2] == (200, page)
    # A visitor's own "I hold version x" header is dropped: it gets the whole answer.
    status, body, _ = stack.get("beta", "/claim.html", **{"X-Sitecloud-Cached": "b2b2b2b2b2b2b2b2.1"})
    assert (status, body) == (200, page)
    # Ranges and conditionals are answered by the worker for that request, never from the copy.
    status, body, resp = stack.get("beta", "/claim.html", Range="bytes=0-5")
    assert (status, body) == (206, page[:6])
    etag = resp.getheader("ETag")
    assert etag
    assert stack.get("beta", "/claim.html", **{"If-None-Match": etag})[0] == 304


def test_answers_that_set_cookies_or_are_private_are_never_kept() -> None:
    ok = b"Content-Type: text/html\r\nContent-Length: 5\r\nCache-Control: public, max-age=60\r\n"
    assert cacheable(ok)
    for line in (
        b"Set-Cookie: session=abc; HttpOnly\r\n",
        b"set-cookie: a=b\r\n",
        b"Cache-Control: private, max-age=60\r\n",
        b"Cache-Control: no-store\r\n",
        b"cache-control: public\r\nCache-Control: no-cache\r\n",
        b"Vary: Cookie\r\n",
    ):
        assert not cacheable(b"Content-Type: text/html\r\n" + line), line
    assert without_date(b"A: 1\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\nB: 2\r\n") == b"A: 1\r\nB: 2\r\n"
    assert without_date(b"Date: x\r\nB: 2\r\n") == b"B: 2\r\n"


def test_the_cache_keeps_to_its_budget_and_forgets_sites_that_left() -> None:
    cache = ResponseCache(max_bytes=1000, max_entry=400)
    for n in range(5):
        cache.put("s", b"/%d" % n, CacheEntry(b"u.1", b"HTTP/1.1 200 OK\r\n", b"x" * 300))
    assert cache.size <= 1000 and cache.get("s", b"/0") is None and cache.get("s", b"/4") is not None
    assert not cache.put("s", b"/huge", CacheEntry(b"u.1", b"", b"x" * 500))
    assert cache.get("s", b"/huge") is None
    cache.put("other", b"/4", CacheEntry(b"v.1", b"", b"y"))
    assert cache.get("other", b"/4") is not cache.get("s", b"/4")
    cache.drop_sites({"other"})
    assert cache.get("s", b"/4") is None and cache.get("other", b"/4") is not None


def test_text_files_go_gzipped_to_visitors_who_take_gzip_and_as_they_are_to_the_rest(stack: Stack) -> None:
    css = b"".join(b".rule-%d { color: #%06x; margin: %dpx; }\n" % (n, n * 977, n % 40) for n in range(800))
    js = b"function f%d(a) { return a * %d; }\n" % (1, 2) * 600
    small, png = b"body{}", b"\x89PNG\r\n\x1a\n" + os.urandom(4000)
    stack.publish("alpha", {"site.css": css, "app.js": js, "small.css": small, "logo.png": png})
    _live(stack, "alpha", "/site.css", css)
    _feed_live(stack, path="/site.css")
    gzip_ok = {"Accept-Encoding": "gzip, deflate, br"}

    def gzipped(path: str) -> bool:
        status, _, resp = stack.get("alpha", path, **gzip_ok)
        return status == 200 and resp.getheader("Content-Encoding") == "gzip"

    # The first answers go as they are while its gzip form is made, once, off the loop.
    wait_until(lambda: gzipped("/site.css"), timeout=10, what="the gzip form of site.css")
    status, body, resp = stack.get("alpha", "/site.css", **gzip_ok)
    assert gzip.decompress(body) == css and len(body) < len(css) // 4
    assert resp.getheader("Vary") == "Accept-Encoding" and resp.getheader("Content-Length") == str(len(body))
    etag = resp.getheader("ETag")
    assert etag.startswith('W/"'), etag
    # The same file as it is: to a visitor who takes no gzip, or refuses it.
    for headers in ({}, {"Accept-Encoding": "identity"}, {"Accept-Encoding": "br, gzip;q=0"}):
        status, body, resp = stack.get("alpha", "/site.css", **headers)
        assert (status, body, resp.getheader("Content-Encoding")) == (200, css, None), headers
        assert resp.getheader("Vary") == "Accept-Encoding"
    # A revalidation with the gzip form's validator still matches the file.
    assert stack.get("alpha", "/site.css", **gzip_ok, **{"If-None-Match": etag})[0] == 304
    wait_until(lambda: gzipped("/app.js"), timeout=10, what="the gzip form of app.js")
    assert gzip.decompress(stack.get("alpha", "/app.js", **gzip_ok)[1]) == js
    # Too small to gain, or compressed already: always as they are.
    for path, data in (("/small.css", small), ("/logo.png", png)):
        for _ in range(3):
            status, body, resp = stack.get("alpha", path, **gzip_ok)
            assert (status, body, resp.getheader("Content-Encoding")) == (200, data, None), path
