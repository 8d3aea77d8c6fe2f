"""The worker's side of a connection to an app over HTTP/1.1 (our app server, or a ``command`` app).

A connection given a pool (``_pool.py``) asks for keep-alive and, once an answer was read whole and
the app agreed, goes back to the pool for the next request (:meth:`UpstreamBase.begin`); otherwise
it carries one request (``Connection: close``). The response is parsed with httptools and handed to
a :class:`Sink` (the exchange), which frames it for the front end. Its head is bounded (``_head.py``).
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

import httptools

from roles.worker.apps._head import MAX_HEAD_BYTES, MAX_INTERIM_HEADS, HeadBudget, HeadTooLarge
from roles.worker.apps._pool import UpstreamPool

__all__ = ["HttpUpstream", "Sink", "UpstreamBase"]


# An answer in tiny chunks costs the worker a parse callback and a copy per chunk, in the worker's own
# CPU, which no app cgroup pays for: 16 answers of a million one-byte chunks each held a worker
# busy for seconds. One connection's answers are read at most this many pieces a second (a token
# bucket; its reading paused while the bucket is empty), far above what any answer in sensible
# chunks (a big file in 64 KB reads, an event stream) ever comes near.
PIECES_PER_SECOND = 50_000.0
# Pieces of one read below this many are not counted (a usual answer has a few per read), nor pieces
# of this size or more (php-cgi's 4 KB records of a big download): per byte they cost little.
_PIECES_UNCOUNTED = 64
SMALL_PIECE = 1024


class _NoSuchStatus(Exception):
    """Raised from a parser callback: a status line whose code is none of HTTP's (100-599)."""


class Sink(Protocol):
    def upstream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    def upstream_data(self, data: bytes) -> None: ...
    def upstream_end(self) -> None: ...
    def upstream_failed(self, why: str) -> None: ...
    def upstream_stderr(self, text: str) -> None: ...
    def upstream_open(self) -> None:
        """A new connection to the app is open and the request went out on it (more of a body that
        streams may follow through :meth:`UpstreamBase.send`)."""
        ...

    def upstream_tunnel(self, early: bytes) -> None:
        """The app said 101 to an upgrade: what follows are the raw bytes of the new protocol."""
        ...

    def upstream_writable(self, writable: bool) -> None:
        """The app's socket buffer filled up (False) or drained (True): a tunnel stops reading."""
        ...

    def upstream_batch(self, open_: bool) -> None:
        """Around the calls one read from the app makes (its head, data and end often come in one):
        the sink may write them on in one piece when the batch closes."""
        ...


