"""The worker's data server: front ends (and only front ends) ask it for site content.

Plain HTTP/1.1 over mutual TLS. The front end names the site in ``X-Sitecloud-Site``; the path is
decoded once, checked by :func:`shared.paths.site_relpath`, and looked up in the site's current
version directory.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Callable
from typing import Protocol
from urllib.parse import unquote_to_bytes

import httptools

from roles.worker._access import AccessRecord
from roles.worker._cache import SiteVersion
from roles.worker._fallback import fallback_for, page_hit
from roles.worker._feed import VersionFeeds
from roles.worker._http import (
    LANE_MAX_FILE,
    LANE_REFUSED_REQUEST,
    LANE_REFUSED_SITE,
    Divert,
    HttpConnection,
    Limits,
    Request,
    http_date_bytes,
    response_head,
)
from roles.worker._static import FileHit, HotCache, HotKey, Redirect, read_small, resolve, send_file
from roles.worker.config import WorkerConfig
from shared.errors import InvalidInput
from shared.listeners import listener
from shared.logs import get_logger
from shared.metrics import HttpCounts
from shared.pages import error_page
from shared.paths import site_relpath
from shared.pki import role_of_peer
from shared.tls import FEED_ALPN, LANE_ALPN, server_context

__all__ = ["DataServer", "Lookup"]

# (held, version): held with no version means nothing has been published to the site yet.
Lookup = Callable[[str], tuple[bool, SiteVersion | None]]

_ALLOWED = "GET, HEAD"
_SITE = b"x-sitecloud-site"
_CACHED = b"x-sitecloud-cached"


# A site's own 404 page is sent whole from memory; a larger one gives way to the platform's.
NOT_FOUND_PAGE_MAX = 256 * 1024


class AccessSink(Protocol):
    """A site's log stream, as far as access lines go (``roles/worker/apps/_sitelog.py``)."""

    def access(self, text: str | AccessRecord) -> None: ...


_KEEP = b"\r\nConnection: keep-alive\r\n\r\n"
_CLOSE = b"\r\nConnection: close\r\n\r\n"
# How often idle, slow and stuck connections are looked for.
_SWEEP = 0.25
# How long a request for a site whose first content is on its way waits for it (then 503, as
# before), how often the waiting requests look (one timer for all of them), and how many of one site
# may wait (more are answered 503 at once: a flood of them costs nothing but their connections).
FIRST_CONTENT_WAIT = 10.0
_FIRST_CONTENT_POLL = 0.02
_FIRST_CONTENT_MAX = 512


