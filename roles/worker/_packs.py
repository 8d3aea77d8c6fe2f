"""Small blobs kept many to a file (packs), and a version's index of the files it serves from them.

Creating a file costs far more than writing bytes (a new inode: 0.1-0.5 ms of kernel CPU on a busy
ext4), so a zip deploy of 20,000 small files would spend most of its sync making inodes. Each batch of
small blobs fetched together is written as one pack instead::

    packs/<name>.pack    the blobs back to back, then a table of (sha256, offset, size), then a
                         trailer (entry count, magic); written beside its place and renamed into it

A static version then lists its small files in ``sites/<site>/v<N>.files`` (path → pack, offset, size,
mtime, sha256) beside its directory, which keeps the folders (and any large file, hard-linked as
before). Both are immutable once renamed into place, except that file-by-file changes replace a
version's index whole, with a rename. A pack no index names is deleted by collection; a pack that some
index still names is kept whole, even when most of its blobs are no longer used.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "INDEX_SUFFIX",
    "PackStore",
    "PackedFile",
    "VersionFiles",
    "index_packs",
    "index_path",
    "pack_table",
    "read_index",
    "write_index",
]

_MAGIC = b"SCPACK01"
_ENTRY = struct.Struct(">32sQQ")
_TRAILER = struct.Struct(">Q8s")
_SUFFIX = ".pack"
INDEX_SUFFIX = ".files"


@dataclass(frozen=True, slots=True)
class PackedFile:
    """One file of a version, served from a pack."""

    pack: str  # the pack's full path
    offset: int
    size: int
    mtime: float
    sha256: str


def index_path(version_root: str) -> str:
    """Where the index of the version directory ``version_root`` lives (beside it)."""
    return version_root + INDEX_SUFFIX


def _packs_dir_of(version_root: str) -> str:
    # A version directory is <apps root>/sites/<site>/v<N>; packs are <apps root>/packs.
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(version_root))), "packs")


def read_index(version_root: str) -> dict[str, PackedFile] | None:
    """The packed files of a version (None: it has no index, every file is in its directory)."""
    try:
        with open(index_path(version_root), "rb") as f:
            raw = json.loads(f.read())
    except FileNotFoundError:
        return None
    packs_dir = _packs_dir_of(version_root)
    packs = [f"{packs_dir}/{name}{_SUFFIX}" for name in raw["packs"]]
    return {
        rel: PackedFile(packs[p], offset, size, mtime, sha)
        for rel, (p, offset, size, mtime, sha) in raw["files"].items()
    }


def index_packs(path: str) -> list[str]:
    """The names of the packs an index file names."""
    with open(path, "rb") as f:
        return list(json.loads(f.read())["packs"])


def write_index(version_root: str, files: Mapping[str, PackedFile], *, tmp_dir: str | None = None) -> str:
    """Write the index of ``version_root`` to a temporary file and return its path; the caller
    renames it to :func:`index_path` when the version is ready."""
    names: dict[str, int] = {}
    out: dict[str, list[object]] = {}
    for rel, pf in files.items():
        name = os.path.basename(pf.pack).removesuffix(_SUFFIX)
        p = names.setdefault(name, len(names))
        out[rel] = [p, pf.offset, pf.size, pf.mtime, pf.sha256]
    where = tmp_dir or os.path.dirname(version_root)
    tmp = f"{where}/.build-{uuid.uuid4().hex}{INDEX_SUFFIX}"
    with open(tmp, "w") as f:
        json.dump({"packs": list(names), "files": out}, f, separators=(",", ":"))
    return tmp


class VersionFiles:
    """A version's packed files, read from its index on first use (a serving process reads it only
    for the sites it is asked for)."""

    __slots__ = ("_files", "_loaded", "_root")

    def __init__(self, root: str) -> None:
        self._root = root
        self._files: dict[str, PackedFile] | None = None
        self._loaded = False

    def load(self) -> dict[str, PackedFile] | None:
        if not self._loaded:
            self._files = read_index(self._root)
            self._loaded = True
        return self._files

    def get(self, rel: str) -> PackedFile | None:
        files = self._files if self._loaded else self.load()
        return None if files is None else files.get(rel)

    @property
    def packed(self) -> bool:
        """Whether the version serves files from packs (else all of it is in its directory)."""
        return self.load() is not None


def pack_table(path: str) -> list[tuple[str, int, int]]:
    """What a pack holds: (sha256, offset, size) of each blob; ValueError for a damaged pack."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        if end < _TRAILER.size:
            raise ValueError("too short")
        count, magic = _TRAILER.unpack(os.pread(f.fileno(), _TRAILER.size, end - _TRAILER.size))
        if magic != _MAGIC:
            raise ValueError("no pack trailer")
        size = count * _ENTRY.size
        table = os.pread(f.fileno(), size, end - _TRAILER.size - size)
        if len(table) != size:
            raise ValueError("truncated table")
    return [(sha.hex(), offset, length) for sha, offset, length in _ENTRY.iter_unpack(table)]


