"""Run a WSGI app (PEP 3333) in a thread pool and stream what it returns."""

from __future__ import annotations

import asyncio
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import MEMORY_EXIT
from ._environ import wsgi_environ
from ._http import HttpRequest, response_head

__all__ = ["WsgiHandler"]

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class WsgiHandler:
    def __init__(self, app: WsgiApp, threads: int) -> None:
        self._app = app
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsgi")

    async def __call__(self, req: HttpRequest, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._run, req, writer, loop)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, req: HttpRequest, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop) -> None:
        state: dict[str, Any] = {"head": None, "sent": False}

        def send(data: bytes) -> None:
            if not state["sent"]:
                if state["head"] is None:
                    raise RuntimeError("the app wrote a body before calling start_response")
                data = state["head"] + data
                state["sent"] = True
            if data:
                asyncio.run_coroutine_threadsafe(_write(writer, data), loop).result()

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
        except Exception:
            traceback.print_exc(file=sys.stderr)
            if not state["sent"]:
                body = b"Internal Server Error\n"
                head = response_head(
                    500, "Internal Server Error",
                    [(b"Content-Type", b"text/plain"), (b"Content-Length", str(len(body)).encode())],
                )  # fmt: skip
                asyncio.run_coroutine_threadsafe(_write(writer, head + body), loop).result()


async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()
