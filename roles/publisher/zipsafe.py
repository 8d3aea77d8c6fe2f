"""The one trust boundary for web deploy zips: which members may become files of a site.

:func:`check_zip` reads only the central directory and decides, before a byte is extracted, whether
the archive is acceptable and what it would write; :func:`copy_member` then extracts one member and
re-checks the size it really inflates to, so a zip whose headers lie (a zip bomb) stops at its budget.
"""

from __future__ import annotations

import functools
import io
import lzma
import re
import stat
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from shared.contracts.content import SITE_ENTRIES_MAX
from shared.errors import BadRequest, InvalidInput, QuotaExceeded, TooManyEntries
from shared.paths import site_relpath

__all__ = ["ZipMember", "ZipPlan", "check_zip", "copy_member", "open_zip", "read_member"]

_CHUNK = 256 * 1024
_SUPPORTED_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_ENCRYPTED_FLAG = 0x1
_UTF8_FLAG = 0x800
_CONTROL = re.compile("[\x00-\x1f\x7f]")
# "Version made by" systems (APPNOTE 4.4.2) whose file systems have no backslash in names: MS-DOS/FAT,
# Windows NTFS, VFAT. Windows PowerShell's Compress-Archive writes "css\site.css" there.
_WINDOWS_SYSTEMS = frozenset({0, 10, 14})


@functools.lru_cache(maxsize=1024)
def _mktime(date_time: tuple[int, int, int, int, int, int]) -> float | None:
    # The members of one zip share few distinct times; mktime costs a time zone lookup each call.
    try:
        return time.mktime((*date_time, 0, 0, -1))
    except (OverflowError, ValueError):
        return None


@dataclass(frozen=True)
class ZipMember:
    """A regular file of the archive and the site path it becomes."""

    path: str
    info: zipfile.ZipInfo

    @property
    def size(self) -> int:
        return int(self.info.file_size)

    @property
    def mtime(self) -> float:
        when = _mktime(self.info.date_time)
        return time.time() if when is None else when


@dataclass(frozen=True)
class ZipPlan:
    """What a checked archive writes: its files, the directories only a directory entry names, and
    the total uncompressed size its headers declare."""

    files: tuple[ZipMember, ...]
    empty_dirs: tuple[str, ...]
    total_bytes: int


def open_zip(source: Path | IO[bytes]) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise BadRequest("not a zip file", hint="upload a .zip archive of the site's files") from exc


def _utf8_name(info: zipfile.ZipInfo) -> str:
    """The member's name as UTF-8. Many zip tools write UTF-8 names without the flag that says so, and
    zipfile then reads them as CP437; names that are not UTF-8 at all are refused (a worker could not
    serve them under the name the client meant)."""
    name = info.orig_filename
    if info.flag_bits & _UTF8_FLAG or name.isascii():
        return name  # (an ASCII name reads the same in CP437 and UTF-8)
    try:
        return name.encode("cp437").decode("utf-8")
    except UnicodeEncodeError:
        return name  # not decoded as CP437 (a metadata_encoding was given): keep it
    except UnicodeDecodeError:
        raise InvalidInput(
            f"zip member {name!r} has a name that is not valid UTF-8",
            hint="make the zip with a tool that stores UTF-8 names (zip 3, 7-Zip, Windows 10+)",
        ) from None


def _member_path(info: zipfile.ZipInfo) -> tuple[str, bool]:
    """The site path of a member and whether it is a directory; raises on any name that is not plainly
    a relative path inside the site."""
    # orig_filename keeps what zipfile cuts off at a NUL byte ("evil.php\0.jpg" would become "evil.php").
    raw = _utf8_name(info)
    shown = repr(raw)
    if not raw:
        raise InvalidInput("the zip has a member with an empty name")
    if _CONTROL.search(raw):
        raise InvalidInput(f"zip member {shown} has a NUL or control character in its name")
    if "\\" in raw:
        if info.create_system not in _WINDOWS_SYSTEMS:
            raise InvalidInput(
                f"zip member {shown} has a backslash in its name", hint="use '/' between folders"
            )
        # Made on Windows, where a backslash can only part folders: read as unzip reads it, and then
        # held to every check below as if it had been written with '/'.
        raw = raw.replace("\\", "/")
    if raw.startswith("/"):
        raise InvalidInput(f"zip member {shown} has an absolute path")
    if len(raw) >= 2 and raw[1] == ":" and raw[0].isalpha():
        raise InvalidInput(f"zip member {shown} names a drive")
    if ".." in raw.split("/"):
        raise InvalidInput(f"zip member {shown} climbs out of the site root with '..'")
    is_dir = raw.endswith("/")
    path = site_relpath(raw, allow_root=is_dir)
    return path, is_dir


