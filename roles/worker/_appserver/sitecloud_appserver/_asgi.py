"""Run an ASGI 3 app: one http scope per request, and the lifespan protocol when the app speaks it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from . import MEMORY_EXIT
from ._environ import asgi_scope
from ._http import HttpRequest, response_head

__all__ = ["AsgiHandler", "Lifespan"]

Message = dict[str, Any]
AsgiApp = Callable[[dict[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]  # fmt: skip


class AsgiHandler:
    def __init__(self, app: AsgiApp) -> None:
        self._app = app

    async def __call__(self, req: HttpRequest, writer: asyncio.StreamWriter) -> None:
        done = asyncio.Event()
        given = False
        head: list[bytes] = []
        started = False

        async def receive() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal started
            kind = message["type"]
            if kind == "http.response.start":
                status = int(message["status"])
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                head.append(response_head(status, "", headers))
                started = True
            elif kind == "http.response.body":
                data = (head.pop() if head else b"") + bytes(message.get("body", b""))
                if data:
                    writer.write(data)
                    await writer.drain()
                if not message.get("more_body", False):
                    done.set()

        try:
            await self._app(asgi_scope(req), receive, send)
        except MemoryError:
            print("MemoryError: the app ran out of memory", file=sys.stderr, flush=True)
            os._exit(MEMORY_EXIT)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            if not started:
                body = b"Internal Server Error\n"
                writer.write(
                    response_head(
                        500, "Internal Server Error", [(b"Content-Length", str(len(body)).encode())]
                    )
                    + body
                )
        if head:
            writer.write(head.pop())
        done.set()


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
