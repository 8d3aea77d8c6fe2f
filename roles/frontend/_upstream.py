"""The worker side of the proxy: one keep-alive pool per worker, and the mTLS connections in it.

A connection carries one exchange at a time. It parses the worker's response with httptools and hands
head, body and end to its owner (the client connection the request came from). It goes back to its
pool only after a complete response to a completely sent request; anything else closes it.

This is the bottom of the front end's connection layer: the lane, the version feed, the routes, the
proxy and the client connection build on it, never the other way. What it needs of those above (the
proxy's settings, a lane, a feed) it names as protocols here.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from typing import Protocol, cast

import httptools

from roles.frontend._cache import ResponseCache
from roles.frontend._cookies import site_scoped_cookie
from roles.frontend._http import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    H_CONNECTION,
    H_CONTENT_LENGTH,
    H_SET_COOKIE,
    H_TRANSFER_ENCODING,
    H_VERSION,
    RESPONSE_HEADERS,
    extra_connection_tokens,
    strip_headers,
)
from shared.logs import ContextLogger

__all__ = ["Exchange", "Feed", "Hub", "Lane", "Owner", "Pooled", "Upstream", "UpstreamConnection"]


# What the TLS transport to a worker reads ahead of a paused answer.
_READ_HIGH_WATER = 64 * 1024


class Exchange(Protocol):
    """What a connection needs to know about the request it carries."""

    head_request: bool
    tunnel: bool  # a WebSocket upgrade: a 101 answer turns the connection into a byte tunnel
    replayable: bool  # idempotent and bodiless: safe to send again
    cached_version: bytes  # the content version of the answer the front end holds for it, or b""
    answer_version: bytes  # the content version its answer says it came from, or b""


class Owner(Protocol):
    """The client side of an exchange: where the response goes."""

    def response_head(
        self, req: Exchange, status: int, reason: bytes, headers: bytearray, body: int
    ) -> None: ...
    def response_body(self, req: Exchange, data: bytes) -> None: ...
    def response_end(self, req: Exchange) -> None: ...
    def upstream_failed(self, req: Exchange, status: int, *, stale: bool) -> None: ...
    def lane_refused(self, req: Exchange, *, site_wide: bool) -> None: ...
    def lane_answer(
        self, req: Exchange, status_line: bytes, headers: bytes, body: bytes, version: bytes
    ) -> None: ...
    def upstream_write_paused(self, paused: bool) -> None: ...
    def tunnel_open(self, req: Exchange, conn: UpstreamConnection, early: bytes) -> None: ...
    def tunnel_data(self, data: bytes) -> None: ...
    def tunnel_closed(self) -> None: ...
    def cork(self) -> None: ...
    def uncork(self) -> None: ...


class Pooled(Protocol):
    """A connection to a worker (a keep-alive one or a lane), as the proxy's sweep and routes see it."""

    @property
    def upstream(self) -> Upstream: ...
    def check(self, now: float) -> None: ...
    def withdraw(self) -> None: ...
    def abort(self) -> None: ...


class Hub(Protocol):
    """What connections to workers need of the proxy (roles/frontend/_proxy.py): its loop, log,
    timeouts, the set they join while open, and the platform's domain (no app may set cookies for it)."""

    loop: asyncio.AbstractEventLoop
    domain: str
    log: ContextLogger
    draining: bool
    connect_timeout: float
    response_timeout: float
    upstream_idle_timeout: float
    upstream_max_idle: int
    upstream_conns: set[Pooled]
    cache: ResponseCache | None
    feed_ssl: ssl.SSLContext


class Lane(Protocol):
    """A pipelined connection to a worker (roles/frontend/_lane.py), as its pool and clients see it."""

    @property
    def load(self) -> int: ...
    def usable(self) -> bool: ...
    def submit(self, owner: Owner, req: Exchange, head: bytes) -> None: ...
    def abandon(self, req: Exchange) -> None: ...
    def withdraw(self) -> None: ...


class Feed(Protocol):
    """A worker's version feed (roles/frontend/_feed.py), as the proxy and clients see it."""

    versions: dict[str, bytes]
    lease_until: float

    def report(
        self, site: str, target: bytes, size: int, rid: bytes, client: bytes, agent: bytes, referer: bytes
    ) -> None: ...
    def check(self, now: float) -> None: ...
    def close(self) -> None: ...


class _BadResponse(Exception):
    """Raised from a parser callback: the worker's response cannot be forwarded."""


