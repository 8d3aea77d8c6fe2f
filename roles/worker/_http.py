"""A lean HTTP/1.1 server connection: an asyncio Protocol fed through httptools.

It parses requests (pipelined ones are queued and answered in order), drains and ignores request
bodies, and hands each request to a synchronous handler, which writes the whole response at once or
starts a file stream that this connection pumps under write flow control. So the request path makes
no task, no coroutine and no timer: timeouts are deadlines checked by the server's periodic sweep.

What one read makes this connection write leaves in one write: a front end pipelining many requests
gets their answers in one TLS record and one send. On a *lane* (a connection whose front end
negotiated ``LANE_ALPN``) every request is answered at once or refused with 421, never left to wait
on an app or a file stream, and each answer carries the front end's tag for it
(docs/architecture.md, "The lane").
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import BinaryIO, Protocol, cast

import httptools

from roles.worker._access import LOGGED_HEADERS
from shared.logs import ContextLogger
from shared.metrics import HttpCounts
from shared.pages import REASONS, error_response
from shared.tls import LANE_ALPN

# The site a front end names (the header the worker's server reads too).
_SITE_HEADER = b"x-sitecloud-site"

__all__ = [
    "Access",
    "Divert",
    "Diverted",
    "HttpConnection",
    "Limits",
    "Request",
    "http_date",
    "http_date_bytes",
    "response_head",
]

MAX_URL = 8 * 1024
MAX_HEADERS_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_BODY = 1024 * 1024
# Pipelined requests queued beyond this pause reading until the queue shrinks.
MAX_QUEUED = 16
# A streamed file is read and written this much at a time: what a visitor who stops reading leaves
# held on top of the transport's buffer (256 KiB pieces took a worker 1 MB per stalled download).
CHUNK = 64 * 1024
# What a connection's transport holds of written answer before it asks the writer to pause.
WRITE_HIGH_WATER = 64 * 1024

# The request headers a static server reads; others are counted against the limits and dropped.
_WANTED = frozenset(
    {
        b"x-sitecloud-site",
        b"if-none-match",
        b"if-modified-since",
        b"range",
        b"if-range",
        b"x-sitecloud-cached",
    }
)
# On a lane: the front end's tag for a request, echoed in its answer so the two can never fall out of step.
_LANE_TAG = b"x-sitecloud-lane"
# Kept for the site's access log only, apart from _WANTED (so the hot path's "only the site header"
# test still holds).
_LOGGED = LOGGED_HEADERS
# On a lane: "not here, send it on an ordinary connection"; "site" when none of the site's requests
# should come this way (its app answers them), "request" for this one only (a file above
# LANE_MAX_FILE, or a HEAD).
LANE_REFUSED_SITE = b"site"
LANE_REFUSED_REQUEST = b"request"
# Files up to this size are answered on a lane. Larger ones go better on a connection of their own:
# batched, they fill the socket buffers and hold up the small answers behind them (measured: a
# 100 KB file at 0.45x nginx on a lane, 0.70x on ordinary connections).
LANE_MAX_FILE = 16 * 1024
# A front end that keeps answers (X-Sitecloud-Cached) takes files up to this size on a lane, once per
# content version: from then on it is told "still fresh" instead of sent them.
LANE_FILL_MAX = 1024 * 1024
# Pieces of one write up to this many bytes in all are joined (one TLS record); larger ones are
# handed on as they are, rather than copied into one.
JOIN_MAX = 16 * 1024


@dataclass(slots=True)
class Request:
    method: bytes
    target: bytes
    # Lower-case names (only those in _WANTED); a repeated header's values are joined with ", ".
    headers: dict[bytes, bytes]
    keep_alive: bool
    # Hook: a request the divert hook took (a dynamic site's), answered by that object.
    diverted: Diverted | None = None
    # On a lane: the front end's tag, and why the request is refused (b"": it is answered here).
    tag: bytes | None = None
    lane_refusal: bytes = b""
    # The headers of _LOGGED it carried (lower-case names), for its access line.
    logged: dict[bytes, bytes] | None = None
    # Every header field as sent, kept (off lanes) while apps may take requests: one answered later
    # (see HttpConnection.defer) may turn out to be an app's.
    raw: list[tuple[bytes, bytes]] | None = None


class Diverted(Protocol):
    """Hook: one request diverted to a site's app (``roles/worker/apps/_proxy.py``).

    It gets the body as it arrives, then ``answer`` in the connection's turn; it writes through
    :meth:`HttpConnection.write` and ends with :meth:`HttpConnection.diverted_done`, never from inside
    ``answer`` itself."""

    def body(self, data: bytes) -> None: ...
    def end(self) -> None: ...
    def answer(self, conn: HttpConnection, keep_alive: bool) -> None: ...
    def resume(self) -> None: ...
    def abort(self) -> None: ...

    @property
    def upgrading(self) -> bool:
        """Whether the request goes on as an upgrade (a WebSocket): the connection's later bytes are
        then the new protocol's, passed on through ``tunnel_in``."""
        ...

    def tunnel_in(self, data: bytes) -> None: ...

    @property
    def refusal(self) -> str | None:
        """Why the request is answered 413 now, before the rest of its body is read (it is larger
        than the app takes); None while it is not."""
        ...

    def refused(self) -> None:
        """The connection answered the refusal: drop the request."""
        ...


