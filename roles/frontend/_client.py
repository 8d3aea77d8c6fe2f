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

from roles.frontend._http import (
    BODY_CHUNKED,
    BODY_CLOSE,
    H_CONNECTION,
    H_CONTENT_LENGTH,
    H_EXPECT,
    H_HOST,
    H_TRANSFER_ENCODING,
    H_XFF,
    PAGES,
    REQUEST_HEADERS,
    Page,
    extra_connection_tokens,
    strip_headers,
)
from roles.frontend._proxy import Proxy
from roles.frontend._routes import Site
from roles.frontend._upstream import Exchange, Upstream, UpstreamConnection

__all__ = ["ClientConnection"]

# Where the connection is in reading its current request.
_IDLE = 0  # between requests (or before the first)
_HEAD = 1  # reading a request line and headers
_BODY = 2  # reading a request body
_WAIT = 3  # request read; its response (or an earlier one) in flight
_DEAD = 4  # a framing error: nothing more is read

# Why reading from the client is paused (a bit each; reading resumes when none is left).
_PAUSE_PIPELINE = 1  # a request is parsed while an earlier one is still being answered
_PAUSE_UPSTREAM = 2  # the worker's connection has a full write buffer
_PAUSE_BUFFER = 4  # body bytes buffered while the worker connection is being made
_PAUSE_DEAD = 8

_BUFFER_LIMIT = 256 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS"})


class _Reject(Exception):
    """Raised from a parser callback to stop parsing; the status is on the connection."""


class _Request:
    """One request on a client connection, from its headers to the end of its response."""

    __slots__ = (
        "body_done",
        "body_parts",
        "buffered",
        "chunked",
        "chunked_response",
        "close_after",
        "conn",
        "expect_continue",
        "fresh",
        "head",
        "head_request",
        "http11",
        "keep_alive",
        "local",
        "replayable",
        "response_started",
        "site",
        "started",
        "tried",
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
        self.upstream: Upstream | None = None
        self.tried: list[Upstream] | None = None
        self.fresh = False


def _normalize_host(value: bytes) -> bytes:
    host = value.lower()
    colon = host.rfind(b":")
    if colon != -1 and host.find(b"]", colon) == -1:
        host = host[:colon]
    return host[:-1] if host.endswith(b".") else host


class ClientConnection(asyncio.Protocol):
    def __init__(self, proxy: Proxy, scheme: bytes) -> None:
        self._proxy = proxy
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
        self._proxy.client_gone(self)
        for req in self._queue:
            if req.conn is not None:
                req.conn.abandon()
                req.conn = None
            self._release(req)
        self._queue.clear()
        self._req = None

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._queue and not self._tls:
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
        if self._state == _DEAD or self._closing:
            return
        state = self._state
        if state == _BODY:
            self.read_deadline = self._proxy.loop.time() + self._proxy.body_timeout
        self._began = False
        parser = self._parser
        while True:
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                # An Upgrade request is proxied as a plain one (its Upgrade header dropped);
                # llhttp stops after it, so feed it the rest.
                data = data[int(exc.args[0]) :]
                if data and self._state != _DEAD:
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

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._req = _Request()
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
        self.read_deadline = self._proxy.loop.time() + self._proxy.header_timeout
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
        kind = REQUEST_HEADERS.get(name.lower())
        if kind is None or kind == H_CONTENT_LENGTH:
            if kind is not None:
                self._lengths += 1
                self._length = value
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
            if te.strip().lower() != b"chunked":
                self._error = 501  # only chunked is re-framed; anything else cannot be forwarded
                raise _Reject
            req.chunked = True
        # llhttp has refused Content-Length with Transfer-Encoding, and duplicate or invalid lengths.
        has_body = req.chunked or (self._lengths == 1 and self._length.strip(b" \t0") != b"")
        if has_body and parser.should_upgrade():
            self._error = 400  # llhttp would treat the body as the upgraded protocol
            raise _Reject
        target = self._target
        host = self._host
        if target[:1] != b"/" and target != b"*":
            try:
                url = httptools.parse_url(target)
            except httptools.HttpParserInvalidURLError:
                self._error = 400
                raise _Reject from None
            if url.host:
                # RFC 9112 3.2.2: absolute-form wins over Host.
                host = url.host + (b":" + str(url.port).encode() if url.port else b"")
                target = (url.path or b"/") + (b"?" + url.query if url.query else b"")
        site = self._proxy.routes.get(_normalize_host(host)) if host is not None else None
        if site is None:
            req.local = PAGES[404]
        else:
            req.site = site
            req.replayable = not has_body and method in _IDEMPOTENT
            req.expect_continue = has_body and http11 and self._expect == b"100-continue"
            headers = self._headers if self._tokens is None else strip_headers(self._headers, self._tokens)
            assert host is not None
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
                    b"Transfer-Encoding: chunked\r\n\r\n" if req.chunked else b"\r\n",
                )
            )
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

    def on_body(self, data: bytes) -> None:
        req = self._req
        if req is None or req.local is not None or not data:
            return  # a body nobody will read (the answer is a platform page)
        chunk = b"%x\r\n%b\r\n" % (len(data), data) if req.chunked else data
        conn = req.conn
        if conn is not None:
            conn.send(chunk)
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
                req.conn.send(_LAST_CHUNK)
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
            if req.close_after:
                self.close()
                return
        self._resume(_PAUSE_PIPELINE)
        if not queue and self._req is None and self._state != _DEAD:
            self._state = _IDLE
            self.read_deadline = self._proxy.loop.time() + self._proxy.idle_timeout
            if self._proxy.draining:
                self.close()

    def _dispatch(self, req: _Request) -> bool:
        """Send ``req`` to a worker; False when none is left to try (``req.local`` then says why)."""
        site = req.site
        assert site is not None
        up = site.pick(req.tried, self._proxy.loop.time())
        if up is None:
            req.local = PAGES[502 if site.upstreams else 503]
            return False
        req.upstream = up
        up.outstanding += 1
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
            conn.send(b"".join((req.head, *parts)))
            self._resume(_PAUSE_BUFFER)
        else:
            conn.send(req.head)
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
        self._release(req)
        req.conn = None
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
            and not self._eof
            and not self._proxy.draining
        )

    def _write_local(self, req: _Request, page: Page) -> None:
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

    def response_body(self, req: Exchange, data: bytes) -> None:
        assert isinstance(req, _Request)
        if req.chunked_response:
            self._write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._write(data)

    def response_end(self, req: Exchange) -> None:
        assert isinstance(req, _Request)
        if req.chunked_response:
            self._write(_LAST_CHUNK)
        self._finish(req)

    def upstream_failed(self, req: Exchange, status: int, *, stale: bool) -> None:
        assert isinstance(req, _Request)
        req.conn = None
        if self._closing:
            self._release(req)
            return
        if req.response_started:
            self._release(req)
            self.abort()  # part of the response is out: the client must see it break
            return
        self._release(req)
        if stale and req.replayable and not req.fresh:
            # A pooled connection the worker had already closed: the request never got there.
            req.fresh = True
            if self._dispatch(req):
                return
        if status == 504:
            req.local = PAGES[504]
        self._answer_failure(req)

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self._pause(_PAUSE_UPSTREAM)
        else:
            self._resume(_PAUSE_UPSTREAM)

    # -- flow control, timeouts, closing ----------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if not self._closing and self.transport is not None:
            self.transport.write(data)

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
                self._release(req)
                queue.popleft()
            else:
                queue.remove(req)
        err = _Request()
        err.local = PAGES[status]
        err.close_after = True
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
            self._closing = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self._closing = True
            self.transport.abort()
