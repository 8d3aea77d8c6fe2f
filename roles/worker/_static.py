"""Static files from one site version: lookup, validators, ranges, streaming.

A version is immutable once built (its directory of hard links to verified blobs, and its index of
small files kept in packs: ``_packs.py``), so what is looked up and cached stays true until the site
flips to another version.
"""

from __future__ import annotations

import collections
import mimetypes
import os
import stat
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import BinaryIO
from urllib.parse import quote

from roles.worker._http import (
    LANE_FILL_MAX,
    LANE_MAX_FILE,
    LANE_REFUSED_REQUEST,
    HttpConnection,
    http_date,
    response_head,
)
from roles.worker._packs import PackedFile, VersionFiles
from roles.worker._source import is_never_served

__all__ = [
    "DEFAULT_DOCUMENTS",
    "WEB_FOLDER",
    "FileHit",
    "HotCache",
    "HotEntry",
    "HotKey",
    "Redirect",
    "inside_web",
    "read_small",
    "resolve",
    "send_file",
    "web_root",
]

DEFAULT_DOCUMENTS = ("index.html", "index.htm", "default.htm")
# Files up to this size are read at once (and may go to the hot cache); larger ones are streamed.
SMALL_FILE = 128 * 1024
# (site, version, the request's path as sent, before any query): resolving it again gives the same file.
HotKey = tuple[str, int, bytes]
_TEXTUAL = frozenset({"application/javascript", "application/json", "application/xml", "image/svg+xml"})


@dataclass(frozen=True, slots=True)
class FileHit:
    path: str
    size: int
    etag: str
    last_modified: str
    mtime: int
    content_type: str
    # Where in ``path`` the file starts when it is kept in a pack (-1: ``path`` is the file).
    offset: int = -1


@dataclass(frozen=True, slots=True)
class Redirect:
    location: str


@lru_cache(maxsize=1024)
def content_type(name: str) -> str:
    guessed, encoding = mimetypes.guess_type(name, strict=False)
    if guessed is None or encoding is not None:
        # A .gz or .br file is served as the bytes it is, not as what it would decode to.
        return "application/octet-stream"
    if guessed.startswith("text/") or guessed in _TEXTUAL:
        return f"{guessed}; charset=utf-8"
    return guessed


def _hit(path: str, st: os.stat_result) -> FileHit:
    return FileHit(
        path=path,
        size=st.st_size,
        etag=f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"',
        last_modified=http_date(st.st_mtime),
        mtime=int(st.st_mtime),
        content_type=content_type(os.path.basename(path)),
    )


def _packed_hit(rel: str, pf: PackedFile) -> FileHit:
    return FileHit(
        path=pf.pack,
        size=pf.size,
        # The content's hash: the same bytes keep their validator across versions (RFC 9110 8.8.3).
        etag=f'"{pf.tag}"',
        last_modified=http_date(pf.mtime),
        mtime=int(pf.mtime),
        content_type=content_type(os.path.basename(rel)),
        offset=pf.offset,
    )


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


# A site published with its framework's layout (Laravel, Symfony, Slim, a generator's output) keeps
# what visitors see in this folder, and the rest (.env, vendor/, storage/) beside it.
WEB_FOLDER = "public"
# Top-level files that say the version's root is what visitors see (or a Python app or Procfile's).
_ROOT_SIGNS = (*DEFAULT_DOCUMENTS, "index.php", "app.py", "wsgi.py", "asgi.py", "manage.py", "Procfile")


def web_root(root: str, packed: VersionFiles | None = None) -> str:
    """The folder of a version that its visitors see as ``/``: ``public`` when the version has no
    home page or app entry at its top but a ``public/index.php`` or ``public/index.html`` (a
    framework's layout published as it is), else "" (the version's own root)."""

    def there(rel: str) -> bool:
        if packed is not None and packed.get(rel) is not None:
            return True
        st = _stat(f"{root}/{rel}")
        return st is not None and stat.S_ISREG(st.st_mode)

    if any(there(name) for name in _ROOT_SIGNS):
        return ""
    if there(f"{WEB_FOLDER}/index.php") or there(f"{WEB_FOLDER}/index.html"):
        return WEB_FOLDER
    return ""


def inside_web(web: str, rel: str) -> str:
    """A visitor's path ``rel`` as a path in the version, whose web root is ``web``."""
    if not web:
        return rel
    return f"{web}/{rel}" if rel else web