def _finder_metadata(path: str) -> bool:
    """Whether a member is macOS Finder's, never a site's: "Compress" adds an AppleDouble copy of every
    file under __MACOSX/, and folders carry .DS_Store files (which, served, list a folder's files)."""
    parts = path.split("/")
    return parts[0] == "__MACOSX" or parts[-1] == ".DS_Store"


def _check_kind(info: zipfile.ZipInfo, path: str, is_dir: bool) -> None:
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode):
        raise InvalidInput(f"zip member {path!r} is a symbolic link", hint="zip the files the link points to")
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise InvalidInput(f"zip member {path!r} is not a regular file or directory")
    if kind == stat.S_IFDIR and not is_dir:
        raise InvalidInput(f"zip member {path!r} is a directory without a trailing '/'")
    if info.flag_bits & _ENCRYPTED_FLAG:
        raise InvalidInput(f"zip member {path!r} is encrypted", hint="upload a zip without a password")
    if info.compress_type not in _SUPPORTED_METHODS:
        raise InvalidInput(
            f"zip member {path!r} uses an unsupported compression method ({info.compress_type})",
            hint="use deflate or store",
        )


def check_zip(zf: zipfile.ZipFile, *, max_total_bytes: int, max_members: int = SITE_ENTRIES_MAX) -> ZipPlan:
    """Decide whether ``zf`` may replace a site's content; the answer is the plan of what it writes.

    Refused: names that are absolute, climb with ``..``, hold backslashes (but for a zip made on
    Windows, whose backslashes part folders), drive letters, NUL or control characters; symbolic links
    and other special files; encrypted members; the same path twice (also after normalising, and a
    path that is both a file and a directory); more than ``max_members`` members, or more files and
    folders (those its paths imply too: the site's entries, as the fileserver counts them,
    :class:`TooManyEntries`); a declared uncompressed total over ``max_total_bytes``
    (:class:`QuotaExceeded`). Left out: macOS Finder's ``__MACOSX/`` and ``.DS_Store`` members.
    """
    infos = zf.infolist()
    if len(infos) > max_members:
        raise InvalidInput(f"the zip has {len(infos)} members; at most {max_members} are allowed")
    files: dict[str, ZipMember] = {}
    dirs: set[str] = set()
    total = 0
    for info in infos:
        path, is_dir = _member_path(info)
        _check_kind(info, path, is_dir)
        if _finder_metadata(path):
            continue
        if is_dir:
            if not path:
                continue  # "./" or "/"-only entries name the root itself
            if path in dirs:
                raise InvalidInput(f"the zip names directory {path!r} twice")
            dirs.add(path)
            continue
        if path in files:
            raise InvalidInput(f"the zip names {path!r} twice")
        files[path] = ZipMember(path, info)
        total += int(info.file_size)
        if total > max_total_bytes:
            raise QuotaExceeded(
                f"the zip unpacks to more than the site's quota of {max_total_bytes} bytes",
                hint="remove files or ask for a bigger plan",
            )
    implied: set[str] = set()
    for path in (*files, *dirs):
        parts = path.split("/")
        implied.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for path in files:
        if path in dirs or path in implied:
            raise InvalidInput(f"the zip has {path!r} both as a file and as a directory")
    entries = len(files) + len(dirs | implied)
    if entries > max_members:
        raise TooManyEntries(
            f"the zip makes {entries:,} files and folders; a site may hold at most {max_members:,}",
            hint="deploy fewer files or folders, or spread the content over more sites",
        )
    empty_dirs = tuple(sorted(d for d in dirs if d not in implied))
    return ZipPlan(tuple(files[p] for p in sorted(files)), empty_dirs, total)


def read_member(zf: zipfile.ZipFile, member: ZipMember) -> bytes:
    """A small member's bytes, held to the size its header declares as :func:`copy_member` holds it."""
    out = io.BytesIO()
    copy_member(zf, member, out)
    return out.getvalue()


def copy_member(zf: zipfile.ZipFile, member: ZipMember, out: BinaryIO) -> int:
    """Inflate ``member`` into ``out``; stops as soon as it yields more than its header declared."""
    written = 0
    try:
        src = zf.open(member.info)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError) as exc:
        raise BadRequest(f"zip member {member.path!r} cannot be read: {exc}") from exc
    with src:
        while True:
            try:
                chunk = src.read(_CHUNK)
            except (zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
                raise BadRequest(f"zip member {member.path!r} is corrupt: {exc}") from exc
            if not chunk:
                break
            written += len(chunk)
            if written > member.size:
                raise QuotaExceeded(
                    f"zip member {member.path!r} inflates to more than the {member.size} bytes it declares"
                )
            out.write(chunk)
    if written != member.size:
        raise BadRequest(f"zip member {member.path!r} is corrupt: {written} bytes, {member.size} declared")
    return written
