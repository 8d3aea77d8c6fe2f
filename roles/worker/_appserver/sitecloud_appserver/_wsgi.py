"""Serve a WSGI app (PEP 3333): blocking sockets and a few threads, no event loop.

asyncio alone costs a cold start tens of milliseconds of imports (logging, ssl, concurrent.futures)
and gives a WSGI app nothing: each connection carries one request, read, answered and closed by one
thread. At most ``threads`` connections are taken at once; the rest wait in the listener's backlog.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from queue import SimpleQueue

from . import MEMORY_EXIT
from ._environ import wsgi_environ
from ._http import HttpRequest, recv_request, response_head

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Iterable
    from typing import Any

    WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

__all__ = ["serve_wsgi"]

# How long a stop waits for requests under way.
DRAIN = 5.0


class _Stop(Exception):
    """Raised in the accepting thread by SIGTERM or SIGINT, only while it waits."""


class _Signals:
    """A stop raises only where the accepting thread waits; elsewhere it is noted and seen next."""

    def __init__(self) -> None:
        self.waiting = False
        self.stopped = False

    def __call__(self, signum: int, frame: object) -> None:
        self.stopped = True
        if self.waiting:
            self.waiting = False
            raise _Stop


def serve_wsgi(app: WsgiApp, threads: int, listener: socket.socket) -> None:
    """Accept on ``listener`` until SIGTERM or SIGINT, then let requests under way finish (a bound)."""
    server = _Server(app, max(1, threads))
    listener.setblocking(True)
    signals = _Signals()
    signal.signal(signal.SIGTERM, signals)
    signal.signal(signal.SIGINT, signals)
    try:
        while not signals.stopped:
            signals.waiting = True
            server.slots.acquire()  # a thread is free: only then take a connection
            try:
                conn, _ = listener.accept()
            except BaseException:
                server.slots.release()
                raise
            finally:
                signals.waiting = False
            server.submit(conn)
    except _Stop:
        pass
    listener.close()
    server.drain(DRAIN)


class _Server:
    def __init__(self, app: WsgiApp, threads: int) -> None:
        self._app = app
        self._size = threads
        self.slots = threading.BoundedSemaphore(threads)
        self._jobs: SimpleQueue[socket.socket] = SimpleQueue()
        self._lock = threading.Lock()
        self._busy = 0
        self._threads = 0
        self._idle = threading.Condition(self._lock)

    def submit(self, conn: socket.socket) -> None:
        with self._lock:
            self._busy += 1
            # Threads start as they are needed: a site that gets one request at a time keeps one.
            if self._busy > self._threads:
                self._threads += 1
                threading.Thread(target=self._work, name=f"wsgi-{self._threads}", daemon=True).start()
        self._jobs.put(conn)

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)

    def _work(self) -> None:
        while True:
            conn = self._jobs.get()
            try:
                self._connection(conn)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()
                self.slots.release()

    def _connection(self, conn: socket.socket) -> None:
        try:
            with conn:
                req = recv_request(conn)
                if req is not None:
                    self._run(req, conn)
        except (ConnectionError, ValueError):
            pass
        except Exception:
            _print_exc()

    def _run(self, req: HttpRequest, conn: socket.socket) -> None:
        state: dict[str, Any] = {"head": None, "sent": False}

        def send(data: bytes) -> None:
            if not state["sent"]:
                if state["head"] is None:
                    raise RuntimeError("the app wrote a body before calling start_response")
                data = state["head"] + data
                state["sent"] = True
            if data:
                conn.sendall(data)

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if exc_info is not None and state["sent"]:
                raise exc_info[1].with_traceback(exc_info[2])
            code, _, reason = status.partition(" ")
            state["head"] = response_head(
                int(code), reason, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
            )
            return send

        try:
            result = self._app(wsgi_environ(req), start_response)
            try:
                for chunk in result:
                    if chunk:
                        send(chunk)
                send(b"")
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
            if not state["sent"]:
                body = b"Internal Server Error\n"
                head = response_head(
                    500, "Internal Server Error",
                    [(b"Content-Type", b"text/plain"), (b"Content-Length", str(len(body)).encode())],
                )  # fmt: skip
                conn.sendall(head + body)


def _print_exc() -> None:
    import traceback  # only when something failed

    traceback.print_exc(file=sys.stderr)