def resolve(
    root: str, rel: str, *, slash: bool, packed: VersionFiles | None = None, web: str = ""
) -> FileHit | Redirect | None:
    """What ``rel`` (already through :func:`shared.paths.site_relpath`) names in the version ``root``
    (whose small files may be in packs, listed by ``packed``), seen from its web root ``web``
    (:func:`web_root`).

    A directory is served by its first default document; asked for without its trailing slash, it
    redirects to the slash form so relative links in the page resolve. ``None`` means not found,
    which is also the answer for a site's source (:func:`is_never_served`): its existence is not told.
    """
    if is_never_served(rel):
        return None
    inner = inside_web(web, rel)
    pf = None if packed is None or not inner else packed.get(inner)
    if pf is not None:
        return None if slash else _packed_hit(inner, pf)
    full = f"{root}/{inner}" if inner else root
    st = _stat(full)
    if st is None:
        return None
    if stat.S_ISDIR(st.st_mode):
        for doc in DEFAULT_DOCUMENTS:
            pf = None if packed is None else packed.get(f"{inner}/{doc}" if inner else doc)
            if pf is not None:
                if rel and not slash:
                    return Redirect("/" + quote(rel) + "/")
                return _packed_hit(doc, pf)
            doc_st = _stat(f"{full}/{doc}")
            if doc_st is not None and stat.S_ISREG(doc_st.st_mode):
                break
        else:
            return None
        if rel and not slash:
            return Redirect("/" + quote(rel) + "/")
        full, st = f"{full}/{doc}", doc_st
    elif not stat.S_ISREG(st.st_mode) or slash:
        return None
    # We build version directories without symlinks; this holds even if one ever slips in.
    real = os.path.realpath(full)
    if not real.startswith(f"{root}/{web}/" if web else root + "/"):
        return None
    return _hit(full, st)


class HotEntry:
    """A small file in memory, with the head of its plain 200 answer made once (all but Date)."""

    __slots__ = ("body", "hit", "prefix")

    def __init__(self, hit: FileHit, body: bytes) -> None:
        self.hit = hit
        self.body = body
        self.prefix = (
            f"HTTP/1.1 200 OK\r\nContent-Type: {hit.content_type}\r\nContent-Length: {len(body)}\r\n"
            f"ETag: {hit.etag}\r\nLast-Modified: {hit.last_modified}\r\nAccept-Ranges: bytes\r\nDate: "
        ).encode("latin-1")


class HotCache:
    """Bodies of small, often asked-for files, by :data:`HotKey`; dropped per site on a version flip
    (a key names its version too, so a stale entry could never be served anyway). Least recently
    used entries go first when it is full."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._bytes = 0
        self._entries: collections.OrderedDict[HotKey, HotEntry] = collections.OrderedDict()
        self._by_site: dict[str, set[HotKey]] = {}

    def get(self, key: HotKey) -> HotEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: HotKey, hit: FileHit, body: bytes) -> None:
        if len(body) > self._max // 16 or key in self._entries:
            return
        self._entries[key] = HotEntry(hit, body)
        self._by_site.setdefault(key[0], set()).add(key)
        self._bytes += len(body)
        while self._bytes > self._max:
            self._drop(next(iter(self._entries)))

    def purge(self, site: str) -> None:
        for key in self._by_site.pop(site, set()):
            self._bytes -= len(self._entries.pop(key).body)

    def _drop(self, key: HotKey) -> None:
        self._bytes -= len(self._entries.pop(key).body)
        keys = self._by_site.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_site[key[0]]

    @property
    def size(self) -> int:
        return self._bytes


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """RFC 9110 section 14: one ``bytes=`` range → (first, last); "unsatisfiable"; None to ignore."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        # Several ranges would need multipart/byteranges; a full 200 is allowed instead.
        return None
    first_s, dash, last_s = spec.strip().partition("-")
    if not dash:
        return None
    first_s, last_s = first_s.strip(), last_s.strip()
    if not (first_s.isdigit() or first_s == "") or not (last_s.isdigit() or last_s == ""):
        return None
    if first_s == "":
        if last_s == "":
            return None
        suffix = int(last_s)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if last_s and last < first:
        return None
    if first >= size:
        return "unsatisfiable"
    return first, min(last, size - 1)


def _etag_matches(header: str, etag: str) -> bool:
    """If-None-Match uses the weak comparison (RFC 9110 section 13.1.2)."""
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


def _not_modified(headers: dict[bytes, bytes], hit: FileHit) -> bool:
    inm = _header(headers, b"if-none-match")
    if inm is not None:
        return _etag_matches(inm, hit.etag)
    ims = _header(headers, b"if-modified-since")
    if ims is not None:
        try:
            return hit.mtime <= int(parsedate_to_datetime(ims).timestamp())
        except (TypeError, ValueError, IndexError, OverflowError):
            return False
    return False


