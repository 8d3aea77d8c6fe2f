"""``python -m sitecloud_appserver --app MODULE[:ATTR] [--interface auto|wsgi|asgi]``, listening on fd 0."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import signal
import socket
import sys
import traceback
from typing import Any

from ._asgi import AsgiHandler, Lifespan
from ._http import read_request

# Attributes tried, in order, when the entry names only a module.
_NAMES = ("app", "application")


def load(entry: str) -> Any:
    module_name, _, attr = entry.partition(":")
    module = importlib.import_module(module_name)
    for name in (attr,) if attr else _NAMES:
        app: Any = module
        for part in name.split("."):
            app = getattr(app, part, None)
        if app is not None:
            return app
    raise SystemExit(f"{module_name}.py has no {attr or ' or '.join(_NAMES)} to serve")


def is_asgi(app: Any) -> bool:
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else getattr(app, "__call__", None)  # noqa: B004
    return inspect.iscoroutinefunction(call)


async def serve(handler: Any, lifespan: Lifespan | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    busy: set[asyncio.Task[Any]] = set()
    if lifespan is not None:
        await lifespan.startup()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            busy.add(task)
        try:
            req = await read_request(reader)
            if req is not None:
                await handler(req, writer)
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        except Exception:
            traceback.print_exc(file=sys.stderr)
        finally:
            if task is not None:
                busy.discard(task)
            writer.close()

    listener = socket.socket(fileno=0)
    server = await asyncio.start_unix_server(connection, sock=listener, limit=80 * 1024)
    await stop.wait()
    server.close()
    if busy:
        await asyncio.wait(busy, timeout=5)
    if lifespan is not None:
        await lifespan.shutdown()


def _options(argv: list[str]) -> dict[str, str]:
    """``--name value`` pairs; argparse would cost a cold start more than it gives (it imports re)."""
    options = {"--interface": "auto", "--threads": "8"}
    for name, value in zip(argv[::2], argv[1::2], strict=False):
        if name not in ("--app", "--interface", "--threads"):
            raise SystemExit(
                f"usage: sitecloud_appserver --app MODULE[:ATTR] [--interface auto|wsgi|asgi]: {name}?"
            )
        options[name] = value
    if "--app" not in options:
        raise SystemExit("sitecloud_appserver needs --app MODULE[:ATTR]")
    return options


def main() -> None:
    options = _options(sys.argv[1:])
    entry, interface = options["--app"], options["--interface"]
    sys.path.insert(0, os.getcwd())
    try:
        app = load(entry)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        raise SystemExit(f"the app {entry} could not be loaded (the error is above)") from None
    asgi = interface == "asgi" or (interface == "auto" and is_asgi(app))
    handler: Any
    if asgi:
        handler = AsgiHandler(app)
    else:
        from ._wsgi import WsgiHandler

        handler = WsgiHandler(app, int(options["--threads"]))
    print(f"serving {entry} ({'ASGI' if asgi else 'WSGI'}), pid {os.getpid()}", file=sys.stderr, flush=True)
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve(handler, Lifespan(app) if asgi else None))
    finally:
        if not asgi:
            handler.close()


if __name__ == "__main__":
    main()
