"""Visitor connections per client address: at most ``max_connections_per_ip`` open at once.

Counted from accept to close on both listeners (a TLS connection from before its handshake), so one
address cannot take the process's file descriptors with idle handshakes, silent keep-alives or
half-sent heads and starve every other site's visitors (nginx ``limit_conn``, HAProxy ``conn_cur``).
IPv6 counts per /64 (:func:`shared.net.client_key`). The count is per serving process: with
``processes: N`` an address can hold up to N times the limit in all.

The cost is a dict update at accept and at close; nothing per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from shared.logs import ContextLogger
from shared.metrics import HttpCounts
from shared.net import client_key

__all__ = ["TOO_MANY", "AddressLimit"]

_TOO_MANY_TEXT = b"Too many connections from your address at once: close some and try again.\n"
# For plain HTTP, said before any request is read (RFC 6585 4); the connection closes after it.
TOO_MANY = (
    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nRetry-After: 1\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n%b"
    % (len(_TOO_MANY_TEXT), _TOO_MANY_TEXT)
)
# One log line per refused address per this long; addresses remembered for it, at most.
_LOG_EVERY = 60.0
_LOG_MAX_ADDRESSES = 10_000


class AddressLimit:
    """Open connections by client key; ``limit`` 0 counts nothing and refuses nothing."""

    def __init__(
        self,
        limit: int,
        counts: HttpCounts,
        log: ContextLogger,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self._counts = counts
        self._log = log
        self._clock = clock
        self.open: dict[str, int] = {}
        # When each refused address was last logged.
        self._logged: dict[str, float] = {}

    def admit(self, transport: asyncio.BaseTransport) -> str | None:
        """The key to :meth:`release` at close, "" when nothing was counted; None: refused, close now."""
        if not self.limit:
            return ""
        peer = transport.get_extra_info("peername")
        if not peer or not isinstance(peer, tuple):
            return ""  # (gone already: nothing to count by, and it closes anyway)
        key = client_key(peer[0])
        n = self.open.get(key, 0)
        if n >= self.limit:
            self._counts.refused_connections += 1
            self._note(key)
            return None
        self.open[key] = n + 1
        return key

    def release(self, key: str) -> None:
        if not key:
            return
        n = self.open.get(key, 0) - 1
        if n > 0:
            self.open[key] = n
        else:
            self.open.pop(key, None)

    def _note(self, key: str) -> None:
        now = self._clock()
        last = self._logged.get(key)
        if last is not None and now - last < _LOG_EVERY:
            return
        if last is None and len(self._logged) >= _LOG_MAX_ADDRESSES:
            self._logged = {k: t for k, t in self._logged.items() if now - t < _LOG_EVERY}
            if len(self._logged) >= _LOG_MAX_ADDRESSES:
                return  # a flood from very many addresses: the refused-connections counter tells it
        self._logged[key] = now
        self._log.warning(
            "refusing connections from %s: %s open, the most one address may hold "
            "(max_connections_per_ip; logged once a minute per address)",
            key,
            self.limit,
        )
