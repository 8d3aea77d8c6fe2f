"""``python -I bridge.py PORT READY_TIMEOUT COMMAND...``: a ``command`` app behind the worker's fd-0 socket.

In its sandbox a ``command`` app listens on TCP ``$PORT`` in a network namespace of its own, while the
worker speaks only to unix sockets it binds itself. This runs the command as its child, waits until
something accepts on 127.0.0.1:PORT (connections wait in the fd-0 backlog meanwhile), then splices
each accepted connection to it. SIGTERM and SIGINT go on to the command; the bridge exits with the
command's status. Standard library only: it runs under the app's Python, as a plain script.

The command starts before asyncio is imported (tens of milliseconds of a cold start): the two
overlap.
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

import asyncio  # noqa: E402 - after the spawn, on purpose
import contextlib  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402

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


def _watch(pid: int) -> asyncio.Future[int]:
    """The child's exit status (negative: the signal that ended it), through a pidfd."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int] = loop.create_future()
    pidfd = os.pidfd_open(pid)

    def readable() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        exited.set_result(os.waitstatus_to_exitcode(status))

    loop.add_reader(pidfd, readable)
    return exited


def _forward(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


async def main(port: int, ready_timeout: float, child: int) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _forward, child, sig)
    exited = _watch(child)
    deadline = loop.time() + ready_timeout
    delay = 0.005
    while not await _listening(port):
        if exited.done():
            return exited.result()
        if loop.time() > deadline:
            print(f"the command did not listen on $PORT ({port}) within {ready_timeout:g} s", flush=True)
            _forward(child, signal.SIGKILL)
            await exited
            return 1
        await asyncio.wait([exited], timeout=delay)
        # A refused connect on loopback costs microseconds: polling often costs the start far less
        # than a late look (Node takes 50 ms or more to listen, more on a busy host).
        delay = min(0.01, delay * 1.5)
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
    status = asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]), CHILD))
    sys.exit(status if status >= 0 else 128 - status)
