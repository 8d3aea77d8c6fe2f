"""The WebSocket tunnel: after a worker answers an upgrade request with 101 (RFC 6455 4.2.2), the
client's connection and the worker's carry bytes both ways, unparsed, until either side closes.

The client connection (roles/frontend/_client.py) stops parsing at the upgrade request and holds what
the client sends after it, with reading paused, until the worker's 101 opens the tunnel
(:meth:`Tunnel.open`). Flow control is the proxy's usual one: the worker's connection is the request's
``conn`` (paused while the client's write buffer is full) and the client's reading pauses while the
worker's write buffer is full.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeGuard

from roles.frontend._upstream import UpstreamConnection

__all__ = ["Tunnel", "is_websocket", "upgrade_lines"]


def is_websocket(upgrade: bytes | None) -> TypeGuard[bytes]:
    """Whether an ``Upgrade`` header asks for a WebSocket (any other upgrade is proxied as a plain
    request, its Upgrade header dropped)."""
    return upgrade is not None and b"websocket" in upgrade.lower()


def upgrade_lines(upgrade: bytes) -> bytes:
    """The hop-by-hop lines an upgrade request and its 101 answer carry (RFC 9110 7.8)."""
    return b"Connection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n"


class Tunnel:
    """One client connection's tunnel, from its upgrade request on.

    ``write`` sends to the client, ``send`` to the worker's connection (both as the client connection
    does it: corked, metered)."""

    __slots__ = ("_held", "_meter", "_send", "_write", "conn")

    def __init__(
        self,
        early: bytes,
        write: Callable[[bytes], None],
        send: Callable[[UpstreamConnection, bytes], None],
    ) -> None:
        self.conn: UpstreamConnection | None = None  # the worker's connection, from its 101 on
        # What the client sent after the upgrade request, until the 101 (None once open, or closed).
        self._held: list[bytes] | None = [early] if early else []
        self._meter: list[int] | None = None
        self._write = write
        self._send = send

    def open(self, conn: UpstreamConnection, early: bytes, meter: list[int] | None) -> None:
        """The worker said 101: ``early`` is what it sent after it; ``meter`` the site's usage
        counters ([requests, in, out])."""
        self.conn = conn
        self._meter = meter
        if early:
            self._write(early)
        held, self._held = self._held, None
        if held:
            self.from_client(b"".join(held))

    def from_client(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            if self._held is not None:
                self._held.append(data)
            return
        meter = self._meter
        if meter is not None:
            meter[1] += len(data)
        self._send(conn, data)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        self._held = None
        if conn is not None:
            conn.close()
