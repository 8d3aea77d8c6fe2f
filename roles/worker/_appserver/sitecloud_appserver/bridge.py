"""``python -I bridge.py PORT READY_TIMEOUT COMMAND...``: a ``command`` app behind the worker's fd-0 socket.

In its sandbox a ``command`` app listens on TCP ``$PORT`` in a network namespace of its own, while the
worker speaks only to unix sockets it binds itself. This runs the command as its child, waits until
something accepts on 127.0.0.1:PORT (connections wait in the fd-0 backlog meanwhile), then splices
each accepted connection to it. A command that listens on a port of its own choosing instead (the
``app.listen(3000)`` of many a tutorial) is found among the namespace's listeners (nothing else
listens there) and used, with a line saying so. SIGTERM and SIGINT go on to the command; the bridge exits with the
command's status. Standard library only: it runs under the app's Python, as a plain script.

Hand-written on ``selectors`` rather than asyncio: importing asyncio costs 20-45 ms of CPU, which a
cold start pays beside the command's own start on the same cores (and all of it when the command
starts faster than that). The command starts before anything else is imported.
"""

from __future__ import annotations

import os
import sys


def spawn(command: list[str]) -> int:
    """The command as our child, its stdin /dev/null (fd 0 is the worker's listener: ours alone)."""
    return os.posix_spawnp(
        command[0], command, os.environ, file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
    )


if __name__ == "__main__":
    CHILD = spawn(sys.argv[3:])

import errno  # noqa: E402 - after the spawn, on purpose
import selectors  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402

CHUNK = 256 * 1024
# What one side may hold for the other before it stops reading (the other is slow to take it).
HELD = 1 << 20
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


class _End:
    """One socket of a spliced pair: what waits to be written to it, and whether it has sent its EOF."""

    __slots__ = ("connecting", "eof", "mask", "out", "sock")

    def __init__(self, sock: socket.socket, *, connecting: bool = False) -> None:
        self.sock = sock
        self.out = bytearray()
        self.eof = False  # no more to read from it
        self.connecting = connecting
        self.mask = 0


class _Splice:
    """A worker connection (``client``) and its connection to the app. The worker's request may end
    in a half-close, which goes on to the app; the app's EOF ends the pair once its answer is out."""

    __slots__ = ("app", "client", "closed", "sel")

    def __init__(self, sel: selectors.BaseSelector, client: socket.socket, app: socket.socket) -> None:
        self.sel = sel
        self.client = _End(client)
        self.app = _End(app, connecting=True)
        self.closed = False
        self._update(self.client)
        self._update(self.app)

    def _peer(self, end: _End) -> _End:
        return self.app if end is self.client else self.client

    def _update(self, end: _End) -> None:
        if self.closed:
            return
        peer = self._peer(end)
        mask = 0
        if end.connecting or end.out:
            mask |= _WRITE
        if not end.connecting and not end.eof and len(peer.out) < HELD and not peer.connecting:
            mask |= _READ
        if mask == end.mask:
            return
        if end.mask == 0:
            self.sel.register(end.sock, mask, (self, end))
        elif mask == 0:
            self.sel.unregister(end.sock)
        else:
            self.sel.modify(end.sock, mask, (self, end))
        end.mask = mask

    def ready(self, end: _End, events: int) -> None:
        try:
            if events & _WRITE:
                self._writable(end)
            if events & _READ and not self.closed:
                self._readable(end)
        except OSError:
            self.close()
            return
        if not self.closed:
            self._update(end)
            self._update(self._peer(end))

    def _writable(self, end: _End) -> None:
        if end.connecting:
            failed = end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if failed:
                raise OSError(failed, os.strerror(failed))
            end.connecting = False
        if end.out:
            sent = end.sock.send(end.out)
            del end.out[:sent]
        self._finish(end)

    def _readable(self, end: _End) -> None:
        peer = self._peer(end)
        try:
            data = end.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            end.eof = True
            self._finish(peer)
            return
        if not peer.out:
            try:
                sent = peer.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            data = data[sent:]
        peer.out += data

    def _finish(self, end: _End) -> None:
        """Once all is written to ``end``, pass on the other side's EOF (a half-close towards the
        app; the whole pair towards the worker)."""
        peer = self._peer(end)
        if not peer.eof or end.out or end.connecting:
            return
        if end is self.client:
            self.close()
        else:
            try:
                end.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for end in (self.client, self.app):
            if end.mask:
                self.sel.unregister(end.sock)
            end.sock.close()


# A port the command listens on other than $PORT is taken once it has listened this long without $PORT
# (a command may open another port, for its metrics say, before $PORT).
OTHER_PORT_AFTER = 0.2
# How often the namespace's listeners are looked up for such a port (a command that listens on $PORT
# is found by a connect first, which costs microseconds).
SCAN_EVERY = 0.1
# Connects to $PORT: every POLL while most commands come up (Node listens 35-50 ms after its spawn),
# then less often, up to POLL_MAX apart.
POLL = 0.002
POLL_OFTEN_FOR = 0.25
POLL_MAX = 0.01
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column
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
# <linux/netlink.h>, <linux/sock_diag.h>, <linux/inet_diag.h>, <netinet/tcp.h>
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x301
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_REQUEST = struct.Struct("=BBBxI48x")  # inet_diag_req_v2: family, protocol, ext, states, (sockid)
_MESSAGE = struct.Struct("=BB2xH2x16s")  # inet_diag_msg: family, state, (timer, retrans), sport, (dport), src

