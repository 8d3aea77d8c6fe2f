"""A version of a site as a zip, written by a thread and streamed as it is made (never whole in memory)."""

from __future__ import annotations

import asyncio
import io
import queue
import shutil
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["ZipMember", "stream_zip"]

_CHUNK = 256 * 1024
# Chunks the writer thread may be ahead of a slow client: bounds the memory a download holds.
_AHEAD = 16
_EARLIEST = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class ZipMember:
    """A file (``blob`` opens its bytes) or an empty directory (``blob`` None) of the archive."""

    path: str
    blob: Callable[[], IO[bytes]] | None
    mtime: float


class _Abandoned(Exception):
    """The download was given up: the writer stops."""


class _Pipe(io.RawIOBase):
    """What zipfile writes to: a bounded queue to the event loop; not seekable, so zipfile writes data
    descriptors instead of going back to patch headers."""

    def __init__(self, out: queue.Queue[bytes | BaseException | None], stop: threading.Event) -> None:
        self._out = out
        self._stop = stop
        self._buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        if self._stop.is_set():
            raise _Abandoned
        view = memoryview(data)
        self._buf += view
        if len(self._buf) >= _CHUNK:
            self.send()
        return view.nbytes

    def send(self) -> None:
        if self._buf:
            self._out.put(bytes(self._buf))
            self._buf.clear()


def _date_time(mtime: float) -> tuple[int, int, int, int, int, int]:
    stamp = time.gmtime(mtime)[:6]
    return max(stamp, _EARLIEST)  # zip dates start in 1980


def _write(
    members: list[ZipMember], out: queue.Queue[bytes | BaseException | None], stop: threading.Event
) -> None:
    pipe = _Pipe(out, stop)
    try:
        with zipfile.ZipFile(pipe, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            for m in members:
                if m.blob is None:
                    info = zipfile.ZipInfo(m.path.rstrip("/") + "/", _date_time(m.mtime))
                    info.external_attr = (0o40755 << 16) | 0x10
                    zf.writestr(info, b"")
                    continue
                info = zipfile.ZipInfo(m.path, _date_time(m.mtime))
                info.external_attr = 0o100644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                with m.blob() as src, zf.open(info, "w", force_zip64=True) as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
        pipe.send()
        out.put(None)
    except _Abandoned:
        pass
    except BaseException as exc:  # handed to the reader, which raises it where the download is served
        out.put(exc)


async def stream_zip(members: list[ZipMember]) -> AsyncIterator[bytes]:
    """The zip's bytes in chunks; an error while making it (a blob gone) raises from the iteration."""
    out: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=_AHEAD)
    stop = threading.Event()
    writer = asyncio.create_task(asyncio.to_thread(_write, members, out, stop))
    try:
        while True:
            item = await asyncio.to_thread(out.get)
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # A client that went away: stop the writer, and drain so it is never left blocked on a full queue.
        stop.set()
        while not writer.done():
            try:
                out.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.01)
        await writer
