"""``python -I bridge.py PORT READY_TIMEOUT COMMAND...``: a ``command`` app behind the worker's fd-0 socket.

In its sandbox a ``command`` app listens on TCP ``$PORT`` in a network namespace of its own, while the
worker speaks only to unix sockets it binds itself. This runs the command as its child, waits until
something accepts on 127.0.0.1:PORT (connections wait in the fd-0 backlog meanwhile), then splices
each accepted connection to it. SIGTERM and SIGINT go on to the command; the bridge exits with the
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


def _listening(port: int) -> bool:
    probe = socket.socket()
    try:
        probe.connect(("127.0.0.1", port))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _forward(pid: int, sig: int) -> None:
    try:  # noqa: SIM105 - contextlib would be one more import for every cold start
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _accept(sel: selectors.BaseSelector, listener: socket.socket, port: int) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        client.setblocking(False)
        app = socket.socket()
        app.setblocking(False)
        code = app.connect_ex(("127.0.0.1", port))
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
    deadline = time.monotonic() + ready_timeout
    delay = 0.005
    while not _listening(port):
        if sel.select(0):
            break  # the command ended before it listened: its status below
        if time.monotonic() > deadline:
            print(f"the command did not listen on $PORT ({port}) within {ready_timeout:g} s", flush=True)
            _forward(child, signal.SIGKILL)
            os.waitpid(child, 0)
            return 1
        # A refused connect on loopback costs microseconds: polling often costs the start far less
        # than a late look (Node takes 50 ms or more to listen, more on a busy host).
        sel.select(delay)
        delay = min(0.01, delay * 1.5)
    else:
        listener = socket.socket(fileno=0)
        listener.setblocking(False)
        sel.register(listener, _READ, listener)
        while True:
            for key, events in sel.select():
                if key.data is None:
                    break
                if key.data is listener:
                    _accept(sel, listener, port)
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
