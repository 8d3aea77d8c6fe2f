"""A site's write-ahead journal: a change is durable once its record is on disk.

Records are appended to ``<site>/journal`` as ``length (4 bytes) | crc32 (4 bytes) | payload``; the
payload is a JSON header, a newline, and optionally the bytes of a small blob the change put, so one
fsync makes both the file and its place in the tree durable. Group commit: every record appended while
an fsync runs waits for the next one, and they all share it. While the disk syncs fast, the fsync runs
on the loop, after the callbacks already due (whose records it then covers too): a hop to a thread and
back costs more than such a sync (76 against 93 µs on a quiet disk here). A slow disk sends it back to
a thread, so a busy disk never holds the loop.

Offsets are logical (they keep growing when the journal is compacted), so a waiter's offset stays
meaningful across a compaction.

The file is grown ahead in zero-filled extents, each made durable once, and records are written into
them: an fsync then flushes data alone, with no change of the file's size or block map to commit,
which costs about a third of an fsync after an append on ext4. A zero length ends the records.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.files import fsync_dir

__all__ = ["Journal", "Record", "read_records", "truncate"]

_HEAD = struct.Struct(">II")
# A record larger than this is not one we wrote: a torn or corrupt tail.
_MAX_RECORD = 256 * 1024 * 1024
# The journal grows by at least this much of zeros at a time.
_EXTENT = 4 * 1024 * 1024
# An fsync runs on the loop while the recent ones took less than this on average, and it has at most
# _INLINE_SYNC_BYTES to flush (a deploy's record, or a small file's bytes near 1 MB, go to a thread).
_INLINE_SYNC_S = 0.0005
_INLINE_SYNC_BYTES = 64 * 1024


class Record:
    __slots__ = ("data", "header")

    def __init__(self, header: dict[str, Any], data: bytes = b"") -> None:
        self.header = header
        self.data = data

    def encode(self) -> bytes:
        payload = json.dumps(self.header, separators=(",", ":")).encode() + b"\n" + self.data
        return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def read_records(raw: bytes) -> Iterator[tuple[Record, int]]:
    """Whole records and the offset just past each; stops at the first torn or corrupt one."""
    at = 0
    while at + _HEAD.size <= len(raw):
        length, crc = _HEAD.unpack_from(raw, at)
        start, end = at + _HEAD.size, at + _HEAD.size + length
        if length == 0 or length > _MAX_RECORD or end > len(raw):
            return
        payload = raw[start:end]
        if zlib.crc32(payload) != crc:
            return
        head, _, data = payload.partition(b"\n")
        try:
            header = json.loads(head)
        except ValueError:
            return
        if not isinstance(header, dict):
            return
        yield Record(header, data), end
        at = end


class Journal:
    """Appends happen on the event loop (one writer per site, under the site's lock); fsyncs in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._base = 0  # logical offset of the file's first byte
        self._capacity = 0  # bytes of the file, zeros past the last record
        self.written = 0
        self._synced = 0
        self._flush: asyncio.Future[None] | None = None
        # Recent fdatasync durations, averaged; starts slow, so the first sync tells.
        self._sync_s = _INLINE_SYNC_S

    def open(self) -> bytes:
        """Open for appending (blocking); returns what the journal holds, for replay. A torn tail is cut."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        raw = self.path.read_bytes() if self.path.exists() else b""
        good = 0
        for _, end in read_records(raw):
            good = end
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        self._capacity = len(raw)
        torn = len(raw[good:].rstrip(b"\0"))
        if torn:
            # What a crash left half written goes, so a later record can never run into it.
            os.pwrite(self._fd, bytes(torn), good)
            os.fsync(self._fd)
        self._base = 0
        self.written = self._synced = good
        return raw[:good]

    def _grow(self, needed: int) -> None:
        """Make room for ``needed`` more bytes: zeros written and made durable, once per extent."""
        end = self.written - self._base
        if end + needed <= self._capacity:
            return
        more = max(_EXTENT, end + needed - self._capacity)
        os.pwrite(self._fd, bytes(more), self._capacity)
        os.fsync(self._fd)
        self._capacity += more

    def close(self, *, release: bool = False) -> None:
        """Close the file; ``release`` (nothing unfolded in it) also gives its zero extents back."""
        if self._fd >= 0:
            if release and self.size == 0:
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = -1

    @property
    def size(self) -> int:
        return self.written - self._base

    def append(self, record: Record) -> int:
        """Write a record (not yet durable); returns the offset :meth:`sync` must reach for it."""
        data = record.encode()
        self._grow(len(data))
        view = memoryview(data)
        at = self.written - self._base
        while view:
            done = os.pwrite(self._fd, view, at)
            view, at = view[done:], at + done
        self.written += len(data)
        return self.written

    async def sync(self, upto: int) -> None:
        """Return once everything up to ``upto`` is on disk; concurrent callers share one fsync."""
        while self._synced < upto:
            if self._flush is None:
                self._flush = asyncio.ensure_future(self._fsync())
            await asyncio.shield(self._flush)

    async def _fsync(self) -> None:
        try:
            # A task's first step runs after the callbacks already due: their records are in.
            target = self.written
            small = target - self._synced <= _INLINE_SYNC_BYTES
            if small and self._sync_s < _INLINE_SYNC_S:
                took = _timed_fdatasync(self._fd)
            else:
                # run_in_executor, not to_thread: nothing here needs the caller's context copied.
                took = await asyncio.get_running_loop().run_in_executor(None, _timed_fdatasync, self._fd)
            if small:  # (a big flush's time says nothing of the small ones this decides)
                self._sync_s = 0.8 * self._sync_s + 0.2 * took
            self._synced = max(self._synced, target)
        finally:
            self._flush = None

    async def compact(self, upto: int) -> None:
        """Drop the records before ``upto`` (their changes are durable elsewhere now).

        The caller holds the site's lock, so nothing is appended meanwhile.
        """
        while self._flush is not None:
            await asyncio.shield(self._flush)
        # Held as the flush: a sync meanwhile waits for it (the rewrite leaves all synced, on a new fd).
        self._flush = asyncio.ensure_future(self._rewrite_in_thread(upto))
        await asyncio.shield(self._flush)

    async def _rewrite_in_thread(self, upto: int) -> None:
        try:
            await asyncio.to_thread(self._rewrite, upto)
        finally:
            self._flush = None

    def _rewrite(self, upto: int) -> None:
        keep = upto - self._base
        with open(self.path, "rb") as f:
            f.seek(keep)
            tail = f.read(self.written - upto)
        capacity = max(_EXTENT, len(tail) + _EXTENT)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(tail)
            f.write(bytes(capacity - len(tail)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY)
        self._base = upto
        self._capacity = capacity
        self._synced = self.written


def _timed_fdatasync(fd: int) -> float:
    started = time.perf_counter()
    os.fdatasync(fd)
    return time.perf_counter() - started


def truncate(path: Path) -> None:
    """Empty a journal whose records are all in a checkpoint now (blocking)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
