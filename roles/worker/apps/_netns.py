"""The worker's way into a sandboxed app's own network namespace, where the app listens on TCP $PORT.

A socket belongs to the network namespace it was made in, whatever thread uses it later. So a thread
of the worker's own (:class:`NetnsDialer`) enters the app's namespace with setns(2), through the nsfs
file of the sandbox's pid 1 opened once at its start, makes a few sockets there and goes back; the
event loop then connects them to 127.0.0.1:$PORT as any other socket. No process of ours runs in the
sandbox (a relay there cost every cold start an interpreter's start beside the app's), the app still
reaches nothing outside its namespace, and only root (the worker) can enter it.

Readiness is asked of the namespace's listening table over netlink (sock_diag, as ``ss -l`` does) on
a netlink socket made there the same way: no connection is opened to learn that the app listens. A
command that listens on a port of its own choosing instead (the ``app.listen(3000)`` of many a
tutorial) is found among the namespace's listeners (nothing else listens there) and used.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

__all__ = ["AppPort", "NetnsDialer", "diag_listeners", "diag_some_listeners", "table_listeners"]

_CLONE_NEWNET = 0x40000000
# <asm-generic/socket.h>: a network namespace's cookie, never reused while the machine runs (its nsfs
# inode may be, once the namespace is gone).
_SO_NETNS_COOKIE = 71
# Sockets made ahead per app (and per serving process): a new connection to the app then costs no
# thread hop; more are made in one hop when fewer than half are left.
STOCK = 4
# A port the command listens on other than $PORT is taken once it has listened this long without $PORT
# (a command may open another port, for its metrics say, before $PORT).
OTHER_PORT_AFTER = 0.2
# How often the listeners are asked for: every POLL while most commands come up (Node listens 35-50 ms
# after its spawn), then less often, up to POLL_MAX apart.
POLL = 0.002
POLL_OFTEN_FOR = 0.25
POLL_MAX = 0.01
# Each poll asks the kernel only for listeners on $PORT; the others (for a command on another port)
# are listed at most this often, and no further than a second port. An app holding 15,000 listeners (within its limits) and never $PORT
# made every poll a dump of them all, parsed on the worker's loop: 10 s of its time per start, the
# other sites' p50 1 -> 13 ms and p99 10 -> 141 ms meanwhile.
OTHER_PORT_POLL = OTHER_PORT_AFTER / 2

Target = tuple[int, str, int]  # family, address, port
# Sockets made in a namespace, its sock_diag socket (if asked for), and its cookie (0: not known).
Made = tuple[list[socket.socket], "socket.socket | None", int]


class NetnsDialer:
    """One thread that makes sockets in apps' network namespaces. The event loop's thread never leaves
    the worker's own namespace; this one enters an app's for each batch, and every batch enters the
    namespace it wants first, so a failed return could not make a socket in the wrong one."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._thread: ThreadPoolExecutor | None = None

    def _setns(self, fd: int) -> None:
        if self._libc.setns(fd, _CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"cannot enter the app's network namespace: {os.strerror(code)}")

    def _make(self, netns: int, family: int, count: int, cookie: int, netlink: bool) -> Made:
        made: list[socket.socket] = []
        self._setns(netns)
        try:
            for _ in range(count):
                made.append(socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK))
            if netlink:
                made.append(
                    socket.socket(
                        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK, _NETLINK_SOCK_DIAG
                    )
                )
        except OSError:
            for s in made:
                s.close()
            raise
        finally:
            # Back home, so the app's namespace is not held by this thread once the app has gone.
            self._setns(self._home)
        got = _cookie(made[0])
        if cookie and got != cookie:
            for s in made:
                s.close()
            raise OSError(errno.ESRCH, "the app has gone (its network namespace is another one now)")
        diag = made.pop() if netlink else None
        return made, diag, got

    async def make(
        self, netns: int, family: int, count: int, *, cookie: int = 0, netlink: bool = False
    ) -> Made:
        """``count`` nonblocking TCP sockets in the namespace of the nsfs file ``netns`` (and a
        sock_diag netlink socket there, with ``netlink``), and that namespace's cookie; OSError if
        ``cookie`` is given and the namespace has another."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="netns")
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, self._make, netns, family, max(count, 1), cookie, netlink
        )

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None
        if self._home >= 0:
            os.close(self._home)
            self._home = -1


class AppPort:
    """Where one sandboxed app listens (its namespace, as an open nsfs file, and its port), and
    sockets made there ahead of the connections that will need them."""

    def __init__(self, dialer: NetnsDialer, netns: int, pid: int, port: int) -> None:
        self._dialer = dialer
        self._netns = netns
        self._pid = pid
        self._inode = os.fstat(netns).st_ino
        # The namespace's cookie, from the first sockets made there (or told, to a serving process):
        # every later batch is checked against it.
        self._cookie = 0
        self.target: Target = (socket.AF_INET, "127.0.0.1", port)
        self._stock: list[socket.socket] = []
        self._making: asyncio.Future[None] | None = None
        self._preparing: asyncio.Future[None] | None = None
        self._diag: socket.socket | None = None
        self._diag_failed = False
        self.closed = False
        self._jobs = 0  # batches under way in the dialer's thread

    @classmethod
    def of_pid(cls, dialer: NetnsDialer, pid: int, port: int) -> AppPort:
        """The namespace of ``pid`` (the sandbox's pid 1, alive: the caller holds it)."""
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return cls(dialer, fd, pid, port)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def join(cls, dialer: NetnsDialer, where: str) -> AppPort:
        """From :attr:`where` (another process's): the same namespace, or OSError if it is gone. A
        pid reused since is in another namespace, whose nsfs inode differs (or, should the inode be
        reused too, whose cookie does: the sockets made there are checked)."""
        try:
            pid, inode, cookie, family, port = (int(p) for p in where.split(":"))
        except ValueError:
            raise OSError(errno.EINVAL, f"not an app's port: {where!r}") from None
        found = cls.of_pid(dialer, pid, port)
        if found._inode != inode:
            found.close()
            raise OSError(errno.ESRCH, "the app has gone")
        found._cookie = cookie
        if family == socket.AF_INET6:
            found.target = (family, "::1", port)
        return found

    @property
    def where(self) -> str:
        """The namespace and port as another process of the worker (a serving one) can find them."""
        return f"{self._pid}:{self._inode}:{self._cookie}:{self.target[0]}:{self.target[2]}"

    @property
    def port(self) -> int:
        return self.target[2]

    async def connected(self) -> socket.socket:
        """A socket connected to the app (nonblocking; the caller owns it)."""
        sock = await self._socket()
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.target[1:])
        except BaseException:
            sock.close()
            raise
        return sock

    async def _socket(self) -> socket.socket:
        while not self._stock:
            if self.closed:
                raise OSError(errno.ECONNREFUSED, "the app has gone")
            await asyncio.shield(self._refill())
        sock = self._stock.pop()
        if len(self._stock) < STOCK // 2:
            self._refill()
        return sock

    def _refill(self) -> asyncio.Future[None]:
        """More sockets, made in one hop to the dialer's thread (the one under way, if any)."""
        if self._making is None:
            self._making = asyncio.ensure_future(self._make())
            self._making.add_done_callback(_retrieved)
        return self._making

    async def _make(self) -> None:
        try:
            made, _, self._cookie = await self._in_thread(netlink=False)
        finally:
            self._making = None
        if self.closed:
            for s in made:
                s.close()
        else:
            self._stock.extend(made)

    async def _in_thread(self, *, netlink: bool) -> Made:
        """A batch made by the dialer's thread. The nsfs file stays open until no batch is under way:
        closed earlier, its number could be another file's by the time the thread enters it."""
        if self.closed:
            raise OSError(errno.ECONNREFUSED, "the app has gone")
        self._jobs += 1
        try:
            return await self._dialer.make(
                self._netns, self.target[0], STOCK, cookie=self._cookie, netlink=netlink
            )
        finally:
            self._jobs -= 1
            if self.closed and not self._jobs:
                self._close_netns()

    def prepare(self) -> asyncio.Future[None]:
        """Sockets and the netlink socket made ahead, beside the app's start rather than after it
        (once; what is under way is shared)."""
        if self._preparing is None:
            self._preparing = asyncio.ensure_future(self._prepare())
            self._preparing.add_done_callback(_retrieved)
        return self._preparing

    async def _prepare(self) -> None:
        made, diag, self._cookie = await self._in_thread(netlink=True)
        if self.closed:
            for s in (*made, *(d for d in (diag,) if d is not None)):
                s.close()
            return
        self._stock.extend(made)
        self._diag = diag

    def listeners(self, port: int | None = None) -> list[Target]:
        """Where something listens in the namespace, reachable from its loopback: on ``port`` only,
        or on any."""
        if self._diag is not None and not self._diag_failed:
            try:
                return diag_listeners(self._diag, port)
            except (OSError, ValueError):
                self._diag_failed = True  # no sock_diag here (a kernel without inet_diag)
        found = table_listeners(f"/proc/{self._pid}/net")
        return found if port is None else [t for t in found if t[2] == port]

    async def _some_listeners(self, ports: int) -> list[Target]:
        """Listeners until ``ports`` ports are listed: however many the app holds, what is read of
        them is that many. A dump left midway takes its netlink socket, and a new one is made."""
        if self._diag is None or self._diag_failed:
            return self.listeners()
        try:
            found, whole = diag_some_listeners(self._diag, ports)
        except (OSError, ValueError):
            self._diag_failed = True
            return self.listeners()
        if not whole:
            self._diag.close()
            self._diag = None
            try:
                made, self._diag, _ = await self._in_thread(netlink=True)
            except OSError:
                return found  # the app has gone
            if self.closed:
                for sock in (*made, *(d for d in (self._diag,) if d is not None)):
                    sock.close()
                self._diag = None
            else:
                self._stock.extend(made)
        return found

    async def wait_listening(
        self, timeout: float, *, alive: Callable[[], bool], say: Callable[[str], None]
    ) -> bool:
        """Until the app listens on $PORT (or, failing that, on one other port alone), it exits, or
        ``timeout`` passes. ``say``: a line for the site's log."""
        await asyncio.shield(self.prepare())
        port = self.port
        started = time.monotonic()
        delay = POLL
        other: Target | None = None
        other_since = looked = 0.0
        while alive():
            found = self.listeners(port)
            if found:
                # IPv4 where both are there: the sockets made ahead are.
                self._retarget(min(found))
                return True
            now = time.monotonic()
            if now - looked >= OTHER_PORT_POLL:
                looked = now
                found = await self._some_listeners(2)
                if len({t[2] for t in found}) == 1:
                    if other is None or other[2] != found[0][2]:
                        other, other_since = found[0], now
                    elif now - other_since >= OTHER_PORT_AFTER:
                        say(
                            f"the command listens on port {other[2]}, not on $PORT ({port}): visitors go "
                            f"to port {other[2]} (listen on $PORT to choose)"
                        )
                        self._retarget(other)
                        return True
                else:
                    other = None
            if now - started > timeout:
                return False
            await asyncio.sleep(delay)
            if now - started >= POLL_OFTEN_FOR:
                delay = min(POLL_MAX, delay * 1.5)
        return False

    def _retarget(self, target: Target) -> None:
        if target[0] != self.target[0]:
            for s in self._stock:
                s.close()
            self._stock.clear()
        self.target = target

    def close(self) -> None:
        if self.closed:
            return
        # (Sockets being made meanwhile are closed as they come.)
        self.closed = True
        for s in self._stock:
            s.close()
        self._stock.clear()
        if self._diag is not None:
            self._diag.close()
            self._diag = None
        if not self._jobs:
            self._close_netns()

    def _close_netns(self) -> None:
        if self._netns >= 0:
            os.close(self._netns)
            self._netns = -1


