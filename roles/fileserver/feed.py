"""The change feed workers long-poll: every new site version gets the next ``seq``.

``seq`` survives restarts (``<home>/state/feed.json``). The log of recent changes lives in memory only,
so a cursor older than what the log holds gets ``reset`` (re-read every site's version), and so does a
cursor from the future, which can only come from another incarnation of the fileserver. The file holds
a ceiling: seqs are handed out in blocks, and the ceiling is written once per block, not per change.
After a crash ``seq`` starts one past the ceiling, so every cursor of the last incarnation is older than
the log and gets a reset: no worker can believe it is up to date across a change it was never told of.
After a clean stop the exact seq is written and cursors stay valid.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from pathlib import Path
from typing import Any

from shared.contracts.content import ChangeEvent, ChangeFeedPage
from shared.files import atomic_write_json, read_json

__all__ = ["MAX_WAIT", "ChangeFeed"]

MAX_WAIT = 30.0
_BLOCK = 4096


class ChangeFeed:
    def __init__(self, path: Path, *, keep: int = 10_000) -> None:
        self._path = path
        self._log: deque[ChangeEvent] = deque(maxlen=keep)
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._closed = False
        self.seq = 0
        # Cursors below this point are older than the log: they get a reset.
        self._floor = 0
        self._ceiling = 0

    def open(self) -> None:
        """Read the persisted seq (blocking; call once at start)."""
        state: dict[str, Any] = read_json(self._path) if self._path.exists() else {"seq": 0, "clean": True}
        seq = int(state.get("seq", 0))
        self.seq = seq if state.get("clean") else seq + 1
        self._floor = self.seq
        self._ceiling = self.seq + _BLOCK
        atomic_write_json(self._path, {"seq": self._ceiling, "clean": False})

    def stop_waiting(self) -> None:
        """Answer every long poll now, and later ones at once (the process is stopping)."""
        self._closed = True
        self._wakeup.set()

    async def close(self) -> None:
        """Record a clean stop, so that cursors stay valid over the restart (call when nothing writes)."""
        self.stop_waiting()
        async with self._lock:
            await asyncio.to_thread(atomic_write_json, self._path, {"seq": self.seq, "clean": True})

    async def publish(self, site: str, version: int) -> ChangeEvent:
        """Announce a version that is already on disk; returns the change with its seq."""
        async with self._lock:
            seq = self.seq + 1
            if seq > self._ceiling:
                self._ceiling = seq + _BLOCK
                await asyncio.to_thread(atomic_write_json, self._path, {"seq": self._ceiling, "clean": False})
            if len(self._log) == self._log.maxlen:
                self._floor = self._log[0]["seq"]
            change: ChangeEvent = {"seq": seq, "site": site, "version": version}
            self._log.append(change)
            self.seq = seq
            wakeup, self._wakeup = self._wakeup, asyncio.Event()
            wakeup.set()
            return change

    def since(self, since: int) -> tuple[list[ChangeEvent], bool]:
        """The changes after ``since``, and whether the caller must reset instead."""
        if since < self._floor or since > self.seq:
            return [], True
        # From the newest back (seqs in the log are consecutive): a poll costs what it is told, not
        # the log's length (a whole-log scan per poll was a sixth of the fileserver's CPU in a mirror).
        news: list[ChangeEvent] = []
        for change in reversed(self._log):
            if change["seq"] <= since:
                break
            news.append(change)
        news.reverse()
        return news, False

    async def wait(self, since: int, timeout: float) -> ChangeFeedPage:
        """The answer to ``GET /v1/changes``: at once if there is news, else after a change or ``timeout``."""
        changes, reset = self.since(since)
        if not changes and not reset and not self._closed and timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), min(timeout, MAX_WAIT))
            changes, reset = self.since(since)
        return ChangeFeedPage(seq=self.seq, changes=changes, reset=reset)