class Divert(Protocol):
    """Hook: asked once a request's head is in (only while ``active``); None keeps it here.
    ``headers`` are all of the request's header fields, as sent; ``conn`` the connection it came on
    (a body passed on as it arrives holds its reading back with :meth:`HttpConnection.body_reading`)."""

    @property
    def active(self) -> bool: ...

    def takes(self, url: bytes, wanted: dict[bytes, bytes]) -> bool:
        """Whether a GET of ``url`` would go to an app (asked on a lane, where nothing may wait)."""
        ...

    def __call__(
        self,
        method: bytes,
        url: bytes,
        wanted: dict[bytes, bytes],
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        conn: HttpConnection,
    ) -> Diverted | None: ...


# Told of each answer the static server gave: the request, status, bytes sent and seconds taken.
Access = Callable[["Request", int, int, float], None]


@dataclass(frozen=True, slots=True)
class Limits:
    keepalive_timeout: float = 30.0
    request_timeout: float = 15.0
    send_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A request that could not be parsed, or not taken: answered in turn, then the connection closes."""

    status: int
    detail: str
    title: str = "Bad request"


_last_date: list[object] = [0, "", b""]


def http_date(ts: float | None = None) -> str:
    """An IMF-fixdate; the current one is cached per second (every response carries one)."""
    if ts is not None:
        return formatdate(ts, usegmt=True)
    return http_date_bytes().decode()


def http_date_bytes() -> bytes:
    now = int(time.time())
    if _last_date[0] != now:
        text = formatdate(now, usegmt=True)
        _last_date[:] = [now, text, text.encode()]
    return cast(bytes, _last_date[2])


def response_head(status: int, headers: list[tuple[str, str]], *, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", f"Date: {http_date()}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes the kernel still holds for the peer (SIOCOUTQ: not yet acknowledged).

    A TLS transport's buffer size leaves out what its TCP transport still holds; that is only ever
    there while the kernel's queue is full, so an empty kernel queue means all of it reached the peer.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", raw)[0])


# Answers a request; returns whether the connection may stay open after it.
Handler = Callable[[Request, "HttpConnection", bool], bool]


class _Stream:
    __slots__ = ("file", "left")

    def __init__(self, file: BinaryIO, left: int) -> None:
        self.file = file
        self.left = left


class HttpConnection(asyncio.Protocol):
    """One client connection. ``handler(request, conn, keep_alive)`` answers and returns keep-alive."""

    def __init__(
        self,
        handler: Handler,
        *,
        limits: Limits,
        log: ContextLogger,
        admit: Callable[[HttpConnection, asyncio.Transport], bool],
        on_close: Callable[[HttpConnection], None],
        divert: Divert | None = None,
        counts: HttpCounts | None = None,
        access: Access | None = None,
    ) -> None:
        self._handler = handler
        # The site's access log: told of each answer the static server gave (apps' log their own).
        self._access = access
        self._answered: Request | None = None
        self._status = 0
        self._sent = 0
        # Metrics, in plain ints: answers by status class and latency, and the answered site's
        # [requests, bytes in (not counted here), bytes out].
        self._counts = counts
        self._meter: list[int] | None = None
        self._t0 = 0.0
        # Hook: dynamic sites' requests (all headers kept, body passed on, answered later).
        self._divert = divert
        self._raw: list[tuple[bytes, bytes]] | None = None
        self._diverting: Diverted | None = None
        self._waiting: Diverted | None = None
        # A diverted upgrade request (a WebSocket): every byte after its head goes to it.
        self._upgraded: Diverted | None = None
        self._limits = limits
        self._log = log
        self._admit = admit
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._lane = False
        # Writes held while a read is parsed and answered (None: not corked), then sent as one.
        self._out: list[bytes] | None = None
        # The tag of the lane request being answered, spliced in after its status line.
        self._tag: bytes | None = None
        # "X-Sitecloud-Version: <n>\r\n", set by the handler for an answer served from a content
        # version: added to a 200 so a front end may keep it (roles/frontend/_cache.py).
        self.version_line = b""
        # The front end asked for this answer to keep it: a larger file may come on the lane.
        self.lane_fill = False
        self._queue: collections.deque[Request | _Refusal] = collections.deque()
        self._stream: _Stream | None = None
        self._keep_after_stream = True
        self._answering = False
        self._write_paused = False
        self._reading_paused = False
        # A diverted request's app cannot take its body as fast as it comes (body_reading).
        self._body_paused = False
        self._parsing = True
        self._closed = False
        self._draining = False
        self._started_response = False
        # Read and write deadlines (loop time, 0 = none), checked by the server's sweep.
        self.deadline = 0.0
        self.write_deadline = 0.0
        # The request being parsed.
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._nheaders = 0
        self._body_bytes = 0
        self._req_tag: bytes | None = None
        self._lane_refusal = b""
        self._logged: dict[bytes, bytes] | None = None

    # -- connection lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have its methods.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        if not self._admit(self, transport):
            self._closed = True
            if transport.get_protocol() is self:  # (not handed to another protocol, as a feed is)
                transport.close()
            return
        ssl_object = transport.get_extra_info("ssl_object")
        self._lane = ssl_object is not None and ssl_object.selected_alpn_protocol() == LANE_ALPN
        # uvloop's TLS transport buffers 512 KiB of writes before it says pause: held for every
        # visitor who reads slowly (plus a chunk), which took a worker 1 MB per stalled download.
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.deadline = self._loop.time() + self._limits.keepalive_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._end_stream()
        # Hook: app requests of this connection are dropped with it.
        for diverted in (
            self._diverting,
            self._waiting,
            self._upgraded,
            *(getattr(r, "diverted", None) for r in self._queue),
        ):
            if diverted is not None:
                diverted.abort()
        self._diverting = self._waiting = self._upgraded = None
        self._on_close(self)

    @property
    def idle(self) -> bool:
        return not self._answering and self._stream is None and not self._queue and self._waiting is None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def lane(self) -> bool:
        return self._lane

    @property
    def settled(self) -> bool:
        """Nothing left to answer or to send: cutting the connection now loses nothing."""
        if self._closed or self._transport is None:
            return True
        return self.idle and self._transport.get_write_buffer_size() == 0 and _unsent(self._transport) == 0

    def drain_and_close(self) -> None:
        """Server stop: finish the response in flight (if any), then close."""
        self._draining = True
        self._parsing = False
        if self.idle:
            self._close()

    def abort(self) -> None:
        self._out = None
        self._end_stream()
        if self._transport is not None:
            self._transport.abort()

    def _close(self) -> None:
        self._parsing = False
        self._flush_out()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def check(self, now: float) -> None:
        """Called by the server's sweep: a request too slow to arrive, a peer idle or not reading."""
        if (self.deadline and now >= self.deadline) or (self.write_deadline and now >= self.write_deadline):
            self.deadline = self.write_deadline = 0.0
            self.abort()

    # -- writing

    def pause_writing(self) -> None:
        self._write_paused = True
        self.write_deadline = self._loop.time() + self._limits.send_timeout

    def resume_writing(self) -> None:
        self._write_paused = False
        self.write_deadline = 0.0
        if self._stream is not None:
            self._pump()
        if self._waiting is not None:
            self._waiting.resume()

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    def defer(self, waiting: Diverted) -> None:
        """Hook: the handler answers the request in answer later, through ``waiting`` (which ends
        with :meth:`deferred_done` or :meth:`hand_over`); later requests wait behind it."""
        self._waiting = waiting

    def deferred_done(self, keep: bool) -> None:
        """Hook: a deferred request has been answered by the static server (a file may still be
        streaming: its end logs it and goes on)."""
        self._waiting = None
        if self._stream is not None:
            self._keep_after_stream = keep
            self._pump()
            return
        self._log_access()
        if not self._closed:
            self._after_answers(keep)

    def hand_over(self, diverted: Diverted, keep_alive: bool) -> None:
        """Hook: a deferred request turned out to be an app's: ``diverted`` answers it now."""
        self._answered = None
        self._waiting = diverted
        diverted.answer(self, keep_alive)

    def diverted_done(self, keep: bool) -> None:
        """Hook: the diverted request in answer has been answered (a file it sent may still be
        streaming: its end goes on)."""
        self._waiting = None
        if self._stream is not None:
            self._keep_after_stream = keep
            self._pump()
            return
        if not self._closed:
            self._after_answers(keep)

    def write(self, data: bytes) -> None:
        if not self._started_response:
            self._started_response = True
            # A response's first write starts with its status line ("HTTP/1.1 200 ...").
            self._status = int(data[9:12]) if data[9:12].isdigit() else 0
            counts = self._counts
            if counts is not None and self._status:
                counts.done(self._status, self._loop.time() - self._t0)
        self._sent += len(data)
        meter = self._meter
        if meter is not None:
            meter[2] += len(data)
        tag = self._tag
        version = self.version_line
        if tag is not None or version:
            # A first write starts with its status line: a lane answer's tag goes right after it,
            # then (on a whole 200 of a file) the content version it was served from.
            self._tag = None
            self.version_line = b""
            end = data.find(b"\r\n") + 2
            data = b"".join(
                (
                    data[:end],
                    b"X-Sitecloud-Lane: " + tag + b"\r\n" if tag is not None else b"",
                    version if self._status == 200 else b"",
                    data[end:],
                )
            )
        out = self._out
        if out is not None:
            out.append(data)
        elif self._transport is not None and not self._closed:
            self._transport.write(data)

    def write_fresh(self, version: bytes, size: int) -> None:
        """A lane request whose answer the front end holds already, from the content version this
        worker serves now: it is told so rather than sent the body again. Logged and counted as the
        200 of ``size`` bytes the visitor gets."""
        self.write(b"HTTP/1.1 204 No Content\r\nX-Sitecloud-Fresh: " + version + b"\r\n\r\n")
        self._status = 200
        self._sent = size

    def write_parts(self, head: bytes, body: bytes) -> None:
        """A response's head and whole body, leaving together; a large body is passed on as it is
        (no copy of it joined to its head)."""
        if len(body) <= JOIN_MAX:
            self.write(head + body)
            return
        if self._out is not None:
            self.write(head)
            self.write(body)
            return
        self._out = []
        try:
            self.write(head)
            self.write(body)
        finally:
            self._flush_out()

    def _flush_out(self) -> None:
        out, self._out = self._out, None
        if out and self._transport is not None and not self._closed:
            if len(out) == 1:
                self._transport.write(out[0])
            elif sum(map(len, out)) <= JOIN_MAX:
                self._transport.write(b"".join(out))
            else:
                # Large pieces go as they are: the TLS layer reads them in place, one send for all.
                self._transport.writelines(out)

    def stream(self, file: BinaryIO, length: int) -> None:
        """Send ``length`` bytes of ``file`` (positioned already) after the head; the file is ours now."""
        if self._lane:
            file.close()
            raise RuntimeError("a lane answer cannot stream; refuse_lane first")
        # The stream is pumped under flow control, which held writes would defeat.
        self._flush_out()
        self._stream = _Stream(file, length)

    def refuse_lane(self, scope: bytes) -> None:
        """A lane request this worker will not answer at once: the front end sends it again on an
        ordinary connection (``scope`` says whether for this request or for the whole site)."""
        self.write(
            b"HTTP/1.1 421 Misdirected Request\r\nX-Sitecloud-Lane-Refused: "
            + scope
            + b"\r\nContent-Length: 0\r\n\r\n"
        )

    def _pump(self) -> None:
        stream = self._stream
        if stream is None:
            return
        try:
            # Reads from the page cache block for microseconds; a thread hop per chunk would cost more.
            while stream.left > 0 and not self._write_paused and not self._closed:
                chunk = stream.file.read(min(CHUNK, stream.left))
                if not chunk:
                    raise OSError(f"{stream.file.name} ended early")
                stream.left -= len(chunk)
                self.write(chunk)
        except OSError as exc:
            self._log.warning("stream of %s broke: %s", getattr(stream.file, "name", "?"), exc)
            self.abort()
            return
        if stream.left <= 0 or self._closed:
            if self._write_paused and not self._closed:
                # The tail is still buffered: finish (and maybe close, whose TLS shutdown timer would
                # start now) once the peer has taken most of it; resume_writing comes back here.
                return
            self._log_access()
            self._end_stream()
            if not self._closed:
                self._after_answers(self._keep_after_stream)

    def _end_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.file.close()

    # -- reading

    def body_reading(self, on: bool) -> None:
        """A diverted request's app cannot take more of its body yet (False) or can again (True).
        The request's deadline stops meanwhile: the wait is the app's, not the peer's."""
        if self._transport is None or self._closed or on != self._body_paused:
            return
        self._body_paused = not on
        if on:
            self.deadline = self._loop.time() + self._limits.request_timeout
            if not self._reading_paused:
                self._transport.resume_reading()
        else:
            self.deadline = 0.0
            self._transport.pause_reading()

    def tunnel_reading(self, on: bool) -> None:
        """A tunnel's far side cannot take more (False) or can again (True)."""
        if self._transport is not None and not self._closed:
            if on:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        upgraded = self._upgraded
        if upgraded is not None:
            upgraded.tunnel_in(data)
            return
        if not self._parsing:
            return
        self._out = []
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # An upgrade an app takes (a WebSocket): what follows is the tunnel's. Any other is
            # answered as a plain request, and the connection closes after it.
            upgraded = self._upgraded
            self._stop_parsing()
            rest = data[int(exc.args[0]) :]
            if upgraded is not None and rest:
                upgraded.tunnel_in(rest)
        except httptools.HttpParserCallbackError:
            self._stop_parsing()
        except httptools.HttpParserError:
            self._refuse(400, "The request could not be parsed.")
        finally:
            self._flush_out()

    def eof_received(self) -> bool | None:
        # Over TLS a half-close cannot be kept open (asyncio closes the transport): stop here.
        self._parsing = False
        return None

    def _stop_parsing(self) -> None:
        self._parsing = False
        if self.idle:
            self._close()

    def _refuse(self, status: int, detail: str, title: str = "Bad request") -> None:
        self._parsing = False
        self._enqueue(_Refusal(status, detail, title))

    def _refuse_diverted(self) -> None:
        """A diverted request whose body is over what its app takes is answered 413 at once, by its
        length or as soon as a chunked body passes it, and the connection closes: the rest is not read
        (RFC 9110 section 15.5.14)."""
        diverted = self._diverting
        why = diverted.refusal if diverted is not None else None
        if diverted is None or why is None:
            return
        self._diverting = None
        diverted.refused()
        self._refuse(413, why, "Too large")
        raise httptools.HttpParserCallbackError("body too large")

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._nheaders = 0
        self._body_bytes = 0
        self._req_tag = None
        self._lane_refusal = b""
        self._logged = None
        self.deadline = self._loop.time() + self._limits.request_timeout
        self._raw = [] if self._divert is not None and not self._lane else None

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL:
            self._refuse(414, "The request's address is too long.")
            raise httptools.HttpParserCallbackError("url too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        self._nheaders += 1
        if self._header_bytes > MAX_HEADERS_BYTES or self._nheaders > MAX_HEADERS:
            self._refuse(431, "The request's header fields are too large.")
            raise httptools.HttpParserCallbackError("headers too large")
        if self._raw is not None:
            self._raw.append((name, value))
        key = name.lower()
        if key in _WANTED:
            old = self._headers.get(key)
            self._headers[key] = value if old is None else old + b", " + value
        elif key == _LANE_TAG and self._lane:
            self._req_tag = value
        elif key in _LOGGED:
            if self._logged is None:
                self._logged = {key: value}
            else:
                self._logged[key] = value

    def on_headers_complete(self) -> None:
        if self._lane:
            divert = self._divert
            if self._parser.get_method() != b"GET":
                self._lane_refusal = LANE_REFUSED_REQUEST  # a HEAD answer's framing is the GET's
            elif divert is not None and divert.active and divert.takes(self._url, self._headers):
                self._lane_refusal = LANE_REFUSED_SITE
            return
        if self._raw is not None and self._divert is not None and self._divert.active:
            parser = self._parser
            self._diverting = self._divert(
                parser.get_method(), self._url, self._headers, self._raw, parser.should_keep_alive(), self
            )
            self._refuse_diverted()

    def on_body(self, body: bytes) -> None:
        if self._diverting is not None:
            self._diverting.body(body)
            self._refuse_diverted()
            return
        # Static sites take no bodies: count and drop them.
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY:
            self._refuse(413, "Request bodies are not accepted here.")
            raise httptools.HttpParserCallbackError("body too large")

    def on_message_complete(self) -> None:
        parser = self._parser
        diverted, self._diverting = self._diverting, None
        if diverted is not None:
            diverted.end()
            if diverted.upgrading and parser.should_upgrade():
                self._upgraded = diverted
        if self._lane and self._req_tag is None:
            self._refuse(400, "A lane request must carry its tag.")
            raise httptools.HttpParserCallbackError("untagged lane request")
        self._enqueue(
            Request(
                parser.get_method(),
                self._url,
                self._headers,
                parser.should_keep_alive(),
                diverted,
                self._req_tag,
                self._lane_refusal,
                self._logged,
                self._raw,
            )
        )

    # -- answering, in order

    def _enqueue(self, item: Request | _Refusal) -> None:
        self._queue.append(item)
        if self._answering or self._stream is not None or self._waiting is not None:
            if len(self._queue) > MAX_QUEUED and not self._reading_paused and self._transport is not None:
                self._reading_paused = True
                self._transport.pause_reading()
            return
        self._answer_all()

    def _answer_all(self) -> None:
        self._answering = True
        keep = True
        queue = self._queue
        try:
            while queue and keep and not self._closed and self._stream is None:
                item = queue.popleft()
                if self._reading_paused and len(queue) <= MAX_QUEUED // 2 and self._transport:
                    self._reading_paused = False
                    if not self._body_paused:
                        self._transport.resume_reading()
                if isinstance(item, _Refusal):
                    self._started_response = False
                    self._meter = None
                    self._t0 = self._loop.time()
                    self._tag = None  # untagged: a front end's lane takes it as the end of the lane
                    self.write(error_response(item.status, item.title, item.detail, keep_alive=False))
                    keep = False
                    break
                keep = self._answer(item)
                if self._stream is None and self._waiting is None:
                    self._log_access()
                if self._waiting is not None:
                    return  # hook: the app answers later, through diverted_done
                if self._stream is not None:
                    self._keep_after_stream = keep
                    self._pump()
                    if self._stream is not None:
                        return  # the peer's buffer is full: resume_writing pumps the rest
        finally:
            self._answering = False
        if not self._closed:
            self._after_answers(keep)

    def _after_answers(self, keep: bool) -> None:
        if self._answering or self._stream is not None or self._waiting is not None:
            return
        if not keep or self._draining:
            self._close()
        elif self._queue:
            self._answer_all()
        elif not self._parsing:
            self._close()
        else:
            self.deadline = self._loop.time() + self._limits.keepalive_timeout

    def _log_access(self) -> None:
        request, self._answered = self._answered, None
        if request is not None and self._access is not None:
            self._access(request, self._status, self._sent, self._loop.time() - self._t0)

    def _answer(self, request: Request) -> bool:
        self._started_response = False
        self._meter = None
        self._answered = None
        self._status = self._sent = 0
        if self._counts is not None or self._access is not None:
            self._t0 = self._loop.time()
        self.deadline = 0.0
        # Once parsing has stopped, the last queued answer is the last one on this connection.
        keep_alive = request.keep_alive and not self._draining and (self._parsing or bool(self._queue))
        self._tag = request.tag
        self.version_line = b""
        self.lane_fill = False
        if request.lane_refusal:
            self.refuse_lane(request.lane_refusal)
            return keep_alive
        counts = self._counts
        if counts is not None:
            self._meter = meter = counts.site(request.headers.get(_SITE_HEADER, b"").decode("latin-1"))
            meter[0] += 1
        if request.diverted is not None:
            self._waiting = request.diverted
            request.diverted.answer(self, keep_alive)
            return keep_alive
        self._answered = request
        try:
            return self._handler(request, self, keep_alive) and keep_alive
        except Exception:
            self._log.exception("failed to answer %r %r", request.method, request.target[:200])
            self._end_stream()
            if self._started_response:
                self.abort()
            else:
                self.write(
                    error_response(
                        500,
                        "Something went wrong",
                        "The worker could not answer this request.",
                        keep_alive=False,
                    )
                )
            return False