class Upstream:
    """One worker address, its idle keep-alive connections, and how many requests it has in flight."""

    __slots__ = (
        "address",
        "down_until",
        "feed",
        "host",
        "idle",
        "lanes",
        "lanes_opening",
        "no_lane_until",
        "outstanding",
        "port",
        "retired",
        "tls",
        "token",
    )

    def __init__(self, host: str, port: int, tls: bool = True) -> None:
        self.host = host
        self.port = port
        self.tls = tls  # False only for the opt-in plain hop to a worker on loopback
        self.address = f"{host}:{port}" if tls else f"http://{host}:{port}"
        # What an affinity cookie holds: the same for every front end, and says nothing of the address.
        self.token = hashlib.sha256(b"sitecloud-affinity:" + self.address.encode()).hexdigest()[:20].encode()
        self.idle: list[UpstreamConnection] = []
        # Requests in flight or connecting: what least-outstanding balancing compares.
        self.outstanding = 0
        # Until when (loop time) balancing avoids this worker: it refused or timed out a connection.
        self.down_until = 0.0
        # No longer in any site's list: connections close instead of going back to the pool.
        self.retired = False
        # Pipelined connections for GETs (roles/frontend/_lane.py), and how many are being opened.
        self.lanes: list[Lane] = []
        self.lanes_opening = 0
        # Until when (loop time) no lane is tried: the worker did not offer one (an older version).
        self.no_lane_until = 0.0
        # The worker's version feed (roles/frontend/_feed.py), while the front end keeps answers.
        self.feed: Feed | None = None

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()  # newest first: the one least likely to have timed out on the worker
            if conn.usable():
                return conn
        return None

    def put_idle(self, conn: UpstreamConnection, max_idle: int, deadline: float) -> None:
        if self.retired or len(self.idle) >= max_idle or not conn.usable():
            conn.close()
            return
        conn.deadline = deadline
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


