"""``python -I bridge.py PORT READY_TIMEOUT COMMAND...``: a ``command`` app behind the worker's fd-0 socket.

In its sandbox a ``command`` app listens on TCP ``$PORT`` in a network namespace of its own, while the
worker speaks only to unix sockets it binds itself. This runs the command as its child, waits until
something accepts on 127.0.0.1:PORT (connections wait in the fd-0 backlog meanwhile), then splices
each accepted connection to it. SIGTERM and SIGINT go on to the command; the bridge exits with the
command's status. Standard library only: it runs under the app's Python, as a plain script.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys

CHUNK = 256 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, half_close: bool) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if half_close and writer.can_write_eof():
            writer.write_eof()
            return
    except (ConnectionError, OSError):
        pass
    writer.close()


async def _splice(port: int, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
    try:
        app_r, app_w = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        client_w.close()
        return
    # The worker's request may end in a half-close; the app's answer ends the connection.
    up = asyncio.ensure_future(_pipe(client_r, app_w, half_close=True))
    await _pipe(app_r, client_w, half_close=False)
    app_w.close()
    up.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await up


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def main(port: int, ready_timeout: float, command: list[str]) -> int:
    loop = asyncio.get_running_loop()
    child = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, child.send_signal, sig)
    exited = asyncio.ensure_future(child.wait())
    deadline = loop.time() + ready_timeout
    delay = 0.005
    while not await _listening(port):
        if exited.done():
            return exited.result()
        if loop.time() > deadline:
            print(f"the command did not listen on $PORT ({port}) within {ready_timeout:g} s", flush=True)
            child.kill()
            await exited
            return 1
        await asyncio.wait([exited], timeout=delay)
        delay = min(0.05, delay * 1.5)
    tasks: set[asyncio.Task[None]] = set()

    def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(_splice(port, reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_unix_server(accepted, sock=socket.socket(fileno=0))
    code = await exited
    server.close()
    return code


if __name__ == "__main__":
    status = asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]))
    sys.exit(status if status >= 0 else 128 - status)