def _range_applies(headers: dict[bytes, bytes], hit: FileHit) -> bool:
    if_range = _header(headers, b"if-range")
    if if_range is None:
        return True
    # A strong validator must match exactly; a date must equal Last-Modified.
    return if_range.strip() == hit.etag or if_range.strip() == hit.last_modified


def send_file(
    conn: HttpConnection,
    hit: FileHit,
    headers: dict[bytes, bytes],
    *,
    head: bool,
    keep_alive: bool,
    body: bytes | None = None,
    opened: BinaryIO | None = None,
) -> bytes | None:
    """Answer with ``hit``; ``body`` is its bytes when already in memory. Returns the bytes read
    whole (small files) so the caller may cache them; a large file is handed to the connection to
    stream under flow control.

    ``opened``: ``hit``'s file, open already (one whose path could change meanwhile: an app's own,
    ``apps/_written.py``); it is read from instead of the path, closed here, and the answer says to
    check again before reuse (``no-cache``) and is not for the caller's cache."""
    sent: bytes | _Streamed | None = None
    try:
        sent = _send_file(conn, hit, headers, head=head, keep_alive=keep_alive, body=body, opened=opened)
    finally:
        if opened is not None and sent is not _STREAMED:
            opened.close()
    if isinstance(sent, _Streamed) or opened is not None:
        return None
    return sent


class _Streamed:
    """What :func:`_send_file` returns when the file went to the connection to stream (it owns it)."""


_STREAMED = _Streamed()


def _send_file(
    conn: HttpConnection,
    hit: FileHit,
    headers: dict[bytes, bytes],
    *,
    head: bool,
    keep_alive: bool,
    body: bytes | None,
    opened: BinaryIO | None,
) -> bytes | _Streamed | None:
    common = [("ETag", hit.etag), ("Last-Modified", hit.last_modified)]
    if opened is not None:
        common.append(("Cache-Control", "no-cache"))
    if _not_modified(headers, hit):
        conn.write(response_head(304, common, keep_alive=keep_alive))
        return None
    if conn.lane and hit.size > (LANE_FILL_MAX if conn.lane_fill else LANE_MAX_FILE):
        conn.refuse_lane(LANE_REFUSED_REQUEST)  # a big file goes on a connection of its own
        return None
    status, first, last = 200, 0, hit.size - 1
    common = [*common, ("Accept-Ranges", "bytes")]
    rng = _header(headers, b"range")
    if rng is not None and not head and _range_applies(headers, hit):
        parsed = _parse_range(rng, hit.size)
        if parsed == "unsatisfiable":
            conn.write(
                response_head(
                    416,
                    [*common, ("Content-Range", f"bytes */{hit.size}"), ("Content-Length", "0")],
                    keep_alive=keep_alive,
                )
            )
            return None
        if isinstance(parsed, tuple):
            status, (first, last) = 206, parsed
            common.append(("Content-Range", f"bytes {first}-{last}/{hit.size}"))
    length = last - first + 1
    head_bytes = response_head(
        status,
        [("Content-Type", hit.content_type), ("Content-Length", str(length)), *common],
        keep_alive=keep_alive,
    )
    if head:
        conn.write(head_bytes)
        return None
    if body is not None:
        conn.write_parts(head_bytes, body if first == 0 and last == len(body) - 1 else body[first : last + 1])
        return None
    if hit.offset >= 0:
        # In a pack: small, read whole (from the page cache: microseconds, less than a thread hop).
        data = _read_packed(hit)
        conn.write_parts(head_bytes, data if first == 0 and last == len(data) - 1 else data[first : last + 1])
        return data
    # Reads from the page cache block for microseconds; a thread hop would cost more.
    # A large file's handle goes to the connection's stream.
    f = opened if opened is not None else open(hit.path, "rb")  # noqa: SIM115
    if hit.size <= SMALL_FILE or conn.lane:
        with f:
            data = f.read(hit.size + 1)
        if len(data) != hit.size:
            raise OSError(f"{hit.path} changed size while being read")
        conn.write_parts(head_bytes, data if first == 0 and last == len(data) - 1 else data[first : last + 1])
        return data
    try:
        f.seek(first)
    except BaseException:
        f.close()
        raise
    conn.write(head_bytes)
    conn.stream(f, length)
    return _STREAMED


def read_small(hit: FileHit) -> bytes:
    """A small file's bytes, from its pack or its own file."""
    if hit.offset >= 0:
        return _read_packed(hit)
    with open(hit.path, "rb") as f:
        return f.read(hit.size)


def _read_packed(hit: FileHit) -> bytes:
    fd = os.open(hit.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, hit.size, hit.offset)
    finally:
        os.close(fd)
    if len(data) != hit.size:
        raise OSError(f"{hit.path} is shorter than its index says")
    return data
