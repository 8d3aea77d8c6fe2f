"""Connections to one app instance kept open between requests (keep-alive), as a proxy keeps them
to its upstreams: a warm request then costs no connect, accept and thread hand-off in the app.

A connection goes back to its pool once its answer was read whole and the app said it may carry
another; one the app closes while idle leaves the pool on its own. The pool closes with its instance.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

__all__ = ["BEHIND_AGE", "BEHIND_DEPTH", "IDLE_LIMIT", "UpstreamPool"]

# Idle connections kept per instance and serving process (each is an open file of the app's, which
# its nofile limit counts): beyond this a finished one is closed.
IDLE_LIMIT = 64
# A request is sent behind another on a kept connection only if that one went out this recently (s).
BEHIND_AGE = 0.05
# Requests sent behind the one a connection's app is on, at most: with one, a child that answers
# before the worker's next turn waits idle for its next request (and is woken for it).
BEHIND_DEPTH = 2


class Pooled(Protocol):
    def alive(self) -> bool: ...
    def close(self) -> None: ...


# Called with a connection handed over (or None: open one in a place made free), and whether that
# one is busy and takes the request behind its own (see :meth:`UpstreamPool.busy`); False when the
# waiter has gone meanwhile or does not take it (the pool offers it to the next).
Handover = Callable[["Pooled | None", bool], bool]


class UpstreamPool:
    """``max_open``: connections open at once, busy or idle (None: no bound). An app whose every
    worker holds one connection for as long as it is open (php-cgi's children) needs the bound, or a
    request on a new connection would wait for a child that waits on an idle kept one; a request
    beyond it waits for a connection to come back, and gets it in the same turn of the loop as it
    comes back (:meth:`wait`): with few children, a turn more per request is what keeps them idle."""

    def __init__(self, limit: int = IDLE_LIMIT, *, max_open: int | None = None) -> None:
        self._limit = limit if max_open is None else max(limit, max_open)
        self.max_open = max_open
        self._idle: list[Pooled] = []
        # Kept connections carrying one request and able to take the next behind it (pipelined),
        # with when that request went out and how many more it may take.
        self._busy: dict[Pooled, tuple[float, int]] = {}
        self._open = 0
        self._waiters: deque[Handover] = deque()
        self.closed = False

    async def lease(self) -> Pooled | None:
        """An idle connection, or None: the caller opens one (counted from now; it calls
        :meth:`closed_one` when that connection ends, or fails to open)."""
        conn = self.take()
        if conn is not None or self.closed:
            return conn
        if self.room():
            return None
        waiter: asyncio.Future[Pooled | None] = asyncio.get_running_loop().create_future()

        def handover(conn: Pooled | None, behind: bool) -> bool:
            if waiter.done() or behind:
                return False
            waiter.set_result(conn)
            return True

        self._waiters.append(handover)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                handed = waiter.result()  # handed over as we were cancelled: pass it on
                if handed is not None:
                    self.put(handed)
                else:
                    self.closed_one()
            raise

    def room(self) -> bool:
        """Whether a new connection may open now; if so, it is counted from now (as in :meth:`lease`)."""
        if self.max_open is None or self._open < self.max_open:
            self._open += 1
            return True
        return False

    def wait(self, handover: Handover) -> None:
        """``handover`` gets the next connection to come back (or a place for a new one), called
        synchronously where it comes back; the pool must be full (:meth:`take` and :meth:`room`
        gave nothing)."""
        self._waiters.append(handover)

    def take(self) -> Pooled | None:
        """An idle connection (the most recently used: the likeliest still open), or None."""
        while self._idle:
            conn = self._idle.pop()
            if conn.alive():
                return conn
        return None

    def put(self, conn: Pooled) -> bool:
        """Keep ``conn`` for another request; False (the caller closes it) when the pool is full or closed."""
        if self.closed:
            return False
        while self._waiters:
            if self._waiters.popleft()(conn, False):
                return True
        if len(self._idle) >= self._limit:
            return False
        self._idle.append(conn)
        return True

    def closed_one(self) -> None:
        """A counted connection ended (or never opened): its place goes to a waiter, if any."""
        while self._waiters:
            if self._waiters.popleft()(None, False):  # it opens a connection in this one's place
                return
        self._open = max(0, self._open - 1)

    def busy(self, conn: Pooled, room: int = 1) -> None:
        """``conn`` carries a request now, and may take ``room`` more behind it: the first waiting
        requests' (waiters go first, or requests coming after would always get ahead of them), else
        the next to ask (:meth:`behind`)."""
        self._busy.pop(conn, None)
        waiters = self._waiters
        at = 0
        while room > 0 and at < len(waiters):
            if waiters[at](conn, True):
                del waiters[at]
                room -= 1
            else:
                at += 1
        if room > 0:
            self._busy[conn] = (time.monotonic(), room)

    def unbusy(self, conn: Pooled) -> None:
        self._busy.pop(conn, None)

    def behind(self) -> Pooled | None:
        """A busy connection to send the next request on at once, or None. The app reads it as soon
        as it has answered the ones before: with few children, this keeps them from idling between
        answers while the worker waits for its turn. Only behind a request that went out within
        :data:`BEHIND_AGE`, the newest first: one that runs long already is likely to run longer,
        and what waits behind it waits as long (the rest wait in the worker for whichever
        connection comes back first)."""
        since = time.monotonic() - BEHIND_AGE
        for conn, (sent, room) in list(reversed(self._busy.items())):
            if sent < since:
                break
            if not conn.alive():
                del self._busy[conn]
                continue
            if room > 1:
                self._busy[conn] = (sent, room - 1)
            else:
                del self._busy[conn]
            return conn
        return None

    def discard(self, conn: Pooled) -> None:
        self._busy.pop(conn, None)
        if conn in self._idle:
            self._idle.remove(conn)

    def __len__(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        self.closed = True
        self._busy.clear()
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        while self._waiters:
            self._waiters.popleft()(None, False)
