"""The front end's cache of answers: bodies held here so the hop carries none, or no hop is made.

An entry is one worker answer (a whole 200 for a plain GET of a static file), keyed by site and
target and stamped with the content version the worker served it from. While the version feed of
every worker of the site is live (roles/frontend/_feed.py) and says that version is the one they
serve, a hit is answered here without asking: a worker announces a new version to its feeds before
it serves it, and the notice drops the entries it replaces. Otherwise the request still goes to the
worker on the lane, saying which version it holds (``X-Sitecloud-Cached``); the worker answers
"still fresh" (a body-less 204 with ``X-Sitecloud-Fresh``) when that version is the one it serves
now, else the whole new answer. Either way a publish is never hidden by the cache.

An app's answer is kept only when the app allows it (:func:`app_lifetime`), for at most its
``max-age``, and only served unasked like a static one: a new version of the site drops it.
"""

from __future__ import annotations

import collections
import time
from email.utils import formatdate

__all__ = [
    "CacheEntry",
    "ResponseCache",
    "app_lifetime",
    "cacheable",
    "http_date_line",
    "without_date",
]

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


def app_lifetime(headers: bytes) -> float:
    """Seconds an app's 200 to a plain GET may be kept (0: not at all): only when it says
    ``Cache-Control: public, max-age=N`` (RFC 9111 5.2.2), sets no cookie, and varies by nothing but
    Accept-Encoding. (The request's side, no Authorization, is the caller's to check.)"""
    lower = b"\r\n" + headers.lower()
    if b"\r\nset-cookie:" in lower:
        return 0.0
    at = lower.find(b"\r\nvary:")
    while at >= 0:
        for token in lower[at + 7 : lower.find(b"\r\n", at + 2)].split(b","):
            if token.strip() not in (b"accept-encoding", b""):
                return 0.0
        at = lower.find(b"\r\nvary:", at + 2)
    public, age = False, 0
    at = lower.find(b"\r\ncache-control:")
    while at >= 0:
        for token in lower[at + 16 : lower.find(b"\r\n", at + 2)].split(b","):
            name, _, value = token.strip().partition(b"=")
            if name == b"public":
                public = True
            elif name == b"max-age" and value.strip(b'"').isdigit():
                age = int(value.strip(b'"'))
            elif name in (b"private", b"no-store", b"no-cache", b"s-maxage", b"must-revalidate"):
                return 0.0
        at = lower.find(b"\r\ncache-control:", at + 2)
    return float(age) if public and age > 0 else 0.0


class CacheEntry:
    """One answer: its status line and headers (no Date, no Connection), its body, and the content
    version it came from. An app's answer also has when it expires (loop time; 0 for a file's, which
    lasts as long as its version) and the Accept-Encoding it was asked with when it varies by it."""

    __slots__ = ("body", "encoding", "expires", "head", "version")

    def __init__(
        self, version: bytes, head: bytes, body: bytes, *, expires: float = 0.0, encoding: bytes | None = None
    ) -> None:
        self.version = version
        self.head = head
        self.body = body
        self.expires = expires
        self.encoding = encoding


class ResponseCache:
    """Entries by (site, target), least recently used dropped first past ``max_bytes``."""

    def __init__(self, max_bytes: int, max_entry: int) -> None:
        self.max_bytes = max_bytes
        self.max_entry = min(max_entry, max_bytes)
        self._bytes = 0
        self._entries: collections.OrderedDict[tuple[str, bytes], CacheEntry] = collections.OrderedDict()
        # The targets held per site, so a new version drops a site's entries without a scan.
        self._by_site: dict[str, set[bytes]] = {}
        self.hits = 0
        self.held_hits = 0  # of the hits, those sent without asking the worker
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
        self._by_site.setdefault(site, set()).add(target)
        self._bytes += size
        self.fills += 1
        while self._bytes > self.max_bytes:
            (gone, target), dropped = self._entries.popitem(last=False)
            self._bytes -= len(dropped.body) + len(dropped.head)
            self._forget(gone, target)
        return True

    def drop(self, site: str, target: bytes) -> None:
        old = self._entries.pop((site, target), None)
        if old is not None:
            self._bytes -= len(old.body) + len(old.head)
            self._forget(site, target)

    def _forget(self, site: str, target: bytes) -> None:
        targets = self._by_site.get(site)
        if targets is not None:
            targets.discard(target)
            if not targets:
                del self._by_site[site]

    def drop_site(self, site: str, keep: bytes = b"") -> None:
        """The site serves version ``keep`` now: every entry of another version goes (an app's too)."""
        for target in list(self._by_site.get(site, ())):
            entry = self._entries.get((site, target))
            if entry is not None and (not keep or entry.version != keep or entry.expires):
                self.drop(site, target)

    def drop_sites(self, keep: set[str]) -> None:
        """A new routing table: entries of sites no longer in it go."""
        for site in [s for s in self._by_site if s not in keep]:
            self.drop_site(site)
