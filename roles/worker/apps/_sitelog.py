"""One site's app log: its processes' stdout/stderr, the worker's lines about it, its access lines.

A bounded file rotated once (``app.log`` → ``app.log.1``), so a site keeps at most twice the bound;
followers (``site logs --follow``) get each new line as it is written. Access lines come with every
request, so they are held briefly and written in batches (as nginx buffers its access log): one
write a batch rather than an open, write and close a request.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from roles.worker._access import AccessRecord

__all__ = ["SiteLog"]

MAX_FOLLOW_QUEUE = 1000
# Held access lines go to disk after this long, or once this many bytes are held.
_HOLD_SECONDS = 0.5
_HOLD_BYTES = 64 * 1024
# About what an access line takes besides its target, for the held-bytes bound.
_RECORD_BYTES = 160

# How much of an app's last line is kept for its status (site show).
_LAST_LINE_CHARS = 300
# Node's report of an uncaught exception ends with its version, after the error line and its stack
# (and the error's own fields, in braces): the error line says why, as far back as a deep stack goes.
_NODE_VERSION = re.compile(r"^Node\.js v\d+\.\d+\.\d+$")
_JS_ERROR = re.compile(r"^(?:[A-Z][A-Za-z]*)?Error(?: \[[A-Z0-9_]+\])?: \S")
_RECENT_LINES = 100


# A line's time stamp ("2026-12-05T06:40:20Z"): lines compare by it as text.
_STAMP_CHARS = 20


def _telling_line(lines: Iterable[str]) -> str:
    """Of an app's last lines (the last one last), the one that says why it stopped: the last, but for
    Node's report of an uncaught exception, whose last line is only Node's version."""
    recent = list(lines)
    last = recent[-1] if recent else ""
    if _NODE_VERSION.match(last):
        return next((line for line in reversed(recent) if _JS_ERROR.match(line)), last)
    return last


class SiteLog:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self._max = max_bytes
        self._followers: set[asyncio.Queue[str | None]] = set()
        self._held: list[str | tuple[str, AccessRecord]] = []
        self._held_bytes = 0
        self._flush_at: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""
        # The app's own last line (its stderr, stdout): most often why it exited.
        self.last_app_line = ""
        self.last_app_at = 0.0
        self._recent: collections.deque[str] = collections.deque(maxlen=_RECENT_LINES)

    def _now(self, at: int | None = None) -> str:
        second = int(time.time()) if at is None else at
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        return self._stamp

    def write(self, source: str, text: str) -> None:
        """Append lines (``source`` is app, worker or access); a write error never reaches a request."""
        stamp = self._now()
        lines = [f"{stamp} [{source}] {line}" for line in text.rstrip("\n").split("\n")]
        if source == "app":
            said = [line.strip() for line in text.split("\n") if line.strip()]
            if said:
                self._recent.extend(said)
                self.last_app_line = _telling_line(self._recent)[:_LAST_LINE_CHARS]
                self.last_app_at = time.monotonic()
        self.flush()
        self._append(("\n".join(lines) + "\n").encode("utf-8", "replace"))
        self._tell(lines)

    def access(self, text: str | AccessRecord, *, at: int | None = None) -> None:
        """One access line, written with the next batch; followers get it at once. A record is
        formatted only then (with its batch, or at once for followers), off the request's own path.
        ``at``: the second the request ended, when that was elsewhere (a serving process)."""
        stamp = self._now(at)
        if isinstance(text, AccessRecord):
            self._held.append((stamp, text))
            self._held_bytes += _RECORD_BYTES + len(text.target)
            if self._followers:
                self._tell((f"{stamp} [access] {text.line()}",))
        else:
            line = f"{stamp} [access] {text}"
            self._held.append(line)
            self._held_bytes += len(line) + 1
            if self._followers:
                self._tell((line,))
        if self._held_bytes > _HOLD_BYTES:
            self.flush()
        elif self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(_HOLD_SECONDS, self.flush)

    def flush(self) -> None:
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        if self._held:
            held, self._held, self._held_bytes = self._held, [], 0
            lines = [h if isinstance(h, str) else f"{h[0]} [access] {h[1].line()}" for h in held]
            self._append(("\n".join(lines) + "\n").encode("utf-8", "replace"))

    def _tell(self, lines: list[str] | tuple[str, ...]) -> None:
        for queue in list(self._followers):
            for line in lines:
                if queue.qsize() < MAX_FOLLOW_QUEUE:
                    queue.put_nowait(line)

    def _append(self, data: bytes) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size > self._max:
                os.replace(self.path, f"{self.path}.1")
        except OSError:
            pass

    def tail(self, count: int) -> list[str]:
        """The last ``count`` lines (from the rotated file too when the current one is short)."""
        self.flush()
        lines: list[str] = []
        for path in (self.path, Path(f"{self.path}.1")):
            try:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    size = f.tell()
                    f.seek(max(0, size - count * 512))
                    # Lines end at "\n" only: an app's "\r" stays inside its line (splitlines would
                    # start a line of the app's own there, without our stamp and source).
                    chunk = f.read().decode("utf-8", "replace").split("\n")
                    if chunk and not chunk[-1]:
                        chunk.pop()
            except OSError:
                continue
            if size > count * 512:
                chunk = chunk[1:]  # the first line was cut by the seek
            lines = chunk + lines
            if len(lines) >= count:
                break
        return lines[-count:] if count else []

    def follow(self) -> asyncio.Queue[str | None]:
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._followers.add(queue)
        return queue

    def unfollow(self, queue: asyncio.Queue[str | None]) -> None:
        self._followers.discard(queue)

    def hand_over(self, other: SiteLog, *, lines: int = 0) -> None:
        """Followers go on with ``other``: the site turned from static to an app, or back, and its
        lines are written there from now on. With ``lines``, up to that many of this log's last lines
        that are newer than ``other``'s go there too, so `site logs` still shows what came before."""
        self.flush()
        if lines:
            other.flush()
            newest = next(iter(other.tail(1)), "")[:_STAMP_CHARS]
            carried = [line for line in self.tail(lines) if line[:_STAMP_CHARS] > newest]
            if carried:
                other._append(("\n".join(carried) + "\n").encode("utf-8", "replace"))
        other._followers |= self._followers
        self._followers = set()

    def close(self) -> None:
        """End every follower's stream (the site left this worker, or the worker stops)."""
        self.flush()
        for queue in self._followers:
            queue.put_nowait(None)
        self._followers.clear()
