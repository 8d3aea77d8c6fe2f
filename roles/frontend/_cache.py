"""The front end's cache of static answers: bodies held here so the hop carries none.

An entry is one worker answer (a whole 200 for a plain GET of a static file), keyed by site and
target and stamped with the content version the worker served it from. It is never served on its
own word: each request still goes to the worker on the lane, saying which version it holds
(``X-Sitecloud-Cached``); the worker answers "still fresh" (a body-less 204 with
``X-Sitecloud-Fresh``) when that version is the one it serves now, else the whole new answer. So a
publish is never hidden by the cache, the site's access log and counts stay the worker's, and what
the cache saves is the body: sending, encrypting and reading it again on every hit.
"""

from __future__ import annotations

import collections
import time
from email.utils import formatdate

__all__ = ["CacheEntry", "ResponseCache", "cacheable", "http_date_line", "without_date"]

_last_date: list[object] = [0, b""]


def http_date_line() -> bytes:
    """``Date: <IMF-fixdate>\\r\\n`` for now, made once a second."""
    now = int(time.time())
    if _last_date[0] != now:
        _last_date[:] = [now, b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"]
    line = _last_date[1]
    assert isinstance(line, bytes)
    return line


def without_date(headers: bytes) -> bytes:
    """Header lines (each ending in CRLF) without their Date line: each hit gets a fresh one."""
    lower = headers.lower()
    at = 0 if lower.startswith(b"date:") else lower.find(b"\r\ndate:")
    if at < 0:
        return headers
    start = at if at == 0 else at + 2
    end = headers.find(b"\r\n", start) + 2
    return headers[:start] + headers[end:]


def cacheable(headers: bytes) -> bool:
    """Whether an answer with these header lines may be kept for other visitors: never one that sets
    a cookie, nor one its origin marks private or not to be stored (RFC 9111 5.2.2)."""
    lower = b"\r\n" + headers.lower()
    if b"\r\nset-cookie:" in lower or b"\r\nvary:" in lower:
        return False
    at = lower.find(b"\r\ncache-control:")
    while at >= 0:
        value = lower[at + 16 : lower.find(b"\r\n", at + 2)]
        if b"private" in value or b"no-store" in value or b"no-cache" in value:
            return False
        at = lower.find(b"\r\ncache-control:", at + 2)
    return True


class CacheEntry:
    """One answer: its status line and headers (no Date, no Connection), its body, and the content
    version it came from."""

    __slots__ = ("body", "head", "version")

    def __init__(self, version: bytes, head: bytes, body: bytes) -> None:
        self.version = version
        self.head = head
        self.body = body


class ResponseCache:
    """Entries by (site, target), least recently used dropped first past ``max_bytes``."""

    def __init__(self, max_bytes: int, max_entry: int) -> None:
        self.max_bytes = max_bytes
        self.max_entry = min(max_entry, max_bytes)
        self._bytes = 0
        self._entries: collections.OrderedDict[tuple[str, bytes], CacheEntry] = collections.OrderedDict()
        self.hits = 0
        self.fills = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        return self._bytes

    def get(self, site: str, target: bytes) -> CacheEntry | None:
        key = (site, target)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, site: str, target: bytes, entry: CacheEntry) -> bool:
        """Keep ``entry``; False when its body is larger than an entry may be."""
        if len(entry.body) > self.max_entry:
            return False
        size = len(entry.body) + len(entry.head)
        key = (site, target)
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old.body) + len(old.head)
        self._entries[key] = entry
        self._bytes += size
        self.fills += 1
        while self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= len(dropped.body) + len(dropped.head)
        return True

    def drop(self, site: str, target: bytes) -> None:
        old = self._entries.pop((site, target), None)
        if old is not None:
            self._bytes -= len(old.body) + len(old.head)

    def drop_sites(self, keep: set[str]) -> None:
        """A new routing table: entries of sites no longer in it go."""
        for key in [k for k in self._entries if k[0] not in keep]:
            self.drop(*key)
