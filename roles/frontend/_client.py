"""The visitor side of the proxy: one protocol per client connection (HTTP or HTTPS).

Requests are parsed with httptools. Each one becomes a :class:`Request` in a queue; the first in the
queue is the one being answered, so pipelined requests are answered in order (and reading pauses while
one waits). A request is routed by its Host, sent to a worker over a pooled connection, and the
response streams back with flow control both ways. Around it: head checks as pure functions
(roles/frontend/_head.py), the per-request state (_request.py), worker choice and retry
(_dispatch.py), and the WebSocket tunnel (_tunnel.py).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

import httptools

from roles.frontend._admission import TOO_MANY
from roles.frontend._cache import (
    CacheEntry,
    accepts_gzip,
    app_lifetime,
    cacheable,
    compressible,
    http_date_line,
    without_date,
)
from roles.frontend._dispatch import dispatch, keep_off_lane, release, resend_stale, skip_lane
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
    valid_host,
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
from roles.frontend._request import Request
from roles.frontend._routes import Site
from roles.frontend._tunnel import Tunnel, is_websocket, upgrade_lines
from roles.frontend._upstream import Exchange, UpstreamConnection
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
_CHALLENGE_PREFIX = CHALLENGE_PATH.encode()


_VARY_ENCODING = b"Vary: Accept-Encoding\r\n"
# A closed connection's parser: one with no callbacks, holding nothing of it.
_DETACHED = httptools.HttpRequestParser(object())


class _Reject(Exception):
    """Raised from a parser callback to stop parsing; the status is on the connection."""


class ClientConnection(asyncio.Protocol):
    def __init__(self, proxy: Proxy, scheme: bytes) -> None:
        self._proxy = proxy
        self._https = scheme == b"https"
        self._proto_header = b"X-Forwarded-Proto: " + scheme + b"\r\n"
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._ip = b""
        self._queue: deque[Request] = deque()
        self._req: Request | None = None  # the request being parsed
        self._state = _IDLE
        self._paused = 0
        self._write_paused = False
        self._closing = False
        self._eof = False
        self._tls = False
        # What the per-address limit counted this connection under (a TLS bridge counts its own).
        self._admitted: str | None = None
        self.read_deadline = 0.0
        self.write_deadline = 0.0
        # Writes made while corked leave in one transport.write (one TLS record, one send).
        self._corked = 0
        self._out: list[bytes] = []
        # Likewise for what goes to the worker: held to the end of the read, so a request that turns
        # out malformed further on in the same read never leaves at all.
        self._up: UpstreamConnection | None = None
        self._up_out: list[bytes] = []
        # A chunked request body's pieces of this read, sent on as one chunk (_frame_body): a visitor's
        # one-byte chunks would each cost the worker a parse, and its app a write.
        self._body_parts: list[bytes] = []
        # The usage counters of the site whose response is being written ([requests, in, out]).
        self._meter: list[int] | None = None
        # A WebSocket tunnel (roles/frontend/_tunnel.py), from its upgrade request on.
        self._tunnel: Tunnel | None = None
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
        proxy = self._proxy
        if not self._https:
            self._admitted = proxy.admission.admit(transport)
            if self._admitted is None:
                self._closing = True
                self._state = _DEAD
                transport.write(TOO_MANY)
                transport.close()
                return
        self._tls = transport.get_extra_info("sslcontext") is not None
        peer = transport.get_extra_info("peername")
        self._ip = str(peer[0]).encode() if peer else b"unknown"
        proxy.clients.add(self)
        # A new connection gets the header timeout for its first request, not the idle one.
        self.read_deadline = proxy.loop.time() + proxy.header_timeout
        if proxy.draining:
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted is not None:
            self._proxy.admission.release(self._admitted)
            self._admitted = None
        self._closing = True
        # Unlinked, so refcounting frees the connection now: left to the cyclic collector, the
        # connections of a wave of closes (a slowloris wave cut) were a 50 ms pass every request waited.
        self._parser = _DETACHED
        self.transport = None
        self._out.clear()
        self._up_out.clear()
        self._up = None
        self._proxy.client_gone(self)
        tunnel, self._tunnel = self._tunnel, None
        opened = None
        if tunnel is not None:
            opened = tunnel.conn
            tunnel.close()
        for req in self._queue:
            if req.conn is not None:
                if req.conn is not opened:
                    req.conn.abandon()
                req.conn = None
            if req.lane is not None:
                req.lane.abandon(req)
                req.lane = None
            release(req)
        self._queue.clear()
        self._req = None

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._queue and not self._tls and (self._tunnel is None or self._tunnel.conn is None):
            return True  # answer what was asked (a plain TCP half-close); close after it
        return None

    @property
    def stalled_since(self) -> float:
        """When the visitor stopped taking what is written to it (0: it takes it)."""
        return self.write_deadline - self._proxy.body_timeout if self._write_paused else 0.0

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
            if state == _TUNNEL and not self._closing and self._tunnel is not None:
                self._tunnel.from_client(data)
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
                        self._tunnel = Tunnel(data, self._write, self._send_up)
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
            if self._body_parts:
                self._frame_body()
        finally:
            self.uncork()

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._req = req = Request()
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
        if host is not None and not valid_host(host):
            self._error = 400
            raise _Reject
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
        req: Request,
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
        # Not the target alone: an app that builds links from Host had the answer it gave a visitor's
        # "Host: blog.example:1" kept and given to every visitor of the site.
        req.cache_key = key = (b"https://" if self._https else b"http://") + host + target
        if keep:
            assert cache is not None
            entry = cache.get(site.name, key)
            if entry is not None:
                if entry.encoding is not None and entry.encoding != self._encoding:
                    entry = None  # an app's answer kept for another Accept-Encoding
                elif not upgrade and not self._queue and proxy.held_fresh(site, entry):
                    # Answered from here in this very turn (nothing before it in the queue): no head
                    # to build, nothing to send.
                    req.held = entry
                    encoding = self._encoding
                    req.held_form = form = (
                        self._form(entry, site.name, key, encoding)
                        if encoding and entry.compressible
                        else (entry.head, entry.body)
                    )
                    req.target = target
                    req.rid = rid = proxy.request_id()
                    # It goes to the site's access log on its worker.
                    feed = site.upstreams[0].feed
                    if feed is not None:
                        client = self._ip if self._xff is None else self._xff + b", " + self._ip
                        feed.report(site.name, target, len(form[1]), rid, client, self._agent, self._referer)
                    return
                elif entry.expires:
                    entry = None  # an app's answer is only ever given unasked
        req.replayable = not has_body and method in IDEMPOTENT
        req.expect_continue = has_body and req.http11 and self._expect == b"100-continue"
        if site.affinity and self._cookie is not None:
            req.pinned = site.pinned(self._cookie)
        headers = self._headers if self._tokens is None else strip_headers(self._headers, self._tokens)
        upgrade_head = b""
        if upgrade and is_websocket(self._upgrade):
            req.tunnel = True
            req.upgrade = self._upgrade
            upgrade_head = upgrade_lines(self._upgrade)
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

    def _form(self, entry: CacheEntry, site: str, target: bytes, encoding: bytes) -> tuple[bytes, bytes]:
        """The form of a kept file's answer to send (its head with the status line, and its body):
        the gzip one to a visitor who takes gzip, once it is made (asked for here the first time)."""
        if entry.compressible and encoding and accepts_gzip(encoding):
            gz = entry.gzip
            if gz is not None:
                return gz
            self._proxy.compress(site, target, entry)
        return entry.head, entry.body

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
        if req.chunked:
            self._body_parts.append(data)  # framed at the end of the read, or of the body
            return
        self._body_up(req, data)

    def _frame_body(self) -> None:
        """The chunked body's pieces held from this read, on their way as one chunk."""
        parts, req = self._body_parts, self._req
        if not parts:
            return
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        if req is not None and req.local is None:
            self._body_up(req, b"%x\r\n%b\r\n" % (len(data), data))

    def _body_up(self, req: Request, chunk: bytes) -> None:
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
        self._frame_body()
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
                if dispatch(self, self._proxy, req, self._https):
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

    def attach(self, req: Request, conn: UpstreamConnection, *, reused: bool) -> None:
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

    def _finish(self, req: Request) -> None:
        queue = self._queue
        if queue and queue[0] is req:
            queue.popleft()
        self._meter = None
        release(req)
        req.conn = None
        req.lane = None
        if self._closing:
            return
        if req.close_after:
            self.close()
            return
        self._advance()

    def _keep_alive(self, req: Request) -> bool:
        return (
            req.keep_alive
            and req.body_done
            and not req.close_after
            and not req.tunnel
            and not self._eof
            and not self._proxy.draining
        )

    def _write_local(self, req: Request, page: Page) -> None:
        proxy = self._proxy
        proxy.counts.done(page.status, proxy.loop.time() - req.t0)
        keep = self._keep_alive(req)
        req.close_after = not keep
        self._write(page.keep if keep else page.close)

    def answer_failure(self, req: Request) -> None:
        self._write_local(req, req.local or PAGES[502])
        self._finish(req)

    # -- the worker's answer (called by UpstreamConnection) ---------------------------------------

    def response_head(self, req: Exchange, status: int, reason: bytes, headers: bytearray, body: int) -> None:
        assert isinstance(req, Request)
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
            headers += upgrade_lines(req.upgrade)
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

    def _keep_app_answer(self, req: Request, reason: bytes, headers: bytearray) -> None:
        """Start keeping an app's answer that says it may be kept (roles/frontend/_cache.py
        app_lifetime), if the site's version feeds are live (only they can drop it on a publish) and
        name the version the worker says the answer came from (an old app's answer that arrives
        after a new version's notice is not kept as the new one's)."""
        site, cache = req.site, self._proxy.cache
        if site is None or cache is None:
            return
        lifetime = app_lifetime(bytes(headers))
        if lifetime <= 0:
            return
        self._proxy.ensure_feed(req.upstream)
        version = self._proxy.feed_version(site)
        if version is None or req.answer_version != version:
            return
        req.kept = [b"HTTP/1.1 200 %b\r\n%b" % (reason, without_date(bytes(headers)))]
        req.kept_for = lifetime
        req.fill_version = version

    def response_body(self, req: Exchange, data: bytes) -> None:
        assert isinstance(req, Request)
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
        assert isinstance(req, Request)
        if req.chunked_response:
            self._write(_LAST_CHUNK)
        if req.kept is not None:
            self._store_app_answer(req, req.kept)
            req.kept = None
        self._finish(req)

    def _store_app_answer(self, req: Request, kept: list[bytes]) -> None:
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
        proxy.cache.put(site.name, req.cache_key, entry)

    def upstream_failed(self, req: Exchange, status: int, *, stale: bool) -> None:
        assert isinstance(req, Request)
        req.conn = None
        req.lane = None
        if self._closing:
            release(req)
            return
        if req.response_started:
            release(req)
            self.abort()  # part of the response is out: the client must see it break
            return
        release(req)
        if stale and resend_stale(self, self._proxy, req, self._https):
            return
        if status == 504:
            req.local = PAGES[504]
        self.answer_failure(req)

    def lane_answer(
        self, req: Exchange, status_line: bytes, headers: bytes, body: bytes, version: bytes
    ) -> None:
        """A whole answer from a lane (``headers`` end-to-end ones, each line ending in CRLF).
        ``version``: the content version of a 200 that may be kept, or (a 204) of the answer held
        here that the worker says is still the one."""
        assert isinstance(req, Request)
        req.lane = None
        proxy = self._proxy
        entry = req.cached
        fresh = entry is not None and version and status_line[9:12] == b"204"
        if fresh:
            assert entry is not None  # the lane checked the version is the one held
            proxy.cache.hits += 1  # type: ignore[union-attr]
            name = req.site.name if req.site is not None else ""
            status_line, body = self._form(entry, name, req.cache_key, req.encoding)
            headers = http_date_line()
        elif version and req.fill and req.site is not None and proxy.cache is not None and cacheable(headers):
            proxy.ensure_feed(req.upstream)
            known = proxy.feed_version(req.site)
            # Not kept when the feeds name another version: this answer left before the notice did.
            if known is None or known == version:
                kept = CacheEntry(version, status_line + without_date(headers), body)
                if compressible(kept.head, len(body)):
                    # Its gzip form is made once, for the next visitor who takes it; either form
                    # says the answer varies by Accept-Encoding, for caches on the way.
                    kept.compressible = True
                    kept.head += _VARY_ENCODING
                    headers += _VARY_ENCODING
                if not proxy.cache.put(req.site.name, req.cache_key, kept):
                    # Too big to keep here: it would only come on the lane again and again.
                    skip_lane(req.site, req.target)
                elif kept.compressible:
                    proxy.compress(req.site.name, req.cache_key, kept)
        self._write_answer(req, status_line, headers, body)
        self._finish(req)

    def _answer_held(self, req: Request, entry: CacheEntry) -> None:
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
        head, body = req.held_form
        req.held_form = (b"", b"")
        self._write_answer(req, head, http_date_line(), body)
        self._meter = None
        if req.close_after:
            self.close()

    def _write_answer(self, req: Request, status_line: bytes, headers: bytes, body: bytes) -> None:
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
        assert isinstance(req, Request)
        req.lane = None
        req.lane_ok = False
        release(req)
        if self._closing:
            return
        site = req.site
        if req.cached is not None and site is not None and self._proxy.cache is not None:
            self._proxy.cache.drop(site.name, req.cache_key)
        plain = req.fill
        req.cached, req.cached_version, req.fill = None, b"", False
        if site is not None:
            keep_off_lane(site, req.target, site_wide=site_wide, plain=plain, now=self._proxy.loop.time())
        if not dispatch(self, self._proxy, req, self._https):
            self.answer_failure(req)

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self._pause(_PAUSE_UPSTREAM)
        else:
            self._resume(_PAUSE_UPSTREAM)

    # -- WebSocket tunnel -------------------------------------------------------------------------

    def tunnel_open(self, req: Exchange, conn: UpstreamConnection, early: bytes) -> None:
        """The worker said 101: from now on bytes pass through both ways until either side closes."""
        tunnel = self._tunnel
        if self._closing or self._state != _TUNNEL or tunnel is None:
            conn.abort()
            return
        self.write_deadline = 0.0
        tunnel.open(conn, early, self._meter)
        self._resume(_PAUSE_BUFFER)

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
        out = self._out
        transport = self.transport
        if self._closing or transport is None:
            out.clear()
        elif len(out) == 1:
            # (the list is kept for the next turn: one answer a turn is the usual case)
            data = out[0]
            out.clear()
            transport.write(data)
        elif sum(map(len, out)) <= _JOIN_MAX:
            data = b"".join(out)
            out.clear()
            transport.write(data)
        else:
            # A large body's pieces go as they are: the TLS layer reads them in place, one send for all.
            self._out = []
            transport.writelines(out)

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
                release(req)
                queue.popleft()
                self._meter = None
            else:
                queue.remove(req)
        err = Request()
        err.t0 = req.t0 if req is not None else self._proxy.loop.time()
        err.local = PAGES[status]
        err.close_after = True
        err.site = req.site if req is not None else None
        queue.append(err)
        self._advance()

    def check(self, now: float) -> bool:
        """Called by the proxy's sweep; whether it closed the connection (or began to)."""
        if self.write_deadline and now >= self.write_deadline:
            self._proxy.log.debug("client %s stopped reading; closing", self._ip)
            self.abort()
            return True
        if not self.read_deadline or now < self.read_deadline or self._paused:
            return False
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
        else:
            return False
        return True

    @property
    def closing(self) -> bool:
        return self._closing

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
