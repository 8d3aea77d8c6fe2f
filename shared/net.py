"""Small network helpers."""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port", "free_port_range"]

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Ports chosen by this process: two choices made before either is bound must still differ.
_chosen: set[int] = set()


def _ephemeral() -> tuple[int, int]:
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _candidates(count: int) -> list[int]:
    """Ports below the kernel's ephemeral range (and above the well-known ones), in random order.

    A port from the ephemeral range is free only until an outgoing connection picks it as its local
    port; a role restarted after that cannot bind it (SO_REUSEADDR spares TIME_WAIT, not a live
    connection). Below the range only an explicit bind can take it.
    """
    low, high = _ephemeral()
    pool = [p for p in range(10000, low - count) if p not in _chosen]
    if not pool:  # an unusual range that leaves nothing below it: use what is above it
        pool = [p for p in range(high + 1, 65536 - count) if p not in _chosen]
    random.shuffle(pool)
    return pool[:200]


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing uses now and no outgoing connection will take (for first-run port choices
    and tests)."""
    return free_port_range(1, host)


def free_port_range(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive free ports (see :func:`free_port`)."""
    for first in _candidates(count):
        span = range(first, first + count)
        if all(p not in _chosen and _bindable(host, p) for p in span):
            _chosen.update(span)
            return first
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # all taken: any port will do
        s.bind((host, 0))
        return int(s.getsockname()[1])
