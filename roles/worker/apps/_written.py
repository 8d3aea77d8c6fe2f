"""Files an app wrote in its own folder, served to visitors as published files are.

A PHP upload form saves to ``uploads/`` and links ``/uploads/photo.jpg``; a CMS writes thumbnails and
generated CSS beside its code. Those writes land in the upper layer of the app's overlay
(``<volume>/files``, see ``_files.py``), which the published version knows nothing of, so without this
every such link would go to the app (a 404, or the PHP front controller). When a GET or HEAD names
no file of the published version, the worker looks in the upper layer too: published files come
first (a deploy is what the owner chose), then what the app wrote.

The app owns everything under the upper layer, so the worker (root) opens a path there only with
``openat2`` resolving beneath it (a symlink only while it stays there; no magic link, no other
mount), then serves the open file, never the path again: a symlink out of it (to ``/etc/passwd``, to
another site), a FIFO or a device the app put there is not followed nor opened for reading, and a
swap after the check changes nothing. The never-served rule holds as for
published files (a ``db.sqlite3`` the app keeps is its data). Such an answer is marked ``no-cache``
(the app may change the file at any time), and no cache on the worker or front end keeps it.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
from typing import BinaryIO

from roles.worker._http import http_date
from roles.worker._source import is_never_served
from roles.worker._static import FileHit, content_type

__all__ = ["UPPER", "open_written"]

# The overlay's upper layer, under the site's volume (``_files.py`` makes it).
UPPER = "files"
_SYS_OPENAT2 = 437  # the same number on x86_64 and arm64
# struct open_how {u64 flags, mode, resolve}
_OPEN_HOW = struct.Struct("=QQQ")
_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
# A symlink may be followed only while it stays beneath the upper layer (relative, as `php artisan
# storage:link --relative` makes): an absolute one or one that climbs out is refused.
_RESOLVE = _RESOLVE_NO_XDEV | _RESOLVE_NO_MAGICLINKS | _RESOLVE_BENEATH
# NONBLOCK: a FIFO the app made opens at once (then is refused) instead of waiting for a writer.
_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _openat2(dirfd: int, rel: str, flags: int) -> int:
    how = _OPEN_HOW.pack(flags, 0, _RESOLVE)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_long(dirfd),
        ctypes.c_char_p(os.fsencode(rel)),
        ctypes.c_char_p(how),
        ctypes.c_size_t(len(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), rel)
    return int(fd)


def open_written(volume: str, rel: str) -> tuple[BinaryIO, FileHit] | None:
    """The regular file at ``rel`` (a path through :func:`shared.paths.site_relpath`) in the upper
    layer of the app's folder on the mounted ``volume``, open for reading; None when there is none
    (or it is one the site never serves)."""
    if not rel or is_never_served(rel):
        return None
    try:
        top = os.open(os.path.join(volume, UPPER), os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # never written (or the volume went meanwhile)
    try:
        fd = _openat2(top, rel, _FLAGS)
    except OSError:
        # Not there, a symlink on the way, or a kernel without openat2 (before 5.6): not served.
        return None
    finally:
        os.close(top)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except OSError:
        os.close(fd)
        return None
    hit = FileHit(
        path=f"{volume}/{UPPER}/{rel}",
        size=st.st_size,
        etag=f'"w{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"',
        last_modified=http_date(st.st_mtime),
        mtime=int(st.st_mtime),
        content_type=content_type(os.path.basename(rel)),
    )
    return f, hit