def _cookie(sock: socket.socket) -> int:
    """The cookie of the namespace ``sock`` was made in; 0 where the kernel gives none (before 5.14)."""
    try:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8), sys.byteorder)
    except OSError:
        return 0


def _retrieved(done: asyncio.Future[None]) -> None:
    """A refill's failure is seen by whoever waits for it; one made ahead has nobody waiting."""
    if not done.cancelled():
        done.exception()


# Where a listener bound to these can be reached from inside: the wildcard and loopback, v4 and v6.
_REACHABLE = {
    "00000000": (socket.AF_INET, "127.0.0.1"),
    "0100007F": (socket.AF_INET, "127.0.0.1"),
    "00000000000000000000000000000000": (socket.AF_INET6, "::1"),
    "00000000000000000000000001000000": (socket.AF_INET6, "::1"),
}
# The same addresses as sock_diag gives them (network byte order).
_REACHABLE_RAW = {
    (socket.AF_INET, bytes(4)): "127.0.0.1",
    (socket.AF_INET, socket.inet_aton("127.0.0.1")): "127.0.0.1",
    (socket.AF_INET6, bytes(16)): "::1",
    (socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "::1")): "::1",
}
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column
# <linux/netlink.h>, <linux/sock_diag.h>, <linux/inet_diag.h>, <netinet/tcp.h>
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x301
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_ATTR = struct.Struct("=HH")  # nlattr: length, type
_INET_DIAG_REQ_BYTECODE = 1
_BC_OP = struct.Struct("=BBH")  # inet_diag_bc_op: code, yes, no (a port op's next one holds the port)
_BC_S_GE, _BC_S_LE = 2, 3
_REQUEST = struct.Struct("=BBBxI48x")  # inet_diag_req_v2: family, protocol, ext, states, (sockid)
_MESSAGE = struct.Struct("=BB2xH2x16s")  # inet_diag_msg: family, state, (timer, retrans), sport, (dport), src


