"""The front end's cache of answers: bodies held here so the hop carries none, or no hop is made.

An entry is one worker answer (a whole 200 for a plain GET of a static file), keyed by site and
the request's scheme, Host and target, and stamped with the content version the worker served it from. While the version feed of
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
import gzip
import time
from email.utils import formatdate

__all__ = [
    "COMPRESS_MIN",
    "CacheEntry",
    "ResponseCache",
    "accepts_gzip",
    "app_lifetime",
    "cacheable",
    "compressible",
    "gzip_form",
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


# Content types worth compressing (text and text-like; images, fonts and archives but SVG, ICO, TTF and
# OTF are compressed already), and the smallest body worth it (a gzip header and trailer are 18 bytes).
_COMPRESSIBLE = (
    b"text/", b"application/javascript", b"application/json", b"application/xml", b"image/svg+xml",
    b"application/wasm", b"application/manifest+json", b"application/ld+json", b"application/rss+xml",
    b"application/atom+xml", b"image/x-icon", b"image/vnd.microsoft.icon", b"font/ttf", b"font/otf",
)  # fmt: skip
COMPRESS_MIN = 1024
GZIP_LEVEL = 6
_ACCEPTS: dict[bytes, bool] = {}


def compressible(head: bytes, size: int) -> bool:
    """Whether a file's 200 (its status line and header lines) is worth a gzip form."""
    if size < COMPRESS_MIN:
        return False
    lower = head.lower()
    if b"\r\ncontent-encoding:" in lower:
        return False
    at = lower.find(b"\r\ncontent-type:")
    if at < 0:
        return False
    return lower[at + 15 : lower.find(b"\r\n", at + 2)].strip().startswith(_COMPRESSIBLE)


def accepts_gzip(value: bytes) -> bool:
    """Whether an Accept-Encoding value takes gzip (RFC 9110 12.5.3: ``gzip;q=0`` and ``*;q=0``
    refuse it); remembered per value, as browsers send the same few."""
    found = _ACCEPTS.get(value)
    if found is None:
        found = False
        for token in value.lower().split(b","):
            name, _, params = token.partition(b";")
            name = name.strip()
            if name not in (b"gzip", b"x-gzip", b"*"):
                continue
            q = params.strip().removeprefix(b"q=").strip() if params.strip().startswith(b"q=") else b"1"
            try:
                found = float(q) > 0
            except ValueError:
                found = False
            if name != b"*":
                break
        if len(_ACCEPTS) > 256:
            _ACCEPTS.clear()
        _ACCEPTS[value] = found
    return found


def gzip_form(head: bytes, body: bytes) -> tuple[bytes, bytes]:
    """``head`` and ``body`` gzipped (blocking: run off the loop): its length, a weak ETag (the same
    file, another form: a revalidation with it still matches, as nginx does), Content-Encoding."""
    packed = gzip.compress(body, GZIP_LEVEL, mtime=0)
    lines = []
    for line in head.split(b"\r\n"):
        lower = line.lower()
        if lower.startswith(b"content-length:"):
            line = b"Content-Length: %d" % len(packed)
        elif lower.startswith(b"etag:") and not line[5:].strip().startswith(b"W/"):
            line = b"ETag: W/" + line[5:].strip()
        elif lower.startswith(b"accept-ranges:") or not line:
            continue  # ranges are of the file as it is; the gzip form is served whole
        lines.append(line)
    return b"".join(line + b"\r\n" for line in lines) + b"Content-Encoding: gzip\r\n", packed


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

    __slots__ = ("body", "compressible", "compressing", "encoding", "expires", "gzip", "head", "version")

    def __init__(
        self, version: bytes, head: bytes, body: bytes, *, expires: float = 0.0, encoding: bytes | None = None
    ) -> None:
        self.version = version
        self.head = head
        self.body = body
        self.expires = expires
        self.encoding = encoding
        # A file's answer worth compressing (see compressible); its gzip form (head, body) once made.
        self.compressible = False
        self.compressing = False
        self.gzip: tuple[bytes, bytes] | None = None

    @property
    def size(self) -> int:
        gz = self.gzip
        return len(self.head) + len(self.body) + (len(gz[0]) + len(gz[1]) if gz is not None else 0)


class ResponseCache:
    """Entries by (site, key), least recently used dropped first past ``max_bytes``: the key is the
    request's scheme, Host as sent and target (the caller's ``Request.cache_key``)."""

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
        key = (site, target)
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        self._entries[key] = entry
        self._by_site.setdefault(site, set()).add(target)
        self._bytes += entry.size
        self.fills += 1
        self._trim()
        return True

    def add_gzip(self, site: str, target: bytes, entry: CacheEntry, head: bytes, body: bytes) -> None:
        """The gzip form of ``entry``, made off the loop; dropped if the entry went meanwhile."""
        entry.compressing = False
        if self._entries.get((site, target)) is not entry:
            return
        entry.gzip = (head, body)
        self._bytes += len(head) + len(body)
        self._trim()

    def _trim(self) -> None:
        while self._bytes > self.max_bytes:
            (gone, target), dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.size
            self._forget(gone, target)

    def drop(self, site: str, target: bytes) -> None:
        old = self._entries.pop((site, target), None)
        if old is not None:
            self._bytes -= old.size
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
