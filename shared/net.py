"""Small network helpers."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["client_key", "free_port", "free_port_range"]

# IPv4-mapped IPv6 addresses, ::ffff:0:0/96 (RFC 4291 2.5.5.2): their first 12 bytes.
_V4_MAPPED = bytes(10) + b"\xff\xff"
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Ports chosen by this process: two choices made before either is bound must still differ.
_chosen: set[int] = set()
# Ports chosen by any process on this machine, as files: a test picks a cloud's public ports and
# `sitecloud up` then picks its roles' control ports, each before anything is bound.
_CLAIMS = Path(tempfile.gettempdir()) / "sitecloud-port-claims"
# A claim older than this is stale: whoever chose the port has bound it or given up on it.
_CLAIM_TTL = 900.0


def client_key(address: str) -> str:
    """What limits per client count by: the address; IPv6 per /64, or one client would have 2**64
    addresses (a host gets a whole /64, RFC 4291); an IPv4-mapped IPv6 address as the IPv4 one."""
    if ":" not in address:  # IPv4 as the kernel gives it (or no address): already its key
        return address
    try:  # (socket's C parser: ipaddress takes some 30 µs here, and this runs at every accept)
        packed = socket.inet_pton(socket.AF_INET6, address.partition("%")[0])
    except OSError:
        return address
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


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
    span = range(10000, low - count)
    if not span:  # an unusual range that leaves nothing below it: use what is above it
        span = range(high + 1, 65536 - count)
    # A sample, not a shuffle of the whole span: tests choose ports by the thousand.
    picks = random.sample(span, min(len(span), 200 + len(_chosen)))
    return [p for p in picks if p not in _chosen][:200]


def _claim(ports: range) -> bool:
    """Claim ``ports`` for this machine's next little while; False if another process has one."""
    try:
        _CLAIMS.mkdir(mode=0o1777, exist_ok=True)
    except OSError:
        return True  # nowhere to record claims: the bind check alone has to do
    if not _chosen:
        _sweep_claims()  # once per process: stale claims do not pile up
    claimed: list[Path] = []
    for port in ports:
        path = _CLAIMS / str(port)
        if not _claim_file(path):
            for done in claimed:
                done.unlink(missing_ok=True)
            return False
        claimed.append(path)
    return True


def _sweep_claims() -> None:
    stale = time.time() - _CLAIM_TTL
    with contextlib.suppress(OSError):
        for entry in os.scandir(_CLAIMS):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < stale:
                    os.unlink(entry.path)


def _claim_file(path: Path) -> bool:
    for _ in range(2):
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return True
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime < _CLAIM_TTL:
                    return False
                path.unlink()
        except OSError:
            return True
    return False


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
        if all(p not in _chosen and _bindable(host, p) for p in span) and _claim(span):
            _chosen.update(span)
            return first
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # all taken: any port will do
        s.bind((host, 0))
        return int(s.getsockname()[1])