class PackStore:
    """Where each packed blob is, by SHA-256 (the main process's view; serving processes read
    versions' indexes instead)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._where: dict[str, tuple[str, int, int]] = {}
        self._sizes: dict[str, int] = {}

    def path(self, name: str) -> str:
        return f"{self.directory}/{name}{_SUFFIX}"

    def load(self) -> None:
        """Learn every pack on disk (after a restart); unfinished or damaged ones are deleted."""
        self._where.clear()
        self._sizes.clear()
        for entry in os.scandir(self.directory):
            if not entry.name.endswith(_SUFFIX) or entry.name.startswith("."):
                Path(entry.path).unlink(missing_ok=True)
                continue
            try:
                table = pack_table(entry.path)
            except (OSError, ValueError):
                Path(entry.path).unlink(missing_ok=True)
                continue
            self._learn(entry.name.removesuffix(_SUFFIX), table, entry.stat().st_size)

    def _learn(self, name: str, table: list[tuple[str, int, int]], size: int) -> None:
        path = self.path(name)
        for sha, offset, length in table:
            self._where.setdefault(sha, (path, offset, length))
        self._sizes[name] = size

    def has(self, sha: str) -> bool:
        return sha in self._where

    def location(self, sha: str) -> tuple[str, int, int] | None:
        """(pack path, offset, size) of a packed blob."""
        return self._where.get(sha)

    def read(self, sha: str) -> bytes:
        path, offset, size = self._where[sha]
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        if len(data) != size:
            raise OSError(f"pack {path} is shorter than its table says")
        return data

    def write(self, blobs: Iterable[tuple[str, bytes]]) -> str:
        """Store verified blobs as one new pack (all of it or none: renamed into place when whole).
        Durable once the caller syncs the filesystem, as for any blob."""
        name = uuid.uuid4().hex
        tmp = f"{self.directory}/.tmp-{name}"
        table: list[tuple[str, int, int]] = []
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                parts: list[bytes] = []
                at = 0
                for sha, data in blobs:
                    table.append((sha, at, len(data)))
                    parts.append(data)
                    at += len(data)
                parts.extend(_ENTRY.pack(bytes.fromhex(s), o, n) for s, o, n in table)
                parts.append(_TRAILER.pack(len(table), _MAGIC))
                view = memoryview(b"".join(parts))
                size = len(view)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            os.rename(tmp, self.path(name))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._learn(name, table, size)
        return name

    def collect(self, referenced: set[str]) -> int:
        """Delete every pack whose name is not in ``referenced``; return the bytes of those kept."""
        doomed = {self.path(name) for name in self._sizes if name not in referenced}
        for path in doomed:
            Path(path).unlink(missing_ok=True)
        self._sizes = {name: size for name, size in self._sizes.items() if name in referenced}
        self._where = {sha: loc for sha, loc in self._where.items() if loc[0] not in doomed}
        return sum(self._sizes.values())