class UpstreamBase(asyncio.Protocol):
    def __init__(self, sink: Sink, request: bytes, *, pool: UpstreamPool | None = None) -> None:
        self.sink = sink
        self._request = request
        self.transport: asyncio.Transport | None = None
        self.done = False
        self.pool = pool
        # The throttle of answer pieces (PIECES_PER_SECOND), and who paused reading: the sink (its
        # visitor reads slowly) or the throttle, each lifting only its own pause.
        self._pieces = 0
        self._allowance = PIECES_PER_SECOND
        self._counted_at = 0.0
        self._sink_paused = False
        self._throttled = False
        # Taken from the pool for this request (not new), and whether the app said anything on it yet:
        # a kept connection the app closed just as it was reused fails with neither, and is retried.
        self.reused = False
        self.heard = False
        # Counted by the pool as open (it made room for this connection): uncounted once, as it ends.
        self.counted = pool is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)
        self._request = b""
        self.sink.upstream_open()

    def begin(self, sink: Sink, request: bytes) -> None:
        """The next request on a kept connection."""
        self.sink = sink
        self.done = False
        self.reused = True
        self.heard = False
        assert self.transport is not None
        self.transport.resume_reading()
        self.transport.write(request)

    def send(self, data: bytes) -> None:
        """Bytes for the app after the request: more of a body that streams, or a tunnel's."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def alive(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def keepable(self) -> bool:
        """Whether the answer just read leaves the connection ready for another request."""
        return False

    def unheard(self, sink: Sink) -> bool:
        """Whether ``sink``'s request surely never reached the app (a kept connection it closed as it
        was reused), so that it may go again on another connection."""
        return self.reused and not self.heard

    def abandon(self, sink: Sink) -> None:
        """``sink`` wants no answer any more (its visitor left, or it timed out)."""
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.uncount()

    def uncount(self) -> None:
        """This connection is gone (or never opened): out of the pool and its count."""
        if self.pool is not None:
            self.pool.discard(self)
            if self.counted:
                self.counted = False
                self.pool.closed_one()

    def close(self) -> None:
        self.done = True
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        self._sink_paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        self._sink_paused = False
        if self.transport is not None and not self.transport.is_closing() and not self._throttled:
            self.transport.resume_reading()

    def charge_pieces(self) -> None:
        """Count the answer pieces of the last read against the throttle; pause reading while it is
        spent."""
        pieces, self._pieces = self._pieces, 0
        if pieces <= _PIECES_UNCOUNTED:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        refill = (now - self._counted_at) * PIECES_PER_SECOND if self._counted_at else PIECES_PER_SECOND
        self._allowance = min(PIECES_PER_SECOND, self._allowance + refill) - pieces
        self._counted_at = now
        transport = self.transport
        if self._allowance >= 0 or self._throttled or transport is None or transport.is_closing():
            return
        self._throttled = True
        transport.pause_reading()
        loop.call_later(-self._allowance / PIECES_PER_SECOND, self._end_throttle)

    def _end_throttle(self) -> None:
        self._throttled = False
        transport = self.transport
        if transport is not None and not transport.is_closing() and not self._sink_paused:
            transport.resume_reading()

    def pause_writing(self) -> None:
        self.sink.upstream_writable(False)

    def resume_writing(self) -> None:
        self.sink.upstream_writable(True)

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.sink.upstream_end()
        # Part of the request still unsent means the app answered without reading all of it (a body
        # it did not want): the connection is not fit for another request, and a close would wait
        # for the app to read the rest, which it may never do.
        unsent = self.transport is not None and self.transport.get_write_buffer_size() > 0
        if self.pool is not None and not unsent and self.keepable() and self.alive() and self.pool.put(self):
            return
        if self.transport is not None:
            if unsent:
                self.transport.abort()
            else:
                self.transport.close()

    def _fail(self, why: str) -> None:
        if not self.done:
            self.done = True
            self.sink.upstream_failed(why)
        if self.transport is not None:
            self.transport.abort()


class HttpUpstream(UpstreamBase):
    """``upgrade``: the request asks to switch protocols (a WebSocket); a 101 answer turns this into a
    tunnel whose bytes go to the sink unparsed until either side closes."""

    def __init__(
        self,
        sink: Sink,
        request: bytes,
        *,
        head_only: bool,
        upgrade: bool = False,
        pool: UpstreamPool | None = None,
    ) -> None:
        super().__init__(sink, request, pool=pool)
        self._reset(head_only, upgrade)

    def _reset(self, head_only: bool, upgrade: bool) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = head_only
        self._upgrade = upgrade
        self._headers: list[tuple[bytes, bytes]] = []
        self._budget = HeadBudget()
        self._interim = 0
        # Bytes read since the parser last handed on a head, a piece of body or a message end: what
        # httptools may hold of an unfinished field (it joins a field's pieces until the field ends).
        self._quiet = 0
        self._progress = 0
        self._framed = False
        self._have_head = False
        self._complete = False
        self.tunnel = False

    def again(self, sink: Sink, request: bytes, *, head_only: bool) -> None:
        """The next request on this kept connection."""
        self._reset(head_only, False)
        self.begin(sink, request)

    def keepable(self) -> bool:
        return self._complete and not self.tunnel and not self._head_only and self._parser.should_keep_alive()

    def data_received(self, data: bytes) -> None:
        self.heard = True
        if self.done:
            if self.pool is not None:
                self.close()  # an idle kept connection says nothing unasked: it is not to be trusted
            return
        if self.tunnel:
            self.sink.upstream_data(data)
            return
        sink = self.sink
        sink.upstream_batch(True)
        progress = self._progress
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if not self.tunnel:
                self._fail("the app switched protocols without being asked to")
                return
            self.sink.upstream_tunnel(data[int(exc.args[0]) :])
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, HeadTooLarge | _NoSuchStatus):
                self._fail(str(cause))
            else:
                self._fail(f"the app's response could not be parsed ({exc})")
        else:
            # An endless field (or status line) never reaches on_header: bounded here, at most one
            # read past the bound.
            if self._progress != progress:
                self._quiet = 0
            elif not self.done:
                self._quiet += len(data)
                if self._quiet > MAX_HEAD_BYTES:
                    self._fail(str(HeadTooLarge.over_bytes()))
        finally:
            sink.upstream_batch(False)
            if self._pieces:
                self.charge_pieces()

    def eof_received(self) -> bool | None:
        # A body without a length ends with the connection.
        if self._have_head and not self._framed:
            self._finish()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.done:
            if self.tunnel or (self._have_head and not self._framed):
                self._finish()
            else:
                self._fail("the app closed the connection before it answered" if not self._have_head
                           else "the app's response was cut short")  # fmt: skip

    def on_header(self, name: bytes, value: bytes) -> None:
        self._budget.add(name, value)
        if self._have_head:
            return  # a chunked answer's trailer fields: counted, and dropped (the answer is re-framed)
        key = name.lower()
        if key in (b"content-length", b"transfer-encoding"):
            self._framed = True
        self._headers.append((key, value))

    def on_headers_complete(self) -> None:
        self._progress += 1
        self._budget = HeadBudget()  # a fresh one for the next head, or the trailers
        status = self._parser.get_status_code()
        if status == 101 and self._upgrade and self._parser.should_upgrade():
            self.tunnel = self._have_head = self._framed = True
            self.sink.upstream_head(status, self._headers)
            return
        if 100 <= status < 200:
            self._headers = []
            self._interim += 1
            if self._interim > MAX_INTERIM_HEADS:
                raise HeadTooLarge.over_interim()
            return
        if not 200 <= status <= 599:
            # llhttp reads any three digits: a visitor's client or a cache must not be handed one.
            raise _NoSuchStatus(f"the app answered with status {status}, which HTTP does not have")
        self._have_head = True
        if status in (204, 304):
            self._framed = True
        self.sink.upstream_head(status, self._headers)
        if self._head_only:
            self._finish()

    def on_body(self, body: bytes) -> None:
        self._progress += 1
        if len(body) < SMALL_PIECE:
            self._pieces += 1
        if not self.done:
            self.sink.upstream_data(body)

    def on_message_complete(self) -> None:
        self._progress += 1
        if self._have_head and not self.tunnel:
            self._complete = True
            self._finish()
