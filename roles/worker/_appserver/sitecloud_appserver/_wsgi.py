"""Serve a WSGI app (PEP 3333): blocking sockets and a pool of threads, no event loop.

asyncio alone costs a cold start tens of milliseconds of imports (logging, ssl, concurrent.futures)
and gives a WSGI app nothing. As gunicorn's gthread worker does, the main thread waits on the
listener and on connections kept alive between requests (a selector), and hands each connection with
a request to read to one of ``threads`` threads, which answers it and hands it back (or closes it).
Requests beyond the threads wait their turn in a queue; an idle kept connection holds no thread.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
import threading
import time
from queue import Empty, SimpleQueue

from . import MEMORY_EXIT
from ._environ import wsgi_environ
from ._http import HttpRequest, framing, recv_request, response_head, wants_keep_alive

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Iterable
    from typing import Any

    WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

__all__ = ["serve_wsgi"]

# How long a stop waits for requests under way.
DRAIN = 5.0
# Connections held at once (kept-alive ones included); the rest wait in the listener's backlog.
MAX_CONNECTIONS = 1000


class _Stop(Exception):
    """Raised in the main thread by SIGTERM or SIGINT, only while it waits."""


class _Signals:
    """A stop raises only where the main thread waits; elsewhere it is noted and seen next."""

    def __init__(self) -> None:
        self.waiting = False
        self.stopped = False

    def __call__(self, signum: int, frame: object) -> None:
        self.stopped = True
        if self.waiting:
            self.waiting = False
            raise _Stop


class _Conn:
    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # Bytes read past the last request (a client that pipelines).
        self.buf = bytearray()


def serve_wsgi(app: WsgiApp, threads: int, listener: socket.socket) -> None:
    """Accept on ``listener`` until SIGTERM or SIGINT, then let requests under way finish (a bound)."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    server = _Server(app, max(1, threads), wake_w)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    selector.register(wake_r, selectors.EVENT_READ, wake_r)
    signals = _Signals()
    signal.signal(signal.SIGTERM, signals)
    signal.signal(signal.SIGINT, signals)
    held = 0
    # Not accepting while at MAX_CONNECTIONS or out of file descriptors (RLIMIT_NOFILE): new
    # connections wait in the backlog until one of ours closes.
    paused = False
    try:
        while not signals.stopped:
            signals.waiting = True
            try:
                events = selector.select()
            finally:
                signals.waiting = False
            for key, _ in events:
                data = key.data
                if data is None:
                    try:
                        sock, _ = listener.accept()
                    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                        continue
                    except OSError:  # EMFILE, ENFILE, ENOBUFS
                        # An idle kept connection goes (the worker opens another when it needs
                        # one); with none, wait for a busy one to close.
                        idle = next(
                            (k for k in selector.get_map().values() if isinstance(k.data, _Conn)), None
                        )
                        if idle is not None:
                            selector.unregister(idle.fileobj)
                            idle.data.sock.close()
                            held -= 1
                        elif held == 0:
                            raise
                        else:
                            selector.unregister(listener)
                            paused = True
                        continue
                    sock.setblocking(True)
                    held += 1
                    if held >= MAX_CONNECTIONS:
                        selector.unregister(listener)
                        paused = True
                    server.submit(_Conn(sock))
                elif data is wake_r:
                    try:  # noqa: SIM105 - contextlib is one more import for every cold start
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    for conn in server.returned():
                        if conn is None:
                            held -= 1
                            if paused:
                                paused = False
                                selector.register(listener, selectors.EVENT_READ, None)
                        else:
                            selector.register(conn.sock, selectors.EVENT_READ, conn)
                else:
                    # A kept connection with a new request (or closed by the worker): to a thread.
                    selector.unregister(key.fileobj)
                    server.submit(data)
    except _Stop:
        pass
    listener.close()
    for key in list(selector.get_map().values()):
        if isinstance(key.data, _Conn):
            key.data.sock.close()  # idle: nothing under way on it
    server.stopping = True
    server.drain(DRAIN)


