"""The one trust boundary for paths inside a site: FTP paths, URL paths, zip member names."""

from __future__ import annotations

import posixpath

from shared.errors import InvalidInput

__all__ = ["MAX_PATH_LENGTH", "site_relpath"]

MAX_PATH_LENGTH = 1024


def site_relpath(path: str, *, allow_root: bool = True) -> str:
    """Normalise a path a user gave to a relative POSIX path inside the site root.

    ``"/a/./b/"`` → ``"a/b"``; ``"/"`` → ``""`` (the root). Anything that would climb out of the root,
    or that a filesystem could read another way (NUL, backslash, a Windows drive), is refused rather
    than silently rewritten.
    """
    if "\x00" in path:
        raise InvalidInput("path contains a NUL byte")
    if "\\" in path:
        raise InvalidInput(f"path {path!r} contains a backslash")
    if len(path) > MAX_PATH_LENGTH:
        raise InvalidInput(f"path is longer than {MAX_PATH_LENGTH} characters")
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
        parts.append(part)
    rel = posixpath.join(*parts) if parts else ""
    if not rel and not allow_root:
        raise InvalidInput("a path inside the site is required")
    return rel