def _port_filter(port: int) -> bytes:
    """An INET_DIAG_REQ_BYTECODE attribute the kernel runs on each socket: ``port <= sport <= port``.
    Each op jumps ``yes`` or ``no`` bytes on; landing on the end takes the socket, past it refuses."""
    ops = (
        _BC_OP.pack(_BC_S_GE, 8, 20)
        + _BC_OP.pack(0, 0, port)
        + _BC_OP.pack(_BC_S_LE, 8, 12)
        + _BC_OP.pack(0, 0, port)
    )
    return _ATTR.pack(_ATTR.size + len(ops), _INET_DIAG_REQ_BYTECODE) + ops


def diag_listeners(nl: socket.socket, port: int | None = None) -> list[Target]:
    """The listeners of the namespace ``nl`` (a sock_diag netlink socket) was made in: on ``port``
    only (the kernel picks them), or on any. The kernel writes a dump's datagrams as the request is
    sent and as each is read, so a nonblocking socket never waits; ValueError if it has nothing to
    say (a dump cut short)."""
    return _dump(nl, port, None)[0]


def diag_some_listeners(nl: socket.socket, ports: int) -> tuple[list[Target], bool]:
    """Listeners of ``nl``'s namespace until ``ports`` ports are listed, and whether that is all of
    them. If not, the rest of the dump is left unread: ``nl`` answers no other query after it."""
    return _dump(nl, None, ports)


