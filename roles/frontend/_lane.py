"""The lane: GETs pipelined to one worker over one mTLS connection (ALPN ``sitecloud-lane/1``).

An ordinary upstream connection carries one exchange at a time, so each request costs a TLS record, a
send and a read at both ends of the hop. A lane carries many at once: the requests of every client read
in one turn of the loop leave in one write, and the worker answers all that one read brought in one
write. The worker answers a lane request at once (a small file, a page, 304, 404) or refuses it with
421, and a refused request goes again on an ordinary connection. Every request carries a tag its answer
must echo: a lane whose answers ever fall out of step is cut (its requests sent again elsewhere), never
trusted to hand one visitor's answer to another.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

from roles.frontend._upstream import Exchange, Hub, Owner, Upstream

__all__ = ["NO_LANE_FOR", "LaneConnection", "lane_eligible"]

# How long a worker that offered no lane (an older version), or whose lane fell out of step, goes
# without one before it is asked again.
NO_LANE_FOR = 60.0

_TAG_LINE = b"X-Sitecloud-Lane: "
_VERSION_LINE = b"X-Sitecloud-Version: "
_FRESH_LINE = b"X-Sitecloud-Fresh: "
_REFUSED_LINE = b"\r\nX-Sitecloud-Lane-Refused: "
_REFUSED_SITE = b"site"
# An answer's head is small (the worker's own); more than this without its end is out of step.
_MAX_HEAD = 16 * 1024


def lane_eligible(method: bytes, has_body: bool, tunnel: bool) -> bool:
    """A GET without a body: the worker can answer it at once, and it may be sent again if refused.
    (Not HEAD: a HEAD answer is framed like the GET's, which a pipelined reader cannot tell apart.)"""
    return method == b"GET" and not has_body and not tunnel


class _OutOfStep(Exception):
    """Raised from a parser callback: an answer that does not belong to the request it would go to."""


class _Entry:
    __slots__ = ("owner", "req", "tag")

    def __init__(self, owner: Owner, req: Exchange, tag: bytes) -> None:
        self.owner: Owner | None = owner  # None once the client went away: the answer is dropped
        self.req = req
        self.tag = tag


class LaneConnection(asyncio.Protocol):
    """One lane to a worker: requests in the order sent, answers matched to them by tag."""

    def __init__(self, proxy: Hub, upstream: Upstream) -> None:
        self._proxy = proxy
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self._pending: deque[_Entry] = deque()
        self._out: list[bytes] = []
        self._flush_due = False
        self._tags = 0
        self._closing = False
        self._last = False  # the worker said it closes after an answer: take no more requests
        self.deadline = 0.0  # while requests are pending: the worker must show progress by then
        self.idle_since = proxy.loop.time()
        # The start of an answer whose end has not come yet, in the pieces it came in, and how many
        # bytes it needs in all (0: its head is not whole yet), so a large answer is joined once.
        self._parts: list[bytes] = []
        self._have = 0
        self._need = 0

    @property
    def load(self) -> int:
        return len(self._pending)

    def usable(self) -> bool:
        return not self._closing and not self._last and self.transport is not None

    # -- the client side ----------------------------------------------------------------------------

    def submit(self, owner: Owner, req: Exchange, head: bytes) -> None:
        """Queue ``head`` (a bodiless request head, ending in a blank line); it leaves with the other
        requests of this turn of the loop."""
        self._tags += 1
        tag = b"%d" % self._tags
        pending = self._pending
        if not pending:
            self.deadline = self._proxy.loop.time() + self._proxy.response_timeout
        pending.append(_Entry(owner, req, tag))
        self._out += (head[:-2], b"X-Sitecloud-Lane: ", tag, b"\r\n\r\n")
        if not self._flush_due:
            self._flush_due = True
            self._proxy.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        out, self._out = self._out, []
        if out and not self._closing and self.transport is not None:
            self.transport.write(b"".join(out))

    def abandon(self, req: Exchange) -> None:
        """The client went away: its answer, when it comes, is read and dropped."""
        for entry in self._pending:
            if entry.req is req:
                entry.owner = None
                return

    # -- pool side ------------------------------------------------------------------------------------

    def close(self) -> None:
        if not self._closing and self.transport is not None:
            self._closing = True
            self.transport.close()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def check(self, now: float) -> None:
        """The proxy's sweep: a worker that stopped answering, or a lane idle long enough to retire
        (before the worker's own keep-alive timeout would cut it under a request)."""
        if self._pending:
            if self.deadline and now >= self.deadline:
                self._proxy.log.warning("worker %s stopped answering on its lane", self.upstream.address)
                self._fail_all(504, stale=False)
                self.abort()
        elif now - self.idle_since >= self._proxy.upstream_idle_timeout:
            self.close()

    def withdraw(self) -> None:
        """The worker left the routes: what waits here goes to a current worker now."""
        self._fail_all(502, stale=True)
        self.abort()

    # -- asyncio.Protocol -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._proxy.upstream_conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._proxy.upstream_conns.discard(self)
        if self in self.upstream.lanes:
            self.upstream.lanes.remove(self)
        self._fail_all(502, stale=True)

    def eof_received(self) -> bool | None:
        return None

    def data_received(self, data: bytes) -> None:
        if not self._pending:
            self.abort()  # bytes nobody asked for: the lane is out of step
            return
        self.deadline = self._proxy.loop.time() + self._proxy.response_timeout
        parts = self._parts
        if parts:
            parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return
            buf = b"".join(parts)
            parts.clear()
        else:
            buf = data
        try:
            pos = self._answers(buf)
        except (_OutOfStep, ValueError) as exc:
            self._proxy.log.warning("bad answer on the lane to %s: %s", self.upstream.address, exc)
            # Not trusted with another lane for a while: its requests take ordinary connections.
            self.upstream.no_lane_until = self._proxy.loop.time() + NO_LANE_FOR
            for other in list(self.upstream.lanes):
                if other is not self:
                    other.withdraw()
            self._fail_all(502, stale=True)
            self.abort()
            return
        if pos < len(buf):
            rest = buf[pos:]
            parts.append(rest)
            self._have = len(rest)

    def _answers(self, buf: bytes) -> int:
        """Hand each whole answer in ``buf`` to its client; returns where the unread rest begins.

        Lane answers come from the worker's own static server, in the form docs/architecture.md
        gives: the status line, the tag line, header lines in canonical case with a Content-Length,
        a blank line, the body. Read by hand, as httptools' per-header callbacks cost more than the
        rest of the answer's way to the client."""
        pos, size = 0, len(buf)
        pending = self._pending
        # Every answer this read brings for one client connection leaves in one write to it.
        corked: set[Owner] = set()
        try:
            return self._hand_out(buf, pos, size, pending, corked)
        finally:
            for owner in corked:
                owner.uncork()

    def _hand_out(self, buf: bytes, pos: int, size: int, pending: deque[_Entry], corked: set[Owner]) -> int:
        while pos < size and not self._closing:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                if size - pos > _MAX_HEAD:
                    raise _OutOfStep("an answer head without an end")
                self._need = 0
                return pos
            if not pending:
                raise _OutOfStep("an answer to no request")
            if not buf.startswith(b"HTTP/1.1 ", pos):
                raise _OutOfStep("not an HTTP/1.1 answer")
            line_end = buf.find(b"\r\n", pos)
            status = int(buf[pos + 9 : pos + 12])
            tag_at = line_end + 2
            if not buf.startswith(_TAG_LINE, tag_at):
                raise _OutOfStep("an untagged answer")
            tag_end = buf.find(b"\r\n", tag_at)
            entry = pending[0]
            if buf[tag_at + len(_TAG_LINE) : tag_end] != entry.tag:
                raise _OutOfStep(f"an answer tagged {buf[tag_at:tag_end]!r} where {entry.tag!r} was due")
            # The content version right after the tag: a 200 the front end may keep, or a 204 saying
            # the answer it holds for this request is still the one (roles/frontend/_cache.py).
            version = b""
            line_at = tag_end + 2
            if buf.startswith(_VERSION_LINE, line_at):
                tag_end = buf.find(b"\r\n", line_at)
                version = buf[line_at + len(_VERSION_LINE) : tag_end]
                if status != 200:
                    raise _OutOfStep(f"a version on a {status} answer")
            elif buf.startswith(_FRESH_LINE, line_at):
                tag_end = buf.find(b"\r\n", line_at)
                version = buf[line_at + len(_FRESH_LINE) : tag_end]
                if status != 204 or not version or version != entry.req.cached_version:
                    raise _OutOfStep(f"'fresh' for a version not held ({version!r})")
            if buf.find(b"\r\nTransfer-Encoding:", tag_end, end) >= 0:
                raise _OutOfStep("a chunked answer (lane answers are whole)")
            length = 0
            if status == 204 or status == 304:
                pass
            elif status < 200:
                raise _OutOfStep(f"an interim answer ({status})")
            else:
                at = buf.find(b"\r\nContent-Length: ", tag_end, end)
                if at < 0:
                    raise _OutOfStep("an answer without a length")
                length = int(buf[at + 18 : buf.find(b"\r\n", at + 18)])
            done = end + 4 + length
            if done > size:
                self._need = done - pos  # the body is still on its way
                return pos
            # Connection belongs to the lane, not to the client's connection: drop it.
            at = buf.find(b"\r\nConnection: ", tag_end, end)
            if at < 0:
                headers = buf[tag_end + 2 : end + 2]
            else:
                line = buf.find(b"\r\n", at + 2)
                if b"close" in buf[at + 14 : line].lower():
                    self._last = True
                headers = buf[tag_end + 2 : at + 2] + buf[line + 2 : end + 2]
            refused = buf.find(_REFUSED_LINE, tag_end, end) >= 0 if status == 421 else False
            pending.popleft()
            if not pending:
                self.deadline = 0.0
                self.idle_since = self._proxy.loop.time()
            owner, entry.owner = entry.owner, None
            if owner is not None:
                if owner not in corked:
                    owner.cork()
                    corked.add(owner)
                if refused:
                    site_wide = buf.find(_REFUSED_LINE + _REFUSED_SITE, tag_end, end) >= 0
                    owner.lane_refused(entry.req, site_wide=site_wide)
                else:
                    owner.lane_answer(entry.req, buf[pos:tag_at], headers, buf[end + 4 : done], version)
            pos = done
        return pos

    # -- ends -----------------------------------------------------------------------------------------

    def _fail_all(self, status: int, *, stale: bool) -> None:
        # An answer is handed on whole or not at all, so every request here may go again.
        pending, self._pending = self._pending, deque()
        self._parts.clear()
        self._need = 0
        self.deadline = 0.0
        for entry in pending:
            owner, entry.owner = entry.owner, None
            if owner is not None:
                owner.upstream_failed(entry.req, status, stale=stale)
