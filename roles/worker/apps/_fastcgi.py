"""A minimal FastCGI client (the responder role), enough to speak to ``php-cgi``.

Written here rather than taken from a library: the Python FastCGI clients on PyPI are blocking,
unmaintained or server-side (flup); what the worker needs is a few records on an asyncio protocol.

A request: BEGIN_REQUEST, PARAMS (then an empty PARAMS), STDIN (then an empty STDIN); the app answers
STDOUT (a CGI response: header lines, a blank line, the body), STDERR, END_REQUEST. With KEEP_CONN
(section 5.1) the app keeps the connection after END_REQUEST for the next request, which a pool
(``_pool.py``) hands out again, or which the worker has sent already, behind the one the app is on
(:meth:`FastCgiUpstream.pipeline`): php-cgi reads it as soon as it has answered, without waiting
for the worker's turn. See the FastCGI specification, sections 3 to 6.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque

from roles.worker.apps._head import MAX_HEAD_BYTES, HeadBudget, HeadTooLarge
from roles.worker.apps._pool import BEHIND_DEPTH, UpstreamPool
from roles.worker.apps._upstream import SMALL_PIECE, Sink, UpstreamBase

__all__ = [
    "STDIN_END",
    "FastCgiUpstream",
    "encode_params",
    "encode_request",
    "encode_request_head",
    "pair",
    "parse_cgi_head",
    "stdin",
]

VERSION = 1
BEGIN_REQUEST, ABORT_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT, STDERR = 1, 2, 3, 4, 5, 6, 7
RESPONDER = 1
KEEP_CONN = 1
REQUEST_ID = 1
MAX_CONTENT = 65535
_HEAD = struct.Struct("!BBHHBx")
_PAD = [b"\0" * n for n in range(8)]


def _record(kind: int, content: bytes) -> bytes:
    if len(content) <= MAX_CONTENT:
        pad = -len(content) % 8
        return b"".join((_HEAD.pack(VERSION, kind, REQUEST_ID, len(content), pad), content, _PAD[pad]))
    out = []
    for start in range(0, max(len(content), 1), MAX_CONTENT):
        chunk = content[start : start + MAX_CONTENT]
        pad = -len(chunk) % 8
        out.append(_HEAD.pack(VERSION, kind, REQUEST_ID, len(chunk), pad) + chunk + b"\0" * pad)
    return b"".join(out)


_BEGIN = _HEAD.pack(VERSION, BEGIN_REQUEST, REQUEST_ID, 8, 0) + struct.pack("!HB5x", RESPONDER, 0)
_BEGIN_KEEP = _HEAD.pack(VERSION, BEGIN_REQUEST, REQUEST_ID, 8, 0) + struct.pack(
    "!HB5x", RESPONDER, KEEP_CONN
)
_EMPTY_PARAMS = _HEAD.pack(VERSION, PARAMS, REQUEST_ID, 0, 0)
_EMPTY_STDIN = _HEAD.pack(VERSION, STDIN, REQUEST_ID, 0, 0)
# The end of a request's body (section 3.3: an empty record ends a stream).
STDIN_END = _EMPTY_STDIN


def _length(n: int) -> bytes:
    return bytes([n]) if n < 128 else struct.pack("!I", n | 0x80000000)


def pair(name: bytes, value: bytes) -> bytes:
    """One name-value pair (section 3.4)."""
    nk, nv = len(name), len(value)
    if nk < 128 and nv < 128:
        return b"".join((bytes((nk, nv)), name, value))
    return b"".join((_length(nk), _length(nv), name, value))


def encode_params(params: dict[str, str]) -> bytes:
    """Name-value pairs, not yet in records: a site's fixed ones are encoded once."""
    return b"".join(pair(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in params.items())


def encode_request(pairs: bytes, body: bytes, *, keep: bool = False) -> bytes:
    """A whole request in one piece (one write): ``pairs`` from :func:`encode_params`."""
    return b"".join((encode_request_head(pairs, keep=keep), stdin(body), _EMPTY_STDIN))


def encode_request_head(pairs: bytes, *, keep: bool = False) -> bytes:
    """A request up to its body, which follows as :func:`stdin` records and :data:`STDIN_END`."""
    return b"".join((_BEGIN_KEEP if keep else _BEGIN, _record(PARAMS, pairs), _EMPTY_PARAMS))


def stdin(data: bytes) -> bytes:
    """A piece of a request's body as STDIN records (none for no bytes: an empty one ends it)."""
    return _record(STDIN, data) if data else b""


def parse_cgi_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """A CGI response's header lines → (status, headers); ``Status:`` sets it, ``Location:`` means 302.
    Raises :class:`HeadTooLarge` past the bounds of ``_head.py``, ValueError for a Status that is no
    final HTTP status (CGI has no interim answers: RFC 3875 section 6.3.3)."""
    status = 0
    headers: list[tuple[bytes, bytes]] = []
    budget = HeadBudget()
    for line in head.replace(b"\r\n", b"\n").split(b"\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key, value = name.strip().lower(), value.strip()
        budget.add(key, value)
        if key == b"status":
            code = value.split(b" ", 1)[0] or b"200"
            if not (code.isdigit() and len(code) == 3 and 200 <= int(code) <= 599):
                raise ValueError(f"the app's Status {code[:20]!r} is not an HTTP status")
            status = int(code)
            continue
        headers.append((key, value))
    if not status:
        status = 302 if any(k == b"location" for k, _ in headers) else 200
    return status, headers


def _head_end(head: bytearray, start: int) -> tuple[int, int]:
    """Where a CGI head's blank line begins and where the body after it starts ((-1, -1): not yet);
    its lines end in CRLF or LF alone, whichever comes first."""
    crlf = head.find(b"\r\n\r\n", start)
    lf = head.find(b"\n\n", start)
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, lf + 2
    if crlf >= 0:
        return crlf, crlf + 4
    return -1, -1


class _Discard:
    """Where the answer to a request nobody waits for any more goes."""

    def upstream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        pass

    def upstream_data(self, data: bytes) -> None:
        pass

    def upstream_end(self) -> None:
        pass

    def upstream_failed(self, why: str) -> None:
        pass

    def upstream_stderr(self, text: str) -> None:
        pass

    def upstream_open(self) -> None:
        pass

    def upstream_tunnel(self, early: bytes) -> None:
        pass

    def upstream_writable(self, writable: bool) -> None:
        pass

    def upstream_batch(self, open_: bool) -> None:
        pass


_DISCARD = _Discard()


class FastCgiUpstream(UpstreamBase):
    """``pool``: the request was encoded with KEEP_CONN, and the connection goes back there after it."""

    def __init__(
        self, sink: Sink, request: bytes, *, head_only: bool, pool: UpstreamPool | None = None
    ) -> None:
        super().__init__(sink, request, pool=pool)
        self._buf = bytearray()
        # Requests sent behind the one being answered, in order: (who waits for it, HEAD).
        self._behind: deque[tuple[Sink, bool]] = deque()
        self._reset(head_only)

    def _reset(self, head_only: bool) -> None:
        self._head_only = head_only
        self._head = bytearray()
        self._have_head = False
        self._ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.pool is not None:
            self.pool.busy(self, BEHIND_DEPTH)

    def again(self, sink: Sink, request: bytes, *, head_only: bool) -> None:
        """The next request on this kept connection."""
        self._reset(head_only)
        self.begin(sink, request)
        if self.pool is not None:
            self.pool.busy(self, BEHIND_DEPTH)

    def pipeline(self, sink: Sink, request: bytes, *, head_only: bool) -> None:
        """Send ``request`` now, to be answered after the one(s) before it on this connection."""
        assert self.transport is not None
        self._behind.append((sink, head_only))
        self.transport.write(request)

    def keepable(self) -> bool:
        return self._ended and not self._buf and not self._behind

    def unheard(self, sink: Sink) -> bool:
        if sink is not self.sink:
            return any(s is sink for s, _ in self._behind)  # the app has not read it yet
        return super().unheard(sink)

    def abandon(self, sink: Sink) -> None:
        if sink is self.sink:
            self.close()  # those behind it go again on another connection
            return
        # Sent already: its answer is read and dropped, and the connection carries on.
        self._behind = deque((_DISCARD if s is sink else s, h) for s, h in self._behind)

    def data_received(self, data: bytes) -> None:
        self.heard = True
        if self.done:
            self.close()  # nothing is due on a finished or idle connection
            return
        self.sink.upstream_batch(True)
        try:
            self._records(data)
        finally:
            self.sink.upstream_batch(False)
            if self._pieces:
                self.charge_pieces()

    def _records(self, data: bytes) -> None:
        self._buf += data
        buf = self._buf
        while len(buf) >= 8 and not self.done:
            _, kind, _, length, pad = _HEAD.unpack_from(buf)
            if len(buf) < 8 + length + pad:
                return
            content = bytes(buf[8 : 8 + length])
            del buf[: 8 + length + pad]
            if kind == STDOUT and content:
                if length < SMALL_PIECE:
                    self._pieces += 1
                self._stdout(content)
            elif kind == STDERR and content:
                self.sink.upstream_stderr(content.decode("utf-8", "replace"))
            elif kind == END_REQUEST:
                self._ended = True
                if not self._have_head:
                    self._fail("the app ended the request without an answer")
                elif self._behind:
                    self._next()
                else:
                    self._finish()

    def _next(self) -> None:
        """The answer read is whole: the request sent behind it is the one answered now."""
        done = self.sink
        self.done = True
        done.upstream_end()
        done.upstream_batch(False)
        sink, head_only = self._behind.popleft()
        self.sink = sink
        self._reset(head_only)
        self.done = False
        self.reused = True
        self.heard = bool(self._buf)
        sink.upstream_batch(True)
        if self.pool is not None and len(self._behind) < BEHIND_DEPTH:
            self.pool.busy(self, BEHIND_DEPTH - len(self._behind))

    def _finish(self) -> None:
        if self.pool is not None:
            self.pool.unbusy(self)
        super()._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.done:
            self._fail("the app closed the connection before it answered")
        # Never read by the app (it answers in order): each goes again on another connection.
        for sink, _ in list(self._behind):
            sink.upstream_failed("the app closed the connection before it answered")
        self._behind.clear()

    def _stdout(self, data: bytes) -> None:
        if self._have_head:
            if not self._head_only:
                self.sink.upstream_data(data)
            return
        # Searched from where the last piece ended (a blank line may straddle two): one pass in all.
        start = max(0, len(self._head) - 3)
        self._head += data
        at, end = _head_end(self._head, start)
        if at < 0 or at > MAX_HEAD_BYTES:
            if at >= 0 or len(self._head) > MAX_HEAD_BYTES:
                self._fail(str(HeadTooLarge.over_bytes()))
            return
        try:
            status, headers = parse_cgi_head(bytes(self._head[:at]))
        except (HeadTooLarge, ValueError) as exc:
            self._fail(str(exc))
            return
        rest = bytes(self._head[end:])
        self._have_head = True
        self._head = bytearray()
        self.sink.upstream_head(status, headers)
        if rest and not self._head_only:
            self.sink.upstream_data(rest)
