"""The visitor side of the proxy: one protocol per client connection (HTTP or HTTPS).

Requests are parsed with httptools. Each one becomes a :class:`_Request` in a queue; the first in the
queue is the one being answered, so pipelined requests are answered in order (and reading pauses while
one waits). A request is routed by its Host, sent to a worker over a pooled connection, and the
response streams back with flow control both ways.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

import httptools

from roles.frontend._cache import CacheEntry, app_lifetime, cacheable, http_date_line, without_date
from roles.frontend._head import (
    AUTHORIZATION,
    CONDITIONAL,
    ENCODING,
    IDEMPOTENT,
    NOTED,
    USER_AGENT,
    absolute_form,
    https_redirect,
    normalize_host,
    only_chunked,
)
from roles.frontend._http import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    H_CONNECTION,
    H_CONTENT_LENGTH,
    H_COOKIE,
    H_EXPECT,
    H_HOST,
    H_TRANSFER_ENCODING,
    H_UPGRADE,
    H_XFF,
    PAGES,
    REQUEST_HEADERS,
    Page,
    extra_connection_tokens,
    strip_headers,
    text_page,
)
from roles.frontend._lane import lane_eligible
from roles.frontend._proxy import Proxy
from roles.frontend._routes import AFFINITY_COOKIE, Site
from roles.frontend._upstream import Exchange, Lane, Upstream, UpstreamConnection
from shared.acme import CHALLENGE_PATH

__all__ = ["ClientConnection"]

# Where the connection is in reading its current request.
_IDLE = 0  # between requests (or before the first)
_HEAD = 1  # reading a request line and headers
_BODY = 2  # reading a request body
_WAIT = 3  # request read; its response (or an earlier one) in flight
_DEAD = 4  # a framing error: nothing more is read
_TUNNEL = 5  # a WebSocket upgrade: bytes pass through both ways, unparsed

# Why reading from the client is paused (a bit each; reading resumes when none is left).
_PAUSE_PIPELINE = 1  # a request is parsed while an earlier one is still being answered
_PAUSE_UPSTREAM = 2  # the worker's connection has a full write buffer
_PAUSE_BUFFER = 4  # body bytes buffered while the worker connection is being made
_PAUSE_DEAD = 8

_BUFFER_LIMIT = 256 * 1024
# What one turn wrote to a client is joined into one piece up to this size; larger, it goes in pieces.
_JOIN_MAX = 16 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
# How long a site whose app answers its GETs keeps them off the lane before the lane is tried again.
_LANE_OFF_FOR = 30.0
# How many refused targets a site remembers (then it starts over).
_OFF_LANE_MAX = 1024
_CHALLENGE_PREFIX = CHALLENGE_PATH.encode()


class _Reject(Exception):
    """Raised from a parser callback to stop parsing; the status is on the connection."""


class _Request:
    """One request on a client connection, from its headers to the end of its response."""

    __slots__ = (
        "body_done",
        "body_parts",
        "body_seen",
        "buffered",
        "cached",
        "cached_version",
        "chunked",
        "chunked_response",
        "close_after",
        "conn",
        "encoding",
        "expect_continue",
        "fill",
        "fill_version",
        "fresh",
        "head",
        "head_request",
        "held",
        "http11",
        "keep_alive",
        "kept",
        "kept_for",
        "lane",
        "lane_ok",
        "local",
        "pinned",
        "replayable",
        "response_started",
        "rid",
        "set_cookie",
        "site",
        "started",
        "t0",
        "target",
        "tried",
        "tunnel",
        "upgrade",
        "upstream",
    )

    def __init__(self) -> None:
        self.site: Site | None = None
        self.head = b""
        self.local: Page | None = None  # a platform page answers instead of a worker
        self.keep_alive = True
        self.http11 = True
        self.head_request = False
        self.chunked = False
        self.replayable = False  # idempotent and bodiless: may be sent again after a stale connection
        self.expect_continue = False
        self.body_done = False
        self.body_parts: list[bytes] | None = None
        self.buffered = 0
        self.started = False
        self.response_started = False
        self.chunked_response = False
        self.close_after = False
        self.conn: UpstreamConnection | None = None
        # A GET on a lane (roles/frontend/_lane.py) instead of a connection of its own. Its answer
        # is whole and small, so a slow client never holds up the lane: it is not paused for one.
        self.lane: Lane | None = None
        self.lane_ok = False
        self.target = b""  # kept for lane requests: a refused one is remembered by it
        self.upstream: Upstream | None = None
        self.tried: list[Upstream] | None = None
        self.fresh = False
        self.body_seen = 0
        self.tunnel = False
        self.upgrade = b""
        self.pinned: Upstream | None = None  # the worker an affinity cookie names
        self.set_cookie = b""
        self.t0 = 0.0  # loop time of its first byte: the latency metric runs from here
        # "X-Request-Id: <id>\r\n": sent to the worker (which logs it) and back to the visitor.
        self.rid = b""
        # The front end's cache (roles/frontend/_cache.py): the answer held for this request, its
        # version, and whether the worker's answer may be kept (a plain GET on the lane).
        self.cached: CacheEntry | None = None
        self.cached_version = b""
        self.fill = False
        # An answer held here that is sent without asking a worker (its version feeds say current).
        self.held: CacheEntry | None = None
        # An app's answer being kept (its head, then its body's pieces), and the site's version then.
        self.kept: list[bytes] | None = None
        self.kept_for = 0.0
        self.fill_version = b""
        self.encoding = b""  # its Accept-Encoding, for an app's answer that varies by it


class ClientConnection(asyncio.Protocol):
    def __init__(self, proxy: Proxy, scheme: bytes) -> None:
        self._proxy = proxy
        self._https = scheme == b"https"
        self._proto_header = b"X-Forwarded-Proto: " + scheme + b"\r\n"
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._ip = b""
        self._queue: deque[_Request] = deque()
        self._req: _Request | None = None  # the request being parsed
        self._state = _IDLE
        self._paused = 0
        self._write_paused = False
        self._closing = False
        self._eof = False
        self._tls = False
        self.read_deadline = 0.0
        self.write_deadline = 0.0
        # Writes made while corked leave in one transport.write (one TLS record, one send).
        self._corked = 0
        self._out: list[bytes] = []
        # Likewise for what goes to the worker: held to the end of the read, so a request that turns
        # out malformed further on in the same read never leaves at all.
        self._up: UpstreamConnection | None = None
        self._up_out: list[bytes] = []
        # The usage counters of the site whose response is being written ([requests, in, out]).
        self._meter: list[int] | None = None
        # A WebSocket tunnel: the worker connection, and client bytes that came before the 101.
        self._tunnel: UpstreamConnection | None = None
        self._early: list[bytes] | None = None
        # Per-request parsing state (reset in on_message_begin).
        self._error = 0
        self._began = False
        self._raw_head = 0
        self._head_bytes = 0
        self._nheaders = 0
        self._target = b""
        self._headers = bytearray()
        self._host: bytes | None = None
        self._hosts = 0
        self._lengths = 0
        self._length = b""
        self._te: bytes | None = None
        self._xff: bytes | None = None
        self._expect: bytes | None = None
        self._tokens: frozenset[bytes] | None = None
        self._cookie: bytes | None = None
        self._upgrade: bytes | None = None
        self._plain = True  # no conditional or range header: the whole answer, the same for anyone
        self._auth = False
        self._encoding = b""
        self._agent = b""  # (for the access line of an answer given from the cache)
        self._referer = b""

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but has its interface.
        self.transport = transport = cast(asyncio.Transport, transport)
        self._tls = transport.get_extra_info("sslcontext") is not None
        peer = transport.get_extra_info("peername")
        self._ip = str(peer[0]).encode() if peer else b"unknown"
        proxy = self._proxy
        proxy.clients.add(self)
        # A new connection gets the header timeout for its first request, not the idle one.
        self.read_deadline = proxy.loop.time() + proxy.header_timeout
        if proxy.draining:
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._out.clear()
        self._up_out.clear()
        self._up = None
        self._proxy.client_gone(self)
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            tunnel.close()
        for req in self._queue:
            if req.conn is not None:
                if req.conn is not tunnel:
                    req.conn.abandon()
                req.conn = None
            if req.lane is not None:
                req.lane.abandon(req)
                req.lane = None
            self._release(req)
        self._queue.clear()
        self._req = None

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._queue and not self._tls and self._tunnel is None:
            return True  # answer what was asked (a plain TCP half-close); close after it
        return None

    def pause_writing(self) -> None:
        self._write_paused = True
        self.write_deadline = self._proxy.loop.time() + self._proxy.body_timeout
        if self._queue and (conn := self._queue[0].conn) is not None:
            conn.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self.write_deadline = 0.0
        if self._queue and (conn := self._queue[0].conn) is not None:
            conn.resume_reading()

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state >= _DEAD or self._closing:
            if state == _TUNNEL and not self._closing:
                self._tunnel_in(data)
            return
        if state == _BODY:
            self.read_deadline = self._proxy.loop.time() + self._proxy.body_timeout
        self._began = False
        parser = self._parser
        self._corked += 1
        try:
            while True:
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade as exc:
                    data = data[int(exc.args[0]) :]
                    if self._state == _DEAD:
                        break
                    last = self._queue[-1] if self._queue else None
                    if last is not None and last.tunnel:
                        # A WebSocket: what follows is the tunnel's, held until the worker says 101.
                        self._state = _TUNNEL
                        self.read_deadline = 0.0
                        self._early = [data] if data else []
                        self._pause(_PAUSE_BUFFER)
                        break
                    # Any other Upgrade is proxied as a plain request (its Upgrade header dropped);
                    # llhttp stops after it, so feed it the rest.
                    if data:
                        continue
                except httptools.HttpParserError as exc:
                    cause = exc.__context__
                    if cause is not None and not isinstance(cause, _Reject):
                        self._proxy.log.error("error handling a request", exc_info=cause)
                    self._reject(self._error or 400)
                    return
                break
            # Headers still incomplete after this read: bound what they may take (llhttp has no limit).
            if self._state == _HEAD and not self._began:
                self._raw_head += len(data)
                if self._raw_head > self._proxy.max_header_bytes:
                    self._reject(431)
        finally:
            self.uncork()

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._req = req = _Request()
        req.t0 = now = self._proxy.loop.time()
        self._state = _HEAD
        self._began = True
        self._error = 0
        self._raw_head = 0
        self._head_bytes = 0
        self._nheaders = 0
        self._target = b""
        self._headers = bytearray()
        self._host = None
        self._hosts = 0
        self._lengths = 0
        self._length = b""
        self._te = None
        self._xff = None
        self._expect = None
        self._tokens = None
        self._cookie = None
        self._upgrade = None
        self._plain = True
        self._auth = False
        self._encoding = b""
        self._agent = b""  # (for the access line of an answer given from the cache)
        self._referer = b""
        self.read_deadline = now + self._proxy.header_timeout
        if self._queue:
            self._pause(_PAUSE_PIPELINE)

    def on_url(self, url: bytes) -> None:
        self._target += url
        if len(self._target) > self._proxy.max_header_bytes:
            self._error = 414
            raise _Reject

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        self._nheaders += 1
        if self._head_bytes > self._proxy.max_header_bytes or self._nheaders > self._proxy.max_headers:
            self._error = 431
            raise _Reject
        lname = name.lower()
        kind = REQUEST_HEADERS.get(lname)
        if kind is None:
            noted = NOTED.get(lname)
            if noted is not None:
                if noted == CONDITIONAL:
                    self._plain = False
                elif noted == AUTHORIZATION:
                    self._auth = True
                elif noted == ENCODING:
                    self._encoding = value
                elif noted == USER_AGENT:
                    self._agent = self._agent or value
                else:
                    self._referer = self._referer or value
        if kind is None or kind in (H_CONTENT_LENGTH, H_COOKIE):
            if kind == H_CONTENT_LENGTH:
                self._lengths += 1
                self._length = value
            elif kind == H_COOKIE:
                self._cookie = value if self._cookie is None else self._cookie + b"; " + value
            h = self._headers
            h += name
            h += b": "
            h += value
            h += b"\r\n"
        elif kind == H_HOST:
            self._hosts += 1
            self._host = value
        elif kind == H_TRANSFER_ENCODING:
            self._te = value if self._te is None else self._te + b", " + value
        elif kind == H_XFF:
            self._xff = value if self._xff is None else self._xff + b", " + value
        elif kind == H_CONNECTION:
            tokens = extra_connection_tokens(value)
            if tokens:
                self._tokens = tokens if self._tokens is None else self._tokens | tokens
        elif kind == H_EXPECT:
            self._expect = value.lower()
        elif kind == H_UPGRADE:
            self._upgrade = value
        # H_DROP: hop-by-hop, or ours to set

    def on_headers_complete(self) -> None:
        req = self._req
        if req is None:
            return
        parser = self._parser
        method: bytes = parser.get_method()
        req.http11 = http11 = parser.get_http_version() == "1.1"
        req.keep_alive = parser.should_keep_alive()
        req.head_request = method == b"HEAD"
        if self._hosts > 1 or (http11 and not self._hosts):
            self._error = 400  # RFC 9112 3.2: exactly one Host
            raise _Reject
        if method == b"CONNECT":
            self._error = 405
            raise _Reject
        te = self._te
        if te is not None:
            if not only_chunked(te):
                self._error = 501  # only chunked is re-framed; anything else cannot be forwarded
                raise _Reject
            req.chunked = True
        # llhttp has refused Content-Length with Transfer-Encoding, and duplicate or invalid lengths.
        has_body = req.chunked or (self._lengths == 1 and self._length.strip(b" \t0") != b"")
        upgrade = parser.should_upgrade()
        if has_body and upgrade:
            self._error = 400  # llhttp would treat the body as the upgraded protocol
            raise _Reject
        target = self._target
        host = self._host
        if target[:1] != b"/" and target != b"*":
            try:
                absolute = absolute_form(target)
            except ValueError:
                self._error = 400
                raise _Reject from None
            if absolute is not None:
                host, target = absolute
        name = normalize_host(host) if host is not None else b""
        # RFC 8555 8.3: the CA fetches the key authorization over plain HTTP, before any HTTPS redirect.
        challenge = (
            self._proxy.challenges.get((name, target))
            if self._proxy.challenges and target.startswith(_CHALLENGE_PREFIX)
            else None
        )
        site = self._proxy.routes.get(name) if host is not None and challenge is None else None
        if challenge is not None:
            req.local = text_page(200, b"OK", challenge)
        elif site is None:
            # Not a site's name (a balancer checks by address): the front end's own health answers.
            req.local = self._proxy.healthz() if target == b"/healthz" else PAGES[404]
        elif site.stopped is not None:
            # Over its plan's daily quota: the quota page, and nothing more counted against it.
            req.local = site.stopped
            site = None
        else:
            req.site = site
        if site is not None:
            assert host is not None
            usage = site.usage
            usage[0] += 1
            usage[1] += self._head_bytes + len(target) + 16
            if site.max_body and self._lengths == 1 and has_body and int(self._length) > site.max_body:
                self._error = 413
                raise _Reject
            if site.https_only and not self._https:
                req.local = https_redirect(method, name, target, self._proxy.public_https_port)
            else:
                self._forward_head(req, site, method, target, host, has_body, upgrade)
                if req.held is not None:
                    self._answer_held(req, req.held)
                    return
        if has_body:
            self._state = _BODY
            self.read_deadline = self._proxy.loop.time() + self._proxy.body_timeout
        else:
            req.body_done = True
            self._state = _WAIT
            self.read_deadline = 0.0
        self._queue.append(req)
        if len(self._queue) == 1:
            self._advance()

    def _forward_head(
        self,
        req: _Request,
        site: Site,
        method: bytes,
        target: bytes,
        host: bytes,
        has_body: bool,
        upgrade: bool,
    ) -> None:
        proxy = self._proxy
        cache = proxy.cache
        entry: CacheEntry | None = None
        # A plain GET (no body, no conditional, range or credentials) may be answered from the cache.
        keep = method == b"GET" and not has_body and self._plain and not self._auth and cache is not None
        if keep:
            assert cache is not None
            entry = cache.get(site.name, target)
            if entry is not None:
                if entry.encoding is not None and entry.encoding != self._encoding:
                    entry = None  # an app's answer kept for another Accept-Encoding
                elif not upgrade and not self._queue and proxy.held_fresh(site, entry):
                    # Answered from here in this very turn (nothing before it in the queue): no head
                    # to build, nothing to send.
                    req.held = entry
                    req.target = target
                    req.rid = rid = proxy.request_id()
                    self._report_held(site, target, len(entry.body), rid)
                    return
                elif entry.expires:
                    entry = None  # an app's answer is only ever given unasked
        req.replayable = not has_body and method in IDEMPOTENT
        req.expect_continue = has_body and req.http11 and self._expect == b"100-continue"
        if site.affinity and self._cookie is not None:
            req.pinned = site.pinned(self._cookie)
        headers = self._headers if self._tokens is None else strip_headers(self._headers, self._tokens)
        upgrade_head = b""
        if upgrade and self._upgrade is not None and b"websocket" in self._upgrade.lower():
            req.tunnel = True
            req.upgrade = self._upgrade
            upgrade_head = b"Connection: Upgrade\r\nUpgrade: " + self._upgrade + b"\r\n"
        lane_ok = lane_eligible(method, has_body, req.tunnel)
        cached_line = b""
        if lane_ok and keep:
            # The lane carries it, saying which version of the answer is held here (none: "-"); a
            # file too big for a lane otherwise comes on it once, to be kept.
            req.cached = entry
            if entry is not None:
                req.cached_version = entry.version
            req.fill = True
            req.encoding = self._encoding
            cached_line = b"X-Sitecloud-Cached: " + (entry.version if entry is not None else b"-") + b"\r\n"
        req.lane_ok = lane_ok and target not in site.off_lane
        req.target = target
        req.rid = rid = proxy.request_id()
        xff = self._ip if self._xff is None else self._xff + b", " + self._ip
        req.head = b"".join(
            (
                method,
                b" ",
                target,
                b" HTTP/1.1\r\nHost: ",
                host,
                b"\r\n",
                headers,
                site.header,
                b"X-Forwarded-For: ",
                xff,
                b"\r\n",
                self._proto_header,
                b"X-Forwarded-Host: ",
                host,
                b"\r\n",
                rid,
                cached_line,
                upgrade_head,
                b"Transfer-Encoding: chunked\r\n\r\n" if req.chunked else b"\r\n",
            )
        )

    def _report_held(self, site: Site, target: bytes, size: int, rid: bytes) -> None:
        """An answer given from the cache unasked goes to the site's access log on its worker."""
        feed = site.upstreams[0].feed
        if feed is not None:
            client = self._ip if self._xff is None else self._xff + b", " + self._ip
            feed.report(site.name, target, size, rid, client, self._agent, self._referer)

    def on_body(self, data: bytes) -> None:
        req = self._req
        if req is None or not data:
            return
        site = req.site
        if site is not None:
            site.usage[1] += len(data)
            req.body_seen += len(data)
            if site.max_body and req.body_seen > site.max_body:
                self._error = 413  # a chunked body that grew past the limit on the way
                raise _Reject
        if req.local is not None:
            return  # a body nobody will read (the answer is a platform page)
        chunk = b"%x\r\n%b\r\n" % (len(data), data) if req.chunked else data
        conn = req.conn
        if conn is not None:
            self._send_up(conn, chunk)
        else:
            if req.body_parts is None:
                req.body_parts = [chunk]
            else:
                req.body_parts.append(chunk)
            req.buffered += len(chunk)
            if req.buffered > _BUFFER_LIMIT:
                self._pause(_PAUSE_BUFFER)

    def on_message_complete(self) -> None:
        req = self._req
        self._req = None
        if self._state != _DEAD:
            self._state = _WAIT if self._queue else _IDLE
            self.read_deadline = 0.0
            if not self._queue:
                self.read_deadline = self._proxy.loop.time() + self._proxy.idle_timeout
        if req is None or req.body_done:
            return
        req.body_done = True
        if req.local is not None:
            return
        if req.chunked:
            if req.conn is not None:
                self._send_up(req.conn, _LAST_CHUNK)
            elif req.body_parts is None:
                req.body_parts = [_LAST_CHUNK]
            else:
                req.body_parts.append(_LAST_CHUNK)
        if req.conn is not None:
            req.conn.body_sent = True

    # -- answering requests, in order -------------------------------------------------------------

    def _advance(self) -> None:
        """Start answering the request at the head of the queue, if it is not started yet."""
        queue = self._queue
        while queue and not self._closing:
            req = queue[0]
            if req.started:
                return
            req.started = True
            self._meter = req.site.usage if req.site is not None else None
            if len(queue) == 1:
                self._resume(_PAUSE_PIPELINE)  # the request being read is now the one answered
            if req.local is None:
                if req.expect_continue and not req.body_done:
                    self._write(_CONTINUE)
                if self._dispatch(req):
                    return
            assert req.local is not None
            self._write_local(req, req.local)
            queue.popleft()
            self._meter = None
            if req.close_after:
                self.close()
                return
        self._resume(_PAUSE_PIPELINE)
        if not queue and self._req is None and self._state < _DEAD:
            self._state = _IDLE
            self.read_deadline = self._proxy.loop.time() + self._proxy.idle_timeout
            if self._proxy.draining:
                self.close()

    def _dispatch(self, req: _Request) -> bool:
        """Send ``req`` to a worker; False when none is left to try (``req.local`` then says why)."""
        site = req.site
        assert site is not None
        now = self._proxy.loop.time()
        up = req.pinned
        if up is None or up.down_until > now or (req.tried and up in req.tried):
            up = site.pick(req.tried, now)
            if up is None:
                req.local = PAGES[502 if site.upstreams else 503]
                return False
            if site.affinity:
                req.set_cookie = b"".join(
                    (
                        b"Set-Cookie: ",
                        AFFINITY_COOKIE,
                        b"=",
                        up.token,
                        b"; Path=/; HttpOnly; SameSite=Lax",
                        b"; Secure\r\n" if self._https else b"\r\n",
                    )
                )
        req.upstream = up
        up.outstanding += 1
        if req.lane_ok and not req.fresh and site.lane_off_until <= now:
            lane = self._proxy.lane(up, now)
            if lane is not None:
                req.lane = lane
                lane.submit(self, req, req.head)
                return True
        if not req.fresh:
            conn = up.take_idle()
            if conn is not None:
                self._attach(req, conn, reused=True)
                return True
        self._proxy.spawn(self._connect(req, up))
        return True

    async def _connect(self, req: _Request, up: Upstream) -> None:
        try:
            conn = await self._proxy.open(up)
        except (OSError, TimeoutError):
            if req.upstream is not up or self._closing:
                return
            self._release(req)
            req.tried = [up] if req.tried is None else [*req.tried, up]
            # Nothing reached any worker yet (the body so far is buffered), so any method may move on.
            if not self._dispatch(req):
                self._answer_failure(req)
            return
        if self._closing or req.upstream is not up or req.conn is not None:
            up.put_idle(
                conn,
                self._proxy.upstream_max_idle,
                self._proxy.loop.time() + self._proxy.upstream_idle_timeout,
            )
            return
        self._attach(req, conn, reused=False)

    def _attach(self, req: _Request, conn: UpstreamConnection, *, reused: bool) -> None:
        req.conn = conn
        conn.bind(self, req, reused=reused)
        parts = req.body_parts
        if parts:
            req.body_parts = None
            req.buffered = 0
            self._send_up(conn, b"".join((req.head, *parts)))
            self._resume(_PAUSE_BUFFER)
        else:
            self._send_up(conn, req.head)
        if req.body_done:
            conn.body_sent = True
        if self._write_paused:
            conn.pause_reading()

    def _release(self, req: _Request) -> None:
        up = req.upstream
        if up is not None:
            up.outstanding -= 1
            req.upstream = None

    def _finish(self, req: _Request) -> None:
        queue = self._queue
        if queue and queue[0] is req:
            queue.popleft()
        self._meter = None
        self._release(req)
        req.conn = None
        req.lane = None
        if self._closing:
            return
        if req.close_after:
            self.close()
            return
        self._advance()

    def _keep_alive(self, req: _Request) -> bool:
        return (
            req.keep_alive
            and req.body_done
            and not req.close_after
            and not req.tunnel
            and not self._eof
            and not self._proxy.draining
        )

    def _write_local(self, req: _Request, page: Page) -> None:
        proxy = self._proxy
        proxy.counts.done(page.status, proxy.loop.time() - req.t0)
        keep = self._keep_alive(req)
        req.close_after = not keep
        self._write(page.keep if keep else page.close)

    def _answer_failure(self, req: _Request) -> None:
        self._write_local(req, req.local or PAGES[502])
        self._finish(req)

    # -- the worker's answer (called by UpstreamConnection) ---------------------------------------

    def response_head(self, req: Exchange, status: int, reason: bytes, headers: bytearray, body: int) -> None:
        assert isinstance(req, _Request)
        req.response_started = True
        proxy = self._proxy
        proxy.counts.done(status, proxy.loop.time() - req.t0)
        if status == 200 and body == BODY_LENGTH and req.fill and not req.head_request:
            self._keep_app_answer(req, reason, headers)
        headers += req.rid
        if req.set_cookie:
            headers += req.set_cookie
        site = req.site
        if site is not None and site.hsts and self._https:
            headers += site.hsts
        if status == 101:
            headers += b"Connection: Upgrade\r\nUpgrade: " + req.upgrade + b"\r\n"
        else:
            if body in (BODY_CHUNKED, BODY_CLOSE):
                if req.http11:
                    headers += b"Transfer-Encoding: chunked\r\n"
                    req.chunked_response = True
                else:
                    req.close_after = True  # HTTP/1.0: the body ends when the connection does
            if not self._keep_alive(req):
                req.close_after = True
                headers += b"Connection: close\r\n"
            elif not req.http11:
                headers += b"Connection: keep-alive\r\n"
        self._write(b"".join((b"HTTP/1.1 %d %b\r\n" % (status, reason), headers, b"\r\n")))

    def _keep_app_answer(self, req: _Request, reason: bytes, headers: bytearray) -> None:
        """Start keeping an app's answer that says it may be kept (roles/frontend/_cache.py
        app_lifetime), if the site's version feeds are live: only they can drop it on a publish."""
        site, cache = req.site, self._proxy.cache
        if site is None or cache is None:
            return
        lifetime = app_lifetime(bytes(headers))
        if lifetime <= 0:
            return
        self._proxy.ensure_feed(req.upstream)
        version = self._proxy.feed_version(site)
        if version is None:
            return
        req.kept = [b"HTTP/1.1 200 %b\r\n%b" % (reason, without_date(bytes(headers)))]
        req.kept_for = lifetime
        req.fill_version = version

    def response_body(self, req: Exchange, data: bytes) -> None:
        assert isinstance(req, _Request)
        kept = req.kept
        if kept is not None:
            kept.append(data)
            cache = self._proxy.cache
            if cache is not None and sum(map(len, kept)) > cache.max_entry:
                req.kept = None
        if req.chunked_response:
            self._write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._write(data)

    def response_end(self, req: Exchange) -> None:
        assert isinstance(req, _Request)
        if req.chunked_response:
            self._write(_LAST_CHUNK)
        if req.kept is not None:
            self._store_app_answer(req, req.kept)
            req.kept = None
        self._finish(req)

    def _store_app_answer(self, req: _Request, kept: list[bytes]) -> None:
        proxy, site = self._proxy, req.site
        if site is None or proxy.cache is None or proxy.feed_version(site) != req.fill_version:
            return  # a new version was announced while the app answered
        head = kept[0]
        varies = b"\r\nvary:" in head.lower()
        entry = CacheEntry(
            req.fill_version,
            head,
            b"".join(kept[1:]),
            expires=proxy.loop.time() + req.kept_for,
            encoding=req.encoding if varies else None,
        )
        proxy.cache.put(site.name, req.target, entry)

    def upstream_failed(self, req: Exchange, status: int, *, stale: bool) -> None:
        assert isinstance(req, _Request)
        req.conn = None
        req.lane = None
        if self._closing:
            self._release(req)
            return
        if req.response_started:
            self._release(req)
            self.abort()  # part of the response is out: the client must see it break
            return
        self._release(req)
        if stale and req.replayable and not req.fresh:
            # A pooled connection the worker had already closed, or a worker withdrawn from the routes
            # (_upstream.UpstreamConnection.withdraw): send it once more, by the routes as they are now.
            req.fresh = True
            site = self._proxy.current(req.site) if req.site is not None else None
            if site is not None:
                req.site = site
                if req.pinned is not None and req.pinned.retired:
                    req.pinned = None
                if self._dispatch(req):
                    return
        if status == 504:
            req.local = PAGES[504]
        self._answer_failure(req)

    def lane_answer(
        self, req: Exchange, status_line: bytes, headers: bytes, body: bytes, version: bytes
    ) -> None:
        """A whole answer from a lane (``headers`` end-to-end ones, each line ending in CRLF).
        ``version``: the content version of a 200 that may be kept, or (a 204) of the answer held
        here that the worker says is still the one."""
        assert isinstance(req, _Request)
        req.lane = None
        proxy = self._proxy
        entry = req.cached
        fresh = entry is not None and version and status_line[9:12] == b"204"
        if fresh:
            assert entry is not None  # the lane checked the version is the one held
            proxy.cache.hits += 1  # type: ignore[union-attr]
            status_line, headers, body = entry.head, http_date_line(), entry.body
        elif version and req.fill and req.site is not None and proxy.cache is not None and cacheable(headers):
            proxy.ensure_feed(req.upstream)
            known = proxy.feed_version(req.site)
            # Not kept when the feeds name another version: this answer left before the notice did.
            if known is None or known == version:
                kept = CacheEntry(version, status_line + without_date(headers), body)
                if not proxy.cache.put(req.site.name, req.target, kept):
                    # Too big to keep here: it would only come on the lane again and again.
                    if len(req.site.off_lane) >= _OFF_LANE_MAX:
                        req.site.off_lane.clear()
                    req.site.off_lane.add(req.target)
        self._write_answer(req, status_line, headers, body)
        self._finish(req)

    def _answer_held(self, req: _Request, entry: CacheEntry) -> None:
        """An answer the cache gives without asking a worker (see Proxy.held_fresh), in the turn its
        request's head came in. Nothing was queued before it, and it has no body: it is answered
        here and now, never queued."""
        cache = self._proxy.cache
        assert cache is not None and req.site is not None
        cache.hits += 1
        cache.held_hits += 1
        req.held = None
        req.body_done = True
        self._state = _WAIT  # (the end of the message makes it idle)
        self.read_deadline = 0.0
        self._meter = req.site.usage
        self._write_answer(req, entry.head, http_date_line(), entry.body)
        self._meter = None
        if req.close_after:
            self.close()

    def _write_answer(self, req: _Request, status_line: bytes, headers: bytes, body: bytes) -> None:
        """A whole answer to ``req`` (``headers`` end-to-end ones, each line ending in CRLF): the
        front end's own headers added, written in one piece when small."""
        proxy = self._proxy
        proxy.counts.done(int(status_line[9:12]), proxy.loop.time() - req.t0)
        extra = req.rid + req.set_cookie
        site = req.site
        if site is not None and site.hsts and self._https:
            extra += site.hsts
        if not self._keep_alive(req):
            req.close_after = True
            extra += b"Connection: close\r\n"
        elif not req.http11:
            extra += b"Connection: keep-alive\r\n"
        if len(body) <= _JOIN_MAX:
            self._write(b"".join((status_line, headers, extra, b"\r\n", body)))
        else:
            self._write(b"".join((status_line, headers, extra, b"\r\n")))
            self._write(body)

    def lane_refused(self, req: Exchange, *, site_wide: bool) -> None:
        """The worker will not answer this GET on its lane (its app answers it, or a large file
        streams): send it again on a connection of its own."""
        assert isinstance(req, _Request)
        req.lane = None
        req.lane_ok = False
        self._release(req)
        if self._closing:
            return
        site = req.site
        if req.cached is not None and site is not None and self._proxy.cache is not None:
            self._proxy.cache.drop(site.name, req.target)
        # A plain GET refused is a file too big to keep: its target skips the lane from now on. (A
        # range or conditional request may be refused where a plain one would not.)
        remember = req.fill
        req.cached, req.cached_version, req.fill = None, b"", False
        if site is not None:
            if site_wide:
                site.lane_off_until = self._proxy.loop.time() + _LANE_OFF_FOR
            elif remember:
                if len(site.off_lane) >= _OFF_LANE_MAX:
                    site.off_lane.clear()
                site.off_lane.add(req.target)
        if not self._dispatch(req):
            self._answer_failure(req)

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self._pause(_PAUSE_UPSTREAM)
        else:
            self._resume(_PAUSE_UPSTREAM)

    # -- WebSocket tunnel -------------------------------------------------------------------------

    def tunnel_open(self, req: Exchange, conn: UpstreamConnection, early: bytes) -> None:
        """The worker said 101: from now on bytes pass through both ways until either side closes."""
        if self._closing or self._state != _TUNNEL:
            conn.abort()
            return
        self._tunnel = conn
        self.write_deadline = 0.0
        if early:
            self._write(early)
        held, self._early = self._early, None
        if held:
            self._tunnel_in(b"".join(held))
        self._resume(_PAUSE_BUFFER)

    def _tunnel_in(self, data: bytes) -> None:
        conn = self._tunnel
        if conn is None:
            if self._early is not None:
                self._early.append(data)
            return
        meter = self._meter
        if meter is not None:
            meter[1] += len(data)
        self._send_up(conn, data)

    def tunnel_data(self, data: bytes) -> None:
        self._write(data)

    def tunnel_closed(self) -> None:
        self._tunnel = None
        self.close()

    # -- flow control, timeouts, closing ----------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._closing or self.transport is None:
            return
        meter = self._meter
        if meter is not None:
            meter[2] += len(data)
        if self._corked:
            self._out.append(data)
        else:
            self.transport.write(data)

    def _send_up(self, conn: UpstreamConnection, data: bytes) -> None:
        if not self._corked:
            conn.send(data)
            return
        if self._up is not conn:
            self._flush_up()
            self._up = conn
        self._up_out.append(data)

    def _flush_up(self) -> None:
        conn, out = self._up, self._up_out
        if conn is not None and out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            conn.send(data)  # nothing if the connection was given up meanwhile
        self._up = None

    def cork(self) -> None:
        self._corked += 1

    def uncork(self) -> None:
        self._corked -= 1
        if not self._corked:
            if self._up_out:
                self._flush_up()
            if self._out:
                self._flush()

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._closing or self.transport is None:
            return
        if len(out) == 1:
            self.transport.write(out[0])
        elif sum(map(len, out)) <= _JOIN_MAX:
            self.transport.write(b"".join(out))
        else:
            # A large body's pieces go as they are: the TLS layer reads them in place, one send for all.
            self.transport.writelines(out)

    def _pause(self, why: int) -> None:
        if not self._paused and not self._closing and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= why

    def _resume(self, why: int) -> None:
        if self._paused & why:
            self._paused &= ~why
            if not self._paused and not self._closing and self.transport is not None:
                self.transport.resume_reading()
                if self._state == _BODY:
                    self.read_deadline = self._proxy.loop.time() + self._proxy.body_timeout

    def _reject(self, status: int) -> None:
        """A request that cannot be parsed or forwarded: answer ``status`` in turn, then close."""
        self._state = _DEAD
        self.read_deadline = 0.0
        self._pause(_PAUSE_DEAD)
        req, self._req = self._req, None
        queue = self._queue
        if req is not None and req in queue:
            if queue[0] is req and req.started:
                if req.response_started:
                    self.abort()
                    return
                if req.conn is not None:
                    req.conn.abandon()
                    req.conn = None
                if req.lane is not None:
                    req.lane.abandon(req)
                    req.lane = None
                self._release(req)
                queue.popleft()
                self._meter = None
            else:
                queue.remove(req)
        err = _Request()
        err.t0 = req.t0 if req is not None else self._proxy.loop.time()
        err.local = PAGES[status]
        err.close_after = True
        err.site = req.site if req is not None else None
        queue.append(err)
        self._advance()

    def check(self, now: float) -> None:
        """Called by the proxy's sweep."""
        if self.write_deadline and now >= self.write_deadline:
            self._proxy.log.debug("client %s stopped reading; closing", self._ip)
            self.abort()
            return
        if not self.read_deadline or now < self.read_deadline or self._paused:
            return
        self.read_deadline = 0.0
        state = self._state
        if state == _IDLE:
            self.close()
        elif state in (_HEAD, _BODY):
            req = self._req
            active = self._queue[0] if self._queue else None
            if active is None or (active is req and not active.response_started):
                self._reject(408)
            else:
                self.abort()

    def close_if_idle(self) -> None:
        if not self._queue and self._req is None:
            self.close()

    def close(self) -> None:
        if not self._closing and self.transport is not None:
            if self._out:
                self._flush()
            self._closing = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self._closing = True
            self._out.clear()
            self.transport.abort()
