"""Run an ASGI 3 app: one http scope per request, a websocket scope per WebSocket (``_websocket.py``),
and the lifespan protocol when the app speaks it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys

from . import MEMORY_EXIT
from ._environ import asgi_scope
from ._http import HttpRequest, framing, read_request, response_head, wants_keep_alive

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Any

    Message = dict[str, Any]
    AsgiApp = Callable[[dict[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]  # fmt: skip

__all__ = ["AsgiHandler", "Lifespan", "serve_asgi"]


def serve_asgi(app: AsgiApp, listener: socket.socket) -> None:
    """Serve on ``listener`` (uvloop where the app's Python has it) until SIGTERM or SIGINT."""
    runner: Any
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(_serve(AsgiHandler(app), Lifespan(app), listener))


async def _serve(handler: AsgiHandler, lifespan: Lifespan, listener: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    busy: set[asyncio.Task[Any]] = set()
    # Connections waiting for a request (kept alive between them): a stop ends these at once.
    waiting: set[asyncio.Task[Any]] = set()
    await lifespan.startup()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            busy.add(task)
        try:
            while not stop.is_set():
                if task is not None:
                    waiting.add(task)
                try:
                    req = await read_request(reader)
                except asyncio.CancelledError:
                    return  # the server stopping while this kept connection waited
                finally:
                    if task is not None:
                        waiting.discard(task)
                if req is not None and _upgrade(req):
                    from ._websocket import is_websocket, serve_websocket  # only apps that get one pay

                    if is_websocket(req):
                        try:
                            await serve_websocket(handler.app, asgi_scope(req), req, reader, writer)
                            await writer.drain()
                        except asyncio.CancelledError:
                            pass  # the server stopping: the socket goes with it, no traceback in the log
                        return
                if req is None:
                    return
                keep = await handler(req, writer)
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        except Exception:
            _print_exc()
        finally:
            if task is not None:
                busy.discard(task)
            writer.close()

    server = await asyncio.start_unix_server(connection, sock=listener, limit=80 * 1024)
    await stop.wait()
    server.close()
    for idle in list(waiting):
        idle.cancel()
    if busy:
        await asyncio.wait(busy, timeout=5)
    await lifespan.shutdown()


def _upgrade(req: HttpRequest) -> bool:
    return req.header(b"upgrade") is not None


def _print_exc() -> None:
    import traceback  # only when something failed

    traceback.print_exc(file=sys.stderr)


class AsgiHandler:
    def __init__(self, app: AsgiApp) -> None:
        self._app = app

    @property
    def app(self) -> AsgiApp:
        return self._app

    async def __call__(self, req: HttpRequest, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether the connection can carry another (the worker asked to keep
        it, and the answer was framed whole)."""
        done = asyncio.Event()
        given = False
        head: list[bytes] = []
        started = False
        keep = wants_keep_alive(req)
        chunked = False

        async def receive() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal started, keep, chunked
            kind = message["type"]
            if kind == "http.response.start":
                status = int(message["status"])
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                if keep:
                    how = framing(status, req.method, headers)
                    keep, chunked = how != "app", how == "chunked"
                    if chunked:
                        headers.append((b"Transfer-Encoding", b"chunked"))
                head.append(response_head(status, "", headers, keep_alive=keep))
                started = True
            elif kind == "http.response.body":
                body = bytes(message.get("body", b""))
                more = message.get("more_body", False)
                if chunked:
                    body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + (
                        b"" if more else b"0\r\n\r\n"
                    )
                data = (head.pop() if head else b"") + body
                if data:
                    writer.write(data)
                    await writer.drain()
                if not more:
                    done.set()

        try:
            await self._app(asgi_scope(req), receive, send)
        except MemoryError:
            print("MemoryError: the app ran out of memory", file=sys.stderr, flush=True)
            os._exit(MEMORY_EXIT)
        except Exception:
            _print_exc()
            if not started:
                body = b"Internal Server Error\n"
                writer.write(
                    response_head(
                        500, "Internal Server Error", [(b"Content-Length", str(len(body)).encode())],
                        keep_alive=keep,
                    )
                    + body
                )  # fmt: skip
                done.set()
                return keep
            return False
        if head:
            # A head without its body message: an empty body, framed as the head said.
            writer.write(head.pop() + (b"0\r\n\r\n" if chunked else b""))
            done.set()
            return keep
        ended = done.is_set()
        done.set()
        return keep and ended


class Lifespan:
    """ASGI lifespan: startup before the first request, shutdown on stop; optional for the app."""

    def __init__(self, app: AsgiApp) -> None:
        self._app = app
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._answers: asyncio.Queue[Message] = asyncio.Queue()

    async def _run(self) -> None:
        try:
            await self._app(
                {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, self._queue.get, self._send
            )
        except Exception:
            # An app without lifespan support raises on the scope type: that is allowed.
            await self._answers.put({"type": "unsupported"})
        else:
            # Or it returns without a word (a plain callable that knows only http): allowed too, and
            # startup must not wait for an answer that never comes.
            await self._answers.put({"type": "unsupported"})

    async def _send(self, message: Message) -> None:
        await self._answers.put(message)

    async def startup(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._queue.put({"type": "lifespan.startup"})
        answer = await self._answers.get()
        if answer["type"] == "lifespan.startup.failed":
            raise RuntimeError(f"the app's lifespan startup failed: {answer.get('message', '')}")
        if answer["type"] == "unsupported":
            self._task = None

    async def shutdown(self) -> None:
        if self._task is None:
            return
        await self._queue.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._answers.get(), 5)
        self._task.cancel()
