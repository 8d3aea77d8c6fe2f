"""The publisher's own copies of big files, by sha256: a download of one goes out with sendfile(2) from
local disk instead of being fetched again from the fileserver over mTLS and relayed.

A copy is filled while the bytes pass through anyway (a big upload on its way to the fileserver, a big
download on its way to the client) and kept, by rename, only when it is whole and the fileserver named
that sha256 for exactly those bytes. Copies are addressed by content, so one is never stale; the least
recently used go once the cache passes its size, or while the disk is nearly full (``shared.disk``):
on one box the fileserver's content is on the same disk, and a copy is only a shortcut. The directory is the publisher's alone and is emptied
at start (a copy renamed just before a crash may not have reached the disk whole).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import IO

from shared.direct import DirectWriter
from shared.disk import disk_space
from shared.logs import ContextLogger

__all__ = ["BlobCache", "CacheFill"]

# A copy being written looks at the disk's free space again after this many bytes.
_ROOM_CHECK_BYTES = 16 * 1024 * 1024


class BlobCache:
    """Copies of blobs under ``directory``, at most ``max_bytes`` in all (0: keep none)."""

    def __init__(self, directory: Path, max_bytes: int, log: ContextLogger) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._log = log
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # oldest use first
        self._total = 0
        self.hits = 0
        shutil.rmtree(directory, ignore_errors=True)
        if max_bytes > 0:
            directory.mkdir(parents=True, mode=0o700)

    @property
    def total_bytes(self) -> int:
        return self._total

    def open(self, sha: str, size: int) -> IO[bytes] | None:
        """The copy of blob ``sha`` (of ``size`` bytes) opened for reading, or None."""
        with self._lock:
            if self._sizes.get(sha) != size:
                return None
            self._sizes.move_to_end(sha)
        try:
            # Opened after the lookup: an eviction in between is a miss, not an error.
            copy = open(self.directory / sha, "rb")  # noqa: SIM115  # the download closes it
        except FileNotFoundError:
            return None
        # Written around the page cache, a copy is read from the disk the first time: read ahead
        # in bigger steps for the download that goes through it from start to end.
        os.posix_fadvise(copy.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        with self._lock:
            self.hits += 1
        return copy

    def fill(self) -> CacheFill | None:
        """A copy to write a blob's bytes into, in order; None when the cache keeps nothing."""
        if self.max_bytes <= 0 or not self._room():
            return None
        try:
            return CacheFill(self)
        except OSError as err:
            self._log.warning("no cache copy: %s", err)
            return None

    def _room(self, reserve: int = 0) -> bool:
        """Whether the disk has room for copies (and ``reserve`` bytes more), after dropping the oldest
        ones if need be: they are only a shortcut, and on a disk shared with the fileserver its content
        comes first."""
        while True:
            space = disk_space(self.directory)
            if space.free - reserve >= space.floor:
                return True
            with self._lock:
                if not self._sizes:
                    return False
                old, old_size = self._sizes.popitem(last=False)
                self._total -= old_size
            (self.directory / old).unlink(missing_ok=True)

    def _keep(self, temp: Path, sha: str, size: int) -> None:
        if size > self.max_bytes or not self._room():
            temp.unlink(missing_ok=True)
            return
        with self._lock:
            if sha in self._sizes:
                temp.unlink(missing_ok=True)
                self._sizes.move_to_end(sha)
                return
            os.replace(temp, self.directory / sha)
            self._sizes[sha] = size
            self._total += size
            while self._total > self.max_bytes:
                old, old_size = self._sizes.popitem(last=False)
                self._total -= old_size
                # A download still reading the old copy keeps its open file.
                (self.directory / old).unlink(missing_ok=True)


class CacheFill:
    """One blob's copy being written; :meth:`keep` files it under its sha256, :meth:`drop` throws it
    away. A failed write (a full disk) only means no copy: the transfer goes on.

    Written in the transfer's own thread, a big one around the page cache (:mod:`shared.direct`): a
    buffered copy cost the publisher more CPU than relaying the bytes to the fileserver over TLS. Each
    block is read back into the page cache behind its write (by the disk, not the CPU), so a download
    soon after goes out of memory as it would after a buffered write.
    """

    def __init__(self, cache: BlobCache) -> None:
        self._cache = cache
        fd, name = tempfile.mkstemp(dir=cache.directory, prefix=".fill-")
        self._path = Path(name)
        self._fd = fd
        self._writer: DirectWriter | None = DirectWriter(fd, read_back=True)
        self._unchecked = 0  # bytes written since the disk's space was last looked at

    @property
    def size(self) -> int:
        return self._writer.size if self._writer is not None else 0

    def write(self, data: bytes) -> None:
        if self._writer is None:
            return
        try:
            self._writer.write(data)
        except OSError as err:
            self._cache._log.warning("cache copy given up: %s", err)
            self.drop()
            return
        self._unchecked += len(data)
        if self._unchecked >= _ROOM_CHECK_BYTES:
            self._unchecked = 0
            # An upload's copy runs ahead of the fileserver's: on a shared disk, the fileserver still
            # needs about as many bytes as the copy holds.
            if not self._cache._room(reserve=self.size):
                self._cache._log.warning("cache copy given up: the disk is nearly full")
                self.drop()

    def keep(self, sha: str, size: int) -> None:
        """File the copy as blob ``sha``, if all ``size`` bytes of it were written."""
        if self._writer is None:
            return
        try:
            self._writer.finish()
            written, self._writer = self._writer.size, None
            self._close()
            if written == size:
                self._cache._keep(self._path, sha, size)
        except OSError as err:
            self._cache._log.warning("cache copy not kept: %s", err)
        finally:
            self.drop()

    def drop(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._close()
        self._path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
