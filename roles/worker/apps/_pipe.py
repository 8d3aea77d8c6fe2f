"""The read end of an app's output pipe, read into a protocol as a read transport would.

Not ``loop.connect_read_pipe``: uvloop's closes the descriptor itself, then closes the file object it
was handed, which closes the same number a second time. A thread of the worker (a cgroup attach, a
loop mount, the netns dialer) that opened a file in between loses it, and that number then goes on
to the socket of a live transport; the next pipe or pidfd given that number fails the app's start
("File descriptor N is used by transport"). Here the descriptor is this object's alone, from the
pipe's creation to one ``os.close``; the loop only watches its number.
"""

from __future__ import annotations

import asyncio
import os

__all__ = ["PipeReader"]

_CHUNK = 64 * 1024


class PipeReader(asyncio.ReadTransport):
    """Owns ``fd`` (nonblocking from here) and closes it once: at end of file, on a read error, or
    at :meth:`close`. ``protocol.connection_lost`` follows on the loop, as for a transport."""

    def __init__(self, fd: int, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._protocol = protocol
        self._paused = False
        try:
            os.set_blocking(fd, False)
            self._loop.add_reader(fd, self._readable)
        except BaseException:
            os.close(fd)
            self._fd = -1
            raise
        protocol.connection_made(self)

    @property
    def fileno(self) -> int:
        """The descriptor while it is open, -1 after."""
        return self._fd

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, _CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(exc)
            return
        if not data:
            self._protocol.eof_received()
            self._close(None)
            return
        self._protocol.data_received(data)

    def is_reading(self) -> bool:
        return self._fd >= 0 and not self._paused

    def pause_reading(self) -> None:
        if self._fd >= 0 and not self._paused:
            self._paused = True
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if self._fd >= 0 and self._paused:
            self._paused = False
            self._loop.add_reader(self._fd, self._readable)

    def is_closing(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        self._close(None)

    def _close(self, exc: Exception | None) -> None:
        if self._fd < 0:
            return
        if not self._paused:
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        self._loop.call_soon(self._protocol.connection_lost, exc)
