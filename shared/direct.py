"""Big files written around the page cache (``O_DIRECT``), in aligned blocks from writer threads.

Why: on the VMs this runs on, a buffered write of a big upload costs more CPU than anything else
done with it: the kernel copies every byte into page-cache pages it must first allocate and zero,
and writes them back later. A file that is fsynced anyway gains nothing from the page cache. A
direct write costs almost no CPU while the disk takes the block, and it goes on in a thread while
the caller hashes the next one. A small file (under one block) is written the ordinary way, once.

Filesystems without ``O_DIRECT`` (tmpfs, some FUSE ones) get the same blocks written buffered.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

__all__ = ["BLOCK", "DirectWriter"]

# One write to the disk. A multiple of every logical block size in use (512 and 4096 bytes).
BLOCK = 4 * 1024 * 1024
_ALIGN = 4096
# Blocks of one file handed to its writer thread at once; one more is being filled meanwhile.
_IN_FLIGHT = 2


def _set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd``; False where the filesystem does not offer it."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    wanted = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, wanted)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return False
        raise
    return on


def _pwrite_all(fd: int, block: mmap.mmap, length: int, offset: int, read_back: bool = False) -> None:
    with memoryview(block) as whole:
        done = 0
        while done < length:
            with whole[done:length] as rest:
                try:
                    wrote = os.pwrite(fd, rest, offset + done)
                except OSError as err:
                    # A device whose blocks are bigger than our alignment: write it buffered.
                    if err.errno != errno.EINVAL or not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                        raise
                    _set_direct(fd, False)
                    wrote = os.pwrite(fd, rest, offset + done)
            if wrote <= 0:
                raise OSError(errno.EIO, f"short write at byte {offset + done}")
            done += wrote
    if read_back:
        # Read ahead by the disk into the page cache: pages filled by DMA, no copy by the CPU.
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


class DirectWriter:
    """Writes the file open at ``fd`` (from its start, in order) and owns nothing but the buffers.

    Until a block's worth has come the bytes are only held (no copy); past it they are copied into
    page-aligned blocks that writer threads put on the disk directly. A failed write is raised by a
    later :meth:`write` or by :meth:`finish`.
    """

    def __init__(self, fd: int, *, read_back: bool = False) -> None:
        self._fd = fd
        # Whether what goes around the page cache is read back into it after (for a copy kept to be
        # read soon, not for a file kept to be durable).
        self._read_back = read_back
        self._held: list[bytes | memoryview] | None = []
        self._held_bytes = 0
        self._block: mmap.mmap | None = None
        self._used = 0
        self._offset = 0  # where the block being filled starts in the file
        self._spare: list[mmap.mmap] = []
        self._pending: deque[tuple[Future[None], mmap.mmap]] = deque()
        # A thread of the file's own, started at its first block (only big files have one).
        self._writer: ThreadPoolExecutor | None = None
        self.direct = False
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self._held is not None:
            self._held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes < BLOCK:
                return
            held, self._held = self._held, None
            self.direct = _set_direct(self._fd, True)
            for part in held:
                self._copy(part)
            return
        self._copy(data)

    def finish(self) -> None:
        """Write what is left and wait for every block to be written (no fsync)."""
        if self._held is not None:
            offset = 0
            for part in self._held:
                _pwrite_all_bytes(self._fd, part, offset)
                offset += len(part)
            self._held = None
            return
        try:
            self._drain(0)
            if self._block is not None and self._used:
                aligned = self._used - self._used % _ALIGN
                if aligned:
                    read_back = self._read_back and self.direct
                    _pwrite_all(self._fd, self._block, aligned, self._offset, read_back)
                if aligned < self._used:
                    if self.direct:
                        self.direct = _set_direct(self._fd, False)
                    tail = self._block[aligned : self._used]
                    _pwrite_all_bytes(self._fd, tail, self._offset + aligned)
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop: wait for the blocks already handed to the disk, drop the rest."""
        self._held = None
        while self._pending:
            future, block = self._pending.popleft()
            with contextlib.suppress(Exception):
                future.result()
            self._spare.append(block)
        self._release()

    def _copy(self, data: bytes | memoryview) -> None:
        with memoryview(data) as view:
            at = 0
            while at < len(view):
                if self._block is None:
                    self._block = self._spare.pop() if self._spare else mmap.mmap(-1, BLOCK)
                take = min(len(view) - at, BLOCK - self._used)
                self._block[self._used : self._used + take] = view[at : at + take]
                self._used += take
                at += take
                if self._used == BLOCK:
                    self._submit()

    def _submit(self) -> None:
        assert self._block is not None
        block, self._block = self._block, None
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct-write")
        future = self._writer.submit(
            _pwrite_all, self._fd, block, self._used, self._offset, self._read_back and self.direct
        )
        self._pending.append((future, block))
        self._offset += self._used
        self._used = 0
        self._drain(_IN_FLIGHT)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            future, block = self._pending.popleft()
            self._spare.append(block)
            future.result()

    def _release(self) -> None:
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        for block in self._spare:
            block.close()
        self._spare.clear()
        if self._block is not None:
            self._block.close()
            self._block = None


def _pwrite_all_bytes(fd: int, data: bytes | memoryview, offset: int) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            with view[done:] as rest:
                done += os.pwrite(fd, rest, offset + done)