Target = tuple[int, tuple[str, int]]


def _listening(target: Target) -> bool:
    probe = socket.socket(target[0])
    try:
        probe.connect(target[1])
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _listeners() -> list[Target]:
    """Where the command listens, in this network namespace (its own alone): asked of the kernel's
    listening table over netlink (sock_diag, as ``ss -l`` does), else read from /proc/net/tcp*,
    which walks the host's whole TCP hash table, every namespace's connections: ~5 ms of CPU per
    file on a host with 7,000 of them."""
    try:
        return _diag_listeners()
    except (OSError, ValueError):
        return _table_listeners()


def _diag_listeners() -> list[Target]:
    found: list[Target] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1)  # (a dump that never ends: the tables instead)
        for family in (socket.AF_INET, socket.AF_INET6):
            size = _HEADER.size + _REQUEST.size
            nl.send(
                _HEADER.pack(size, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, family, 0)
                + _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 1 << _TCP_LISTEN)
            )
            while True:
                data, at = nl.recv(65536), 0
                while at + _HEADER.size <= len(data):
                    length, kind = _HEADER.unpack_from(data, at)[:2]
                    if kind == _NLMSG_ERROR or length < _HEADER.size:
                        raise ValueError("sock_diag refused the query")
                    if kind == _NLMSG_DONE:
                        break
                    got, state, port, src = _MESSAGE.unpack_from(data, at + _HEADER.size)
                    address = _REACHABLE_RAW.get((got, src[: 4 if got == socket.AF_INET else 16]))
                    if state == _TCP_LISTEN and address is not None:
                        found.append((got, (address, socket.ntohs(port))))
                    at += (length + 3) & ~3
                else:
                    continue  # the dump goes on in the next datagram
                break
    return found


def _table_listeners() -> list[Target]:
    found: list[Target] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
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
                found.append((reach[0], (reach[1], int(port, 16))))
    return found


def _forward(pid: int, sig: int) -> None:
    try:  # noqa: SIM105 - contextlib would be one more import for every cold start
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _accept(sel: selectors.BaseSelector, listener: socket.socket, target: Target) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        client.setblocking(False)
        app = socket.socket(target[0])
        app.setblocking(False)
        code = app.connect_ex(target[1])
        if code not in (0, errno.EINPROGRESS):
            app.close()
            client.close()
            continue
        _Splice(sel, client, app)


def main(port: int, ready_timeout: float, child: int) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: _forward(child, signum))
    sel = selectors.DefaultSelector()
    pidfd = os.pidfd_open(child)
    sel.register(pidfd, _READ, None)
    started = scanned = time.monotonic()
    deadline = started + ready_timeout
    delay = POLL
    target: Target = (socket.AF_INET, ("127.0.0.1", port))
    other: Target | None = None
    other_since = 0.0
    while not _listening(target):
        if sel.select(0):
            break  # the command ended before it listened: its status below
        now = time.monotonic()
        if now - scanned >= SCAN_EVERY:
            scanned = now
            found = [t for t in _listeners() if t[1][1] != port]
            if len({t[1][1] for t in found}) == 1:
                if other is None or other[1][1] != found[0][1][1]:
                    other, other_since = found[0], now
                elif now - other_since >= OTHER_PORT_AFTER and _listening(other):
                    print(
                        f"the command listens on port {other[1][1]}, not on $PORT ({port}): visitors go "
                        f"to port {other[1][1]} (listen on $PORT to choose)",
                        flush=True,
                    )
                    target = other
                    continue  # (the loop's test now passes: on to serving)
            else:
                other = None
        if now > deadline:
            print(f"the command did not listen on $PORT ({port}) within {ready_timeout:g} s", flush=True)
            _forward(child, signal.SIGKILL)
            os.waitpid(child, 0)
            return 1
        sel.select(delay)
        if now - started >= POLL_OFTEN_FOR:
            delay = min(POLL_MAX, delay * 1.5)
    else:
        listener = socket.socket(fileno=0)
        listener.setblocking(False)
        sel.register(listener, _READ, listener)
        while True:
            for key, events in sel.select():
                if key.data is None:
                    break
                if key.data is listener:
                    _accept(sel, listener, target)
                else:
                    pair, end = key.data
                    if not pair.closed:  # (closed by an earlier event of this turn)
                        pair.ready(end, events)
            else:
                continue
            break
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    code = main(int(sys.argv[1]), float(sys.argv[2]), CHILD)
    sys.exit(code if code >= 0 else 128 - code)
