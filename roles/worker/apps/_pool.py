"""Connections to one app instance kept open between requests (keep-alive), as a proxy keeps them
to its upstreams: a warm request then costs no connect, accept and thread hand-off in the app.

A connection goes back to its pool once its answer was read whole and the app said it may carry
another; one the app closes while idle leaves the pool on its own. The pool closes with its instance.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["IDLE_LIMIT", "UpstreamPool"]

# Idle connections kept per instance and serving process (each is an open file of the app's, which
# its nofile limit counts): beyond this a finished one is closed.
IDLE_LIMIT = 64


class Pooled(Protocol):
    def alive(self) -> bool: ...
    def close(self) -> None: ...


class UpstreamPool:
    def __init__(self, limit: int = IDLE_LIMIT) -> None:
        self._limit = limit
        self._idle: list[Pooled] = []
        self.closed = False

    def take(self) -> Pooled | None:
        """An idle connection (the most recently used: the likeliest still open), or None."""
        while self._idle:
            conn = self._idle.pop()
            if conn.alive():
                return conn
        return None

    def put(self, conn: Pooled) -> bool:
        """Keep ``conn`` for another request; False (the caller closes it) when the pool is full or closed."""
        if self.closed or len(self._idle) >= self._limit:
            return False
        self._idle.append(conn)
        return True

    def discard(self, conn: Pooled) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    def __len__(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
