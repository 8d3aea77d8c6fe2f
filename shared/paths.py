"""The one trust boundary for paths inside a site: FTP paths, URL paths, zip member names."""

from __future__ import annotations

import posixpath
import re

from shared.errors import InvalidInput

__all__ = ["MAX_NAME_BYTES", "MAX_PATH_BYTES", "MAX_PATH_LENGTH", "site_relpath"]

# What every worker's filesystem can hold: Linux (ext4, xfs, tmpfs) caps a name at 255 bytes, and a
# site's path must fit under the worker's own cache directory within PATH_MAX (4096).
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 1024
MAX_PATH_LENGTH = MAX_PATH_BYTES  # the older name


# An ASCII path already in normal form: printable names without '/' or '\\', joined by single '/'.
_PLAIN = re.compile(r"[ -.0-\[\]-~]+(?:/[ -.0-\[\]-~]+)*")


def _plain(path: str) -> bool:
    """Whether ``path`` is a normal relative path that :func:`site_relpath` returns as it is, found with
    one regex instead of a walk over its names (a deploy checks tens of thousands of them)."""
    if not (path.isascii() and _PLAIN.fullmatch(path)):
        return False
    if len(path) > MAX_NAME_BYTES and (
        len(path) > MAX_PATH_BYTES or max(map(len, path.split("/"))) > MAX_NAME_BYTES
    ):
        return False
    if path[1:2] == ":" and path[0].isalpha():
        return False
    framed = f"/{path}/"
    return "/./" not in framed and "/../" not in framed


def site_relpath(path: str, *, allow_root: bool = True) -> str:
    """Normalise a path a user gave to a relative POSIX path inside the site root.

    ``"/a/./b/"`` → ``"a/b"``; ``"/"`` → ``""`` (the root). Anything that would climb out of the root,
    that a filesystem could read another way (NUL, backslash, a Windows drive), that is not valid UTF-8,
    or that no worker's filesystem could hold (a name over 255 bytes, a path over 1024) is refused
    rather than silently rewritten.
    """
    if _plain(path):
        return path
    return _normalise(path, allow_root=allow_root)


def _normalise(path: str, *, allow_root: bool) -> str:
    if "\x00" in path:
        raise InvalidInput("path contains a NUL byte")
    if "\\" in path:
        raise InvalidInput(f"path {path!r} contains a backslash")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        # Lone surrogates: bytes that were not UTF-8 on the wire (decoded with surrogateescape).
        raise InvalidInput(f"path {path!r} is not valid UTF-8", hint="name files in UTF-8") from None
    if size > MAX_PATH_BYTES:
        raise InvalidInput(
            f"path is {size} bytes long; at most {MAX_PATH_BYTES} bytes (UTF-8) are allowed",
            hint="use shorter folder and file names",
        )
    if len(path) >= 2 and path[1] == ":" and path[0].isalpha():
        raise InvalidInput(f"path {path!r} names a drive")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise InvalidInput(f"path {path!r} climbs out of the site root")
        if any(ord(c) < 32 or ord(c) == 127 for c in part):
            raise InvalidInput(f"path {path!r} contains control characters")
        if "\ufffd" in part:
            # What a server decoding with errors="replace" makes of bytes that were not UTF-8.
            raise InvalidInput(f"path {path!r} is not valid UTF-8", hint="name files in UTF-8")
        name_bytes = len(part.encode("utf-8"))
        if name_bytes > MAX_NAME_BYTES:
            raise InvalidInput(
                f"the name {part[:40]!r}... is {name_bytes} bytes long; "
                f"at most {MAX_NAME_BYTES} bytes (UTF-8) per file or folder name are allowed",
                hint="use a shorter name",
            )
        parts.append(part)
    rel = posixpath.join(*parts) if parts else ""
    if not rel and not allow_root:
        raise InvalidInput("a path inside the site is required")
    return rel