def _dump(nl: socket.socket, port: int | None, ports: int | None) -> tuple[list[Target], bool]:
    found: list[Target] = []
    seen: set[int] = set()
    wanted = _port_filter(port) if port is not None else b""
    for family in (socket.AF_INET, socket.AF_INET6):
        size = _HEADER.size + _REQUEST.size + len(wanted)
        nl.send(
            _HEADER.pack(size, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, family, 0)
            + _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 1 << _TCP_LISTEN)
            + wanted
        )
        while True:
            try:
                data, at = nl.recv(65536), 0
            except BlockingIOError:
                raise ValueError("sock_diag's dump stopped short") from None
            while at + _HEADER.size <= len(data):
                length, kind = _HEADER.unpack_from(data, at)[:2]
                if kind == _NLMSG_ERROR or length < _HEADER.size:
                    raise ValueError("sock_diag refused the query")
                if kind == _NLMSG_DONE:
                    break
                got, state, sport, src = _MESSAGE.unpack_from(data, at + _HEADER.size)
                address = _REACHABLE_RAW.get((got, src[: 4 if got == socket.AF_INET else 16]))
                if state == _TCP_LISTEN and address is not None:
                    found.append((got, address, socket.ntohs(sport)))
                    seen.add(found[-1][2])
                    if ports is not None and len(seen) >= ports:
                        return found, False
                at += (length + 3) & ~3
            else:
                continue  # the dump goes on in the next datagram
            break
    return found, True


def table_listeners(net: str) -> list[Target]:
    """The same from the socket tables of a namespace's ``/proc/<pid>/net``, which walk the host's
    whole TCP hash table, every namespace's connections (~5 ms of CPU per file with 7,000 of them)."""
    found: list[Target] = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"{net}/{table}") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != _LISTEN:
                continue
            address, _, port = fields[1].partition(":")
            reach = _REACHABLE.get(address)
            if reach is not None:
                found.append((reach[0], reach[1], int(port, 16)))
    return found