class UpstreamConnection(asyncio.Protocol):
    """One mTLS keep-alive connection to a worker."""

    def __init__(self, proxy: Hub, upstream: Upstream) -> None:
        self._proxy = proxy
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.owner: Owner | None = None
        self.req: Exchange | None = None
        self.deadline = 0.0
        self.reused = False
        self.body_sent = False
        self._reusable = True
        self._got_bytes = False
        self._head_seen = False
        self._done = False
        self._interim = False
        self._tunnel_ok = False
        self._body = BODY_NONE
        self._reason = b""
        self._headers = bytearray()
        self._lengths = 0
        self._length = b""
        self._chunked = False
        self._tokens: frozenset[bytes] | None = None
        self._read_paused = False
        self._write_paused = False
        self._closing = False
        self.tunnel = False

    # -- pool side --------------------------------------------------------------------------------

    def usable(self) -> bool:
        return not self._closing and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        if not self._closing and self.transport is not None:
            self._closing = True
            self.transport.close()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def check(self, now: float) -> None:
        """Called by the proxy's sweep: a worker too slow to answer, or an idle connection to retire."""
        if not self.deadline or now < self.deadline:
            return
        self.deadline = 0.0
        if self.owner is None:
            self.close()
        else:
            self._fail(504)

    # -- exchange side ----------------------------------------------------------------------------

    def bind(self, owner: Owner, req: Exchange, *, reused: bool) -> None:
        self.owner = owner
        self.req = req
        self.reused = reused
        self.body_sent = False
        self._got_bytes = False
        self._head_seen = False
        self._done = False
        self.deadline = self._proxy.loop.time() + self._proxy.response_timeout

    def send(self, data: bytes) -> None:
        if self._closing or self.transport is None:
            return
        self.transport.write(data)
        if not self._read_paused and not self.tunnel:
            self.deadline = self._proxy.loop.time() + self._proxy.response_timeout

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self._closing:
            self._read_paused = True
            self.transport.pause_reading()
            self.deadline = 0.0  # the client is slow, not the worker

    def resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            if self.transport is not None and not self._closing:
                self.transport.resume_reading()
                if self.owner is not None and not self.tunnel:
                    self.deadline = self._proxy.loop.time() + self._proxy.response_timeout

    def withdraw(self) -> None:
        """The worker left the routes: a request that may be sent again and still waits for its first
        byte goes to a current worker now. A worker cut off the network would hold it until the
        response timeout; one that merely moved answers twice, which an idempotent request allows."""
        owner, req = self.owner, self.req
        if owner is None or req is None or self._got_bytes or self.tunnel or not req.replayable:
            return
        self.owner = self.req = None
        self.abort()
        self._unpause_owner(owner)
        owner.upstream_failed(req, 502, stale=True)

    def abandon(self) -> None:
        """The client went away mid-exchange: this connection is in an unknown state, so close it."""
        self.owner = None
        self.req = None
        self.abort()

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but has its interface.
        self.transport = transport = cast(asyncio.Transport, transport)
        # uvloop's TLS transport reads on to 256 KiB of answer after it was asked to pause (a
        # visitor that reads slowly): held per stalled download. A little is enough to keep up.
        set_limits = getattr(transport, "set_read_buffer_limits", None)
        if set_limits is not None:
            set_limits(high=_READ_HIGH_WATER)
        self._proxy.upstream_conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._proxy.upstream_conns.discard(self)
        self.upstream.forget(self)
        owner, req = self.owner, self.req
        if owner is None or req is None:
            return
        self.owner = self.req = None
        self._unpause_owner(owner)
        if self.tunnel:
            owner.tunnel_closed()
        elif self._head_seen and self._body == BODY_CLOSE and not self._done:
            owner.response_end(req)  # a close-delimited body ends with the connection
        else:
            owner.upstream_failed(req, 502, stale=self.reused and not self._got_bytes)

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.owner is not None:
            self.owner.upstream_write_paused(True)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.owner is not None:
            self.owner.upstream_write_paused(False)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            self.abort()  # bytes nobody asked for: the connection is out of step
            return
        if self.tunnel:
            owner.tunnel_data(data)
            return
        self._got_bytes = True
        self.deadline = self._proxy.loop.time() + self._proxy.response_timeout
        # What this read makes the client connection write leaves in one write (head and body).
        owner.cork()
        try:
            self._feed(data)
        finally:
            owner.uncork()

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            owner, req = self.owner, self.req
            if not self._tunnel_ok or owner is None or req is None:
                self._fail(502)
                return
            self.tunnel = True
            self.deadline = 0.0  # a WebSocket may be quiet for as long as it likes
            owner.tunnel_open(req, self, data[int(exc.args[0]) :])
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if cause is not None and not isinstance(cause, _BadResponse):
                self._proxy.log.error(
                    "error handling a response from %s", self.upstream.address, exc_info=cause
                )
            else:
                self._proxy.log.warning("bad response from %s: %s", self.upstream.address, cause or exc)
            self._fail(502)
            return
        if self._done:
            self._complete()

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done:
            self._reusable = False  # more bytes after the response: do not trust this connection
        self._reason = b""
        self._headers = bytearray()
        self._lengths = 0
        self._length = b""
        self._chunked = False
        self._tokens = None

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        kind = RESPONSE_HEADERS.get(name.lower())
        if kind is None or kind in (H_CONTENT_LENGTH, H_SET_COOKIE):
            if kind == H_SET_COOKIE:
                value = site_scoped_cookie(value, self._proxy.domain.encode())
            elif kind is not None:
                self._lengths += 1
                self._length = value
            h = self._headers
            h += name
            h += b": "
            h += value
            h += b"\r\n"
        elif kind == H_TRANSFER_ENCODING:
            self._chunked = True  # llhttp has checked that chunked is the final coding
        elif kind == H_CONNECTION:
            tokens = extra_connection_tokens(value)
            if tokens:
                self._tokens = tokens if self._tokens is None else self._tokens | tokens
        elif kind == H_VERSION:
            req = self.req
            if req is not None:
                req.answer_version = value

    def on_headers_complete(self) -> None:
        parser = self._parser
        status: int = parser.get_status_code()
        req, owner = self.req, self.owner
        if status < 200:
            if status == 101:
                if req is None or owner is None or not req.tunnel:
                    raise _BadResponse("101 Switching Protocols to a request that did not ask for it")
                self._tunnel_ok = True
                self._head_seen = True
                self._reusable = False
                owner.response_head(req, 101, self._reason, self._headers, BODY_NONE)
                return
            self._interim = True  # 100 and 103 are not forwarded; the final response follows
            return
        if req is None or owner is None:
            return
        self._head_seen = True
        if not parser.should_keep_alive():
            self._reusable = False
        if req.head_request:
            body = BODY_NONE
            self._done = True  # llhttp does not know the request was HEAD; stop here ourselves
            if self._chunked or (self._lengths and self._length.strip(b" \t0")):
                # Some origins send the body anyway; its bytes could arrive after the next request.
                self._reusable = False
        elif status == 204 or status == 304:
            body = BODY_NONE
        elif self._chunked:
            body = BODY_CHUNKED
        elif self._lengths:
            body = BODY_LENGTH
        else:
            body = BODY_CLOSE
            self._reusable = False
        self._body = body
        headers = self._headers if self._tokens is None else strip_headers(self._headers, self._tokens)
        owner.response_head(req, status, self._reason, headers, body)

    def on_body(self, data: bytes) -> None:
        if self._done:
            self._reusable = False  # a body after a HEAD response
            return
        owner, req = self.owner, self.req
        if owner is not None and req is not None:
            owner.response_body(req, data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._done = True

    # -- ends -------------------------------------------------------------------------------------

    def _unpause_owner(self, owner: Owner) -> None:
        if self._write_paused:
            self._write_paused = False
            owner.upstream_write_paused(False)

    def _complete(self) -> None:
        owner, req = self.owner, self.req
        self.owner = self.req = None
        self.deadline = 0.0
        if req is not None and req.head_request:
            self._parser = httptools.HttpResponseParser(self)
        if self._read_paused:
            self.resume_reading()
        proxy = self._proxy
        if self._reusable and self.body_sent and not proxy.draining:
            self.upstream.put_idle(
                self, proxy.upstream_max_idle, proxy.loop.time() + proxy.upstream_idle_timeout
            )
        else:
            self.close()
        if owner is not None and req is not None:
            self._unpause_owner(owner)
            owner.response_end(req)

    def _fail(self, status: int) -> None:
        owner, req = self.owner, self.req
        self.owner = self.req = None
        self.abort()
        if owner is not None and req is not None:
            self._unpause_owner(owner)
            owner.upstream_failed(req, status, stale=False)