class _Server:
    def __init__(self, app: WsgiApp, threads: int, wake: int) -> None:
        self._app = app
        self._size = threads
        self._wake = wake
        self._jobs: SimpleQueue[_Conn] = SimpleQueue()
        # Connections back from a thread: kept ones (to wait for their next request) or None (closed).
        self._back: SimpleQueue[_Conn | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._busy = 0
        self._threads = 0
        self._idle = threading.Condition(self._lock)
        self.stopping = False

    def submit(self, conn: _Conn) -> None:
        with self._lock:
            self._busy += 1
            # Threads start as they are needed: a site that gets one request at a time keeps one.
            if self._busy > self._threads and self._threads < self._size:
                self._threads += 1
                threading.Thread(target=self._work, name=f"wsgi-{self._threads}", daemon=True).start()
        self._jobs.put(conn)

    def returned(self) -> list[_Conn | None]:
        out: list[_Conn | None] = []
        while True:
            try:
                out.append(self._back.get_nowait())
            except Empty:
                return out

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)

    def _work(self) -> None:
        while True:
            conn = self._jobs.get()
            kept = False
            try:
                kept = self._connection(conn)
            finally:
                if not kept:
                    conn.sock.close()
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()
                self._back.put(conn if kept else None)
                try:  # noqa: SIM105 - as above
                    os.write(self._wake, b"w")
                except OSError:
                    pass

    def _connection(self, conn: _Conn) -> bool:
        """Answer the connection's next request; whether to keep it for another."""
        try:
            while True:
                req = recv_request(conn.sock, conn.buf)
                if req is None:
                    return False
                if not self._run(req, conn.sock) or self.stopping:
                    return False
                if not conn.buf:
                    return True
                # A pipelined request is already here: answer it on this thread.
        except (ConnectionError, ValueError, OSError):
            return False
        except Exception:
            _print_exc()
            return False

    def _run(self, req: HttpRequest, conn: socket.socket) -> bool:
        """Answer one request; whether the connection can carry another."""
        keep = wants_keep_alive(req)
        # The head is made at the first write: an answer whose body the app gave as a list (most
        # do) then goes with its length, head and body in one write, as gunicorn sends it, rather
        # than chunked with a last empty chunk of its own.
        state: dict[str, Any] = {"start": None, "head": None, "sent": False, "chunked": False}

        def head(length: int | None) -> bytes:
            nonlocal keep
            if state["start"] is None:
                raise RuntimeError("the app wrote a body before calling start_response")
            status_code, reason, fields = state["start"]
            if keep:
                how = framing(status_code, req.method, fields)
                if how == "chunked" and length is not None:
                    fields.append((b"Content-Length", b"%d" % length))
                    how = "length"
                keep = how != "app"
                state["chunked"] = how == "chunked"
                if state["chunked"]:
                    fields.append((b"Transfer-Encoding", b"chunked"))
            return response_head(status_code, reason, fields, keep_alive=keep)

        def send(data: bytes, length: int | None = None) -> None:
            if not state["sent"]:
                first = head(length)
                state["sent"] = True
                if state["chunked"]:
                    data = first + (b"%x\r\n%s\r\n" % (len(data), data) if data else b"")
                else:
                    data = first + data
            elif state["chunked"] and data:
                data = b"%x\r\n%s\r\n" % (len(data), data)
            if data:
                conn.sendall(data)

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if exc_info is not None and state["sent"]:
                raise exc_info[1].with_traceback(exc_info[2])
            code, _, reason = status.partition(" ")
            fields = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
            state["start"] = (int(code), reason, fields)
            return send

        try:
            result = self._app(wsgi_environ(req), start_response)
            try:
                if type(result) in (list, tuple) and not state["sent"]:
                    body = b"".join(result)
                    send(body, len(body))
                else:
                    for chunk in result:
                        if chunk:
                            send(chunk)
                send(b"")
                if state["chunked"]:
                    conn.sendall(b"0\r\n\r\n")
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except MemoryError:
            print("MemoryError: the app ran out of memory", file=sys.stderr, flush=True)
            os._exit(MEMORY_EXIT)
        except ConnectionError:
            raise
        except Exception:
            _print_exc()
            if state["sent"]:
                return False  # the answer is cut short: only closing says so
            body = b"Internal Server Error\n"
            error = response_head(
                500, "Internal Server Error",
                [(b"Content-Type", b"text/plain"), (b"Content-Length", str(len(body)).encode())],
                keep_alive=keep,
            )  # fmt: skip
            conn.sendall(error + body)
        return keep


def _print_exc() -> None:
    import traceback  # only when something failed

    traceback.print_exc(file=sys.stderr)