class DataServer:
    def __init__(
        self,
        config: WorkerConfig,
        lookup: Lookup,
        hot: HotCache,
        *,
        divert: Divert | None = None,
        failure: Callable[[str], str | None] = lambda _: None,
        pending: Callable[[str], bool] = lambda _: False,
        arriving: Callable[[str], bool] = lambda _: False,
        site_log: Callable[[str], AccessSink | None] = lambda _: None,
        feeds: VersionFeeds | None = None,
    ) -> None:
        self._config = config
        # Front ends' version feeds (roles/worker/_feed.py): None answers no feed.
        self._feeds = feeds
        # Where a site's access lines go (its log stream); None: nowhere (a site not held here).
        self._site_log = site_log
        # Why a held site without a version cannot be served (None: nothing published yet).
        self._failure = failure
        # A held site without a version whose content is on its way (or not yet known).
        self._pending = pending
        # A pending site whose content can come now: its requests wait for it (_FirstContent).
        self._arriving = arriving
        # Requests waiting for their site's first content, by site, and the one timer that looks.
        self._first: dict[str, set[_FirstContent]] = {}
        self._first_timer: asyncio.TimerHandle | None = None
        # Hook: requests for dynamic sites go to their apps (roles/worker/apps).
        self._divert = divert
        self._lookup = lookup
        self._hot = hot
        self._log = get_logger("worker", host=config.host)
        self._limits = Limits(
            keepalive_timeout=config.keepalive_timeout,
            request_timeout=config.request_timeout,
            send_timeout=config.send_timeout,
        )
        self._server: asyncio.Server | None = None
        self._connections: set[HttpConnection] = set()
        self._stopping = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._plain: asyncio.Server | None = None
        # Answers by status class, latency and site, in plain ints (see shared.metrics).
        self.counts = HttpCounts()

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Held by the supervisor across restarts (and shared by every serving process): see shared/listeners.
        self._server = await loop.create_server(
            self._connection,
            sock=listener("data", self._config.bind, self._config.data_port),
            ssl=_data_context(self._config),
            ssl_handshake_timeout=10,
            ssl_shutdown_timeout=5,
            backlog=1024,
        )
        plain = self._config.loopback_plain_listen
        if plain:
            host, _, port = plain.rpartition(":")
            if not ipaddress.ip_address(host.strip("[]")).is_loopback:
                self._log.error(
                    "loopback_plain_listen %s is not a loopback address; not listening there", plain
                )
            else:
                self._plain = await loop.create_server(
                    self._plain_connection, sock=listener("plain", host.strip("[]"), int(port)), backlog=1024
                )
                self._log.warning("also answering plain HTTP on loopback %s (no TLS on this hop)", plain)
        self._sweeper = loop.call_later(_SWEEP, self._sweep)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self._connections):
            conn.check(now)
        self._sweeper = loop.call_later(_SWEEP, self._sweep)

    async def stop(self) -> None:
        """Stop accepting, let responses in flight finish within the drain bound, then cut the rest."""
        if self._server is None:
            return
        self._stopping = True
        self._server.close()
        if self._feeds is not None:
            self._feeds.close()
        if self._plain is not None:
            self._plain.close()
        for conn in list(self._connections):
            conn.drain_and_close()
        # Done means answered and delivered: a response fully handed to the transport may still sit in
        # its buffers (a TLS transport's size leaves out what TCP holds), so "settled" also asks the
        # kernel whether everything reached the peer. Cutting earlier would cut a response's tail.
        deadline = asyncio.get_running_loop().time() + self._config.drain_timeout
        while not all(c.settled for c in list(self._connections)):
            if asyncio.get_running_loop().time() > deadline:
                self._log.warning("%s connections still busy after the drain bound", self.connections)
                break
            await asyncio.sleep(0.05)
        for conn in list(self._connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.sleep(0)
        self._server = None

    def _connection(self) -> HttpConnection:
        return HttpConnection(
            self._handle,
            limits=self._limits,
            log=self._log,
            admit=self._admit,
            on_close=self._closed,
            divert=self._divert,
            counts=self.counts,
            access=self._access,
        )

    def _plain_connection(self) -> HttpConnection:
        return HttpConnection(
            self._handle,
            limits=self._limits,
            log=self._log,
            admit=self._admit_plain,
            on_close=self._closed,
            divert=self._divert,
            counts=self.counts,
            access=self._access,
        )

    def _access(self, request: Request, status: int, sent: int, seconds: float) -> None:
        site = request.headers.get(_SITE)
        log = self._site_log(site.strip().decode("latin-1")) if site else None
        if log is not None:
            log.access(AccessRecord(request.method, request.target, status, sent, seconds, request.logged))

    def _wait_first(
        self, request: Request, conn: HttpConnection, keep_alive: bool, site: str
    ) -> _FirstContent:
        loop = asyncio.get_running_loop()
        waiter = _FirstContent(self._first, request, conn, keep_alive, site, loop.time() + FIRST_CONTENT_WAIT)
        self._first.setdefault(site, set()).add(waiter)
        if self._first_timer is None:
            self._first_timer = loop.call_later(_FIRST_CONTENT_POLL, self._look_first)
        return waiter

    def _look_first(self) -> None:
        """Answer the waiting requests whose site now has its content, or stopped getting it, or
        that waited long enough; look again shortly while any wait."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for site, waiters in list(self._first.items()):
            held, version = self._lookup(site)
            coming = held and version is None and self._arriving(site)
            done = [w for w in waiters if not coming or now >= w.until]
            for waiter in done:
                waiters.discard(waiter)
                self._answer_waited(waiter.request, waiter.conn, waiter.keep_alive)
            if not waiters:
                self._first.pop(site, None)
        self._first_timer = loop.call_later(_FIRST_CONTENT_POLL, self._look_first) if self._first else None

    def _answer_waited(self, request: Request, conn: HttpConnection, keep_alive: bool) -> None:
        """A request that waited for its site's first content: answered by the app the content
        made (its head is all there is: only GETs and HEADs wait), or by the static server."""
        try:
            divert = self._divert
            if divert is not None and divert.active and request.raw is not None:
                diverted = divert(
                    request.method, request.target, request.headers, request.raw, keep_alive, conn
                )
                if diverted is not None:
                    diverted.end()
                    conn.hand_over(diverted, keep_alive)
                    return
            keep = self._handle(request, conn, keep_alive, wait=False) and keep_alive
        except Exception:
            self._log.exception("failed to answer %r %r", request.method, request.target[:200])
            conn.abort()
            return
        conn.deferred_done(keep)

    def _admit_plain(self, conn: HttpConnection, transport: asyncio.Transport) -> bool:
        """The opt-in loopback listener: only processes on this machine can reach it."""
        if self._stopping:
            return False
        self._connections.add(conn)
        return True

    def _closed(self, conn: HttpConnection) -> None:
        self._connections.discard(conn)

    def _admit(self, conn: HttpConnection, transport: asyncio.Transport) -> bool:
        """Only front ends get in. Called once the TLS handshake is done (a failed one never gets here)."""
        role = role_of_peer(transport.get_extra_info("peercert"))
        if role == "frontend" and not self._stopping:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == FEED_ALPN:
                if self._feeds is not None:
                    self._feeds.accept(transport)
                return False
            self._connections.add(conn)
            return True
        self._log.warning(
            "refused a %s peer on the data port from %s", role, transport.get_extra_info("peername")
        )
        return False

    def _handle(self, request: Request, conn: HttpConnection, keep_alive: bool, wait: bool = True) -> bool:
        method = request.method
        head = method == b"HEAD"
        if not head and method != b"GET":
            _page(
                conn, 405, "Method not allowed", "A static site answers GET and HEAD only.", head, keep_alive,
                [("Allow", _ALLOWED)],
            )  # fmt: skip
            return keep_alive
        headers = request.headers
        site = headers.get(_SITE, b"").strip().decode("latin-1")
        held, version = self._lookup(site)
        if not held:
            _page(conn, 404, "No site here", "There is no site at this address.", head, keep_alive)
            return keep_alive
        if version is None and self._failure(site) is not None:
            # The reason is for the site's owner (site show), not for its visitors.
            _page(
                conn, 503, "Site unavailable",
                "This site cannot be served right now; its owner can see why in the site's status.",
                head, keep_alive, [("Retry-After", "60")],
            )  # fmt: skip
            return keep_alive
        if version is None and self._pending(site):
            # The site's first content is on its way (a publish a moment ago): its visitors wait for
            # it rather than see an error. A lane answers at once, so such a request leaves it.
            if conn.lane:
                conn.refuse_lane(LANE_REFUSED_SITE)
                return keep_alive
            waiting = self._first.get(site)
            if wait and self._arriving(site) and (waiting is None or len(waiting) < _FIRST_CONTENT_MAX):
                conn.defer(self._wait_first(request, conn, keep_alive, site))
                return keep_alive
            _page(
                conn, 503, "Site updating",
                "This site's content is on its way to this server; try again in a moment.",
                head, keep_alive, [("Retry-After", "2")],
            )  # fmt: skip
            return keep_alive
        if version is None:
            _page(
                conn, 200, "This site is ready",
                "Nothing has been published yet. Upload your files over FTP or web deploy "
                "and they will be served here.",
                head, keep_alive,
            )  # fmt: skip
            return keep_alive
        target = request.target
        q = target.find(b"?")
        key: HotKey = (site, version.number, target if q < 0 else target[:q])
        cached = self._hot.get(key)
        conn.version_line = version.line
        held_by = headers.get(_CACHED)
        conn.lane_fill = held_by is not None
        if held_by is not None and conn.lane and not head and version.tag and held_by == version.tag:
            # The front end holds this version's answer: a version's files never change, so the
            # same path names the same file. Tell it so instead of sending the body again.
            if cached is not None:
                conn.write_fresh(version.tag, len(cached.body))
                return keep_alive
            file = _file_at(version, target)
            if file is not None:
                conn.write_fresh(version.tag, file.size)
                return keep_alive
        if cached is not None:
            if len(headers) == 1 and not head and (not conn.lane or len(cached.body) <= LANE_MAX_FILE):
                # The hot path: a plain GET of a small file in memory, one write.
                conn.write_parts(
                    b"".join((cached.prefix, http_date_bytes(), _KEEP if keep_alive else _CLOSE)), cached.body
                )
            else:
                send_file(conn, cached.hit, headers, head=head, keep_alive=keep_alive, body=cached.body)
            return keep_alive
        try:
            url = httptools.parse_url(target)
            path = unquote_to_bytes(url.path or b"/").decode("utf-8")
            rel = site_relpath(path)
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError, InvalidInput):
            _page(conn, 400, "Bad address", "This address is not valid.", head, False)
            return False
        found = resolve(version.root, rel, slash=path.endswith("/"), packed=version.files, web=version.web)
        if found is None:
            if not self._fallback(conn, key, version, request, path, rel, keep_alive):
                _page(conn, 404, "Not found", "Nothing is published at this address.", head, keep_alive)
        elif isinstance(found, Redirect):
            location = found.location + (f"?{url.query.decode('latin-1')}" if url.query else "")
            _page(
                conn,
                301,
                "Moved",
                "This page lives one slash further.",
                head,
                keep_alive,
                [("Location", location)],
            )
        else:
            self._send(conn, key, found, request, head, keep_alive)
        return keep_alive

    def _fallback(
        self,
        conn: HttpConnection,
        key: HotKey,
        version: SiteVersion,
        request: Request,
        path: str,
        rel: str,
        keep_alive: bool,
    ) -> bool:
        """Answer a path with no file from the site's own pages (_fallback.py): a single-page app's
        page with 200, its 404 page with 404; False when it has neither for this path."""
        chosen = fallback_for(version.fallbacks, path, rel)
        if chosen is None:
            return False
        status, page = chosen
        hit = page_hit(version.root, page, version.files)
        if hit is None:
            return False
        head = request.method == b"HEAD"
        if status == 200:
            self._send(conn, key, hit, request, head, keep_alive)
            return True
        if hit.size > NOT_FOUND_PAGE_MAX:
            return False
        if conn.lane and hit.size > LANE_MAX_FILE:
            conn.refuse_lane(LANE_REFUSED_REQUEST)
            return True
        body = read_small(hit)
        headers = [
            ("Content-Type", hit.content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
        conn.write(response_head(404, headers, keep_alive=keep_alive) + (b"" if head else body))
        return True

    def _send(
        self,
        conn: HttpConnection,
        key: HotKey,
        hit: FileHit,
        request: Request,
        head: bool,
        keep_alive: bool,
    ) -> None:
        data = send_file(conn, hit, request.headers, head=head, keep_alive=keep_alive)
        if data is not None:
            self._hot.put(key, hit, data)


def _file_at(version: SiteVersion, target: bytes) -> FileHit | None:
    """The file ``target`` names in ``version``, if it names one."""
    try:
        url = httptools.parse_url(target)
        path = unquote_to_bytes(url.path or b"/").decode("utf-8")
        found = resolve(
            version.root, site_relpath(path), slash=path.endswith("/"), packed=version.files, web=version.web
        )
    except (httptools.HttpParserInvalidURLError, UnicodeDecodeError, InvalidInput):
        return None
    return found if isinstance(found, FileHit) else None


def _data_context(config: WorkerConfig) -> ssl.SSLContext:
    """Front ends may ask for a lane (pipelined GETs) or a version feed; others get plain HTTP/1.1."""
    ctx = server_context(config)
    ctx.set_alpn_protocols([LANE_ALPN, FEED_ALPN, "http/1.1"])
    return ctx


def _page(
    conn: HttpConnection,
    status: int,
    title: str,
    detail: str,
    head: bool,
    keep_alive: bool,
    extra: list[tuple[str, str]] | None = None,
) -> None:
    body = error_page(status, title, detail)
    headers = [
        ("Content-Type", "text/html; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        *(extra or []),
    ]
    conn.write(response_head(status, headers, keep_alive=keep_alive) + (b"" if head else body))


class _FirstContent:
    """A request held until its site's first content is served here (see ``DataServer._handle``):
    a visitor who asks right after the first publish gets the page, not a 503. Only bodiless
    requests get this far (a static site refuses other methods first)."""

    __slots__ = ("conn", "keep_alive", "request", "site", "until", "waiting")

    def __init__(
        self,
        waiting: dict[str, set[_FirstContent]],
        request: Request,
        conn: HttpConnection,
        keep_alive: bool,
        site: str,
        until: float,
    ) -> None:
        self.waiting = waiting
        self.request = request
        self.conn = conn
        self.keep_alive = keep_alive
        self.site = site
        self.until = until

    # -- Diverted, as far as a held request needs it

    def body(self, data: bytes) -> None:
        pass

    def end(self) -> None:
        pass

    def answer(self, conn: HttpConnection, keep_alive: bool) -> None:
        pass

    def resume(self) -> None:
        pass

    def abort(self) -> None:
        held = self.waiting.get(self.site)
        if held is not None:
            held.discard(self)

    @property
    def upgrading(self) -> bool:
        return False

    def tunnel_in(self, data: bytes) -> None:
        pass

    @property
    def refusal(self) -> str | None:
        return None

    def refused(self) -> None:
        pass
