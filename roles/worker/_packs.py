"""Small blobs kept many to a file (packs), and a version's index of the files it serves from them.

Creating a file costs far more than writing bytes (a new inode: 0.1-0.5 ms of kernel CPU on a busy
ext4), so a zip deploy of 20,000 small files would spend most of its sync making inodes. Each batch of
small blobs fetched together is written as one pack instead::

    packs/<name>.pack    the blobs back to back, then a table of (sha256, offset, size), then a
                         trailer (entry count, magic); written beside its place and renamed into it

A static version then lists its small files in ``sites/<site>/v<N>.files`` (path → pack, offset, size,
mtime, validator) beside its directory, which keeps the folders (and any large file, hard-linked as
before). Both are immutable once renamed into place. File-by-file changes (FTP) are listed in
``v<N>.changes``, replaced whole with a rename on each change, so a change costs what changed since the
version was built, not the site's size. Past ``FOLD_CHANGES_AT`` of them they are folded into a new
index (renamed over the old one) and the changes file goes, so a site published file by file for
months does not rewrite and re-read all it ever changed on each upload. A pack no index or changes
file names is deleted by collection; a pack that one still names is kept whole, even when most of its
blobs are no longer used.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CHANGES_SUFFIX",
    "FOLD_CHANGES_AT",
    "INDEX_SUFFIX",
    "IndexBuilder",
    "PackStore",
    "PackedFile",
    "VersionFiles",
    "changes_path",
    "index_packs",
    "index_path",
    "pack_table",
    "packed_file",
    "write_changes",
]

_MAGIC = b"SCPACK01"
_ENTRY = struct.Struct(">32sQQ")
_TRAILER = struct.Struct(">Q8s")
_SUFFIX = ".pack"
INDEX_SUFFIX = ".files"
CHANGES_SUFFIX = ".changes"
# Changes in place past this many are folded into a new index: each change rewrites the list of them
# (at most this many entries), and a fold costs one index of the site per this many changes.
FOLD_CHANGES_AT = 512


@dataclass(frozen=True, slots=True)
class PackedFile:
    """One file of a version, served from a pack."""

    pack: str  # the pack's full path
    offset: int
    size: int
    mtime: int
    # A strong validator of its bytes (the start of their SHA-256).
    tag: str


# In an index: [pack (its number in the index's list), offset, size, mtime, tag]; in a changes file:
# the same with the pack's name, or null for a path gone.
_Entry = list[Any]


def index_path(version_root: str) -> str:
    """Where the index of the version directory ``version_root`` lives (beside it)."""
    return version_root + INDEX_SUFFIX


def changes_path(version_root: str) -> str:
    """Where the files changed in place since the index was written are listed."""
    return version_root + CHANGES_SUFFIX


def _packs_dir_of(version_root: str) -> str:
    # A version directory is <apps root>/sites/<site>/v<N>; packs are <apps root>/packs.
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(version_root))), "packs")


def _read(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def _write_tmp(directory: str, suffix: str, value: object) -> str:
    tmp = f"{directory}/.build-{uuid.uuid4().hex}{suffix}"
    with open(tmp, "w") as f:
        # dumps, not dump: only the one-shot encoder is the C one (dump's is Python, several times
        # slower, and a version's list of changes is written whole on every FTP upload).
        f.write(json.dumps(value, separators=(",", ":")))
        f.flush()
        # Durable before it is renamed into place: a version is served only with all of its index.
        os.fsync(f.fileno())
    return tmp


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def index_packs(path: str) -> list[str]:
    """The names of the packs an index or changes file names."""
    raw = _read(path)
    if path.endswith(CHANGES_SUFFIX):
        return [e[0] for e in raw["files"].values() if e is not None]
    return list(raw["packs"])


def packed_file(pack: str, offset: int, size: int, mtime: float, sha256: str) -> PackedFile:
    """A packed file as the cache knows it (``pack``: the pack's full path)."""
    return PackedFile(pack, offset, size, int(mtime), sha256[:32])


class IndexBuilder:
    """A version's index as it is built: one entry per packed file, in the form it is stored in."""

    def __init__(self) -> None:
        self._packs: dict[str, int] = {}
        self.files: dict[str, _Entry] = {}

    def add(self, rel: str, where: tuple[str, int, int], mtime: float, sha256: str) -> None:
        """``where``: (pack path, offset, size), as :meth:`PackStore.location` tells it."""
        pack = self._packs.setdefault(where[0], len(self._packs))
        self.files[rel] = [pack, where[1], where[2], int(mtime), sha256[:32]]

    def write(self, version_root: str) -> str:
        """Write the index of ``version_root`` to a temporary file beside it and return its path;
        the caller renames it to :func:`index_path` when the version is ready."""
        names = [os.path.basename(p).removesuffix(_SUFFIX) for p in self._packs]
        return _write_tmp(os.path.dirname(version_root), INDEX_SUFFIX, {"packs": names, "files": self.files})

    @property
    def packs(self) -> list[str]:
        return list(self._packs)


def write_changes(version_root: str, changes: Mapping[str, PackedFile | None]) -> None:
    """Replace the list of files changed in place since the index was written (one rename)."""
    out = {
        rel: None
        if pf is None
        else [os.path.basename(pf.pack).removesuffix(_SUFFIX), pf.offset, pf.size, pf.mtime, pf.tag]
        for rel, pf in changes.items()
    }
    tmp = _write_tmp(os.path.dirname(version_root), CHANGES_SUFFIX, {"files": out})
    os.replace(tmp, changes_path(version_root))


class VersionFiles:
    """A version's packed files: its index, and the files changed in place since (which win), read
    on first use (a serving process reads them only for the sites it is asked for)."""

    __slots__ = ("_base", "_changes", "_loaded", "_packs", "_root", "_stamp")

    def __init__(self, root: str) -> None:
        self._root = root
        # (pack paths, path → entry) of the index; None: the version has none.
        self._base: tuple[list[str], dict[str, _Entry]] | None = None
        self._changes: dict[str, _Entry | None] = {}
        self._packs = ""
        self._loaded = False
        # Which index file was read (inode, mtime): one written again at the same path is another.
        self._stamp: tuple[int, int] | None = None

    def inherit(self, earlier: VersionFiles) -> None:
        """Take the index already read for the same directory, if it is still the one there (an
        index is never rewritten, only replaced by a new file; its changes are read again)."""
        if earlier._root != self._root or not earlier._loaded or earlier._base is None or self._loaded:
            return
        if _stamp(index_path(self._root)) == earlier._stamp:
            self._base, self._stamp = earlier._base, earlier._stamp

    def adopt(self, built: IndexBuilder) -> None:
        """Take the index just written for this directory (no need to read it back)."""
        self._base = (built.packs, built.files)
        self._stamp = _stamp(index_path(self._root))
        self._changes = {}
        self._packs = _packs_dir_of(self._root)
        self._loaded = True

    def load(self) -> bool:
        """Read what is not read yet; whether the version has an index."""
        if self._loaded:
            return self._base is not None
        packs = _packs_dir_of(self._root)
        while True:
            if self._base is None:
                try:
                    with open(index_path(self._root), "rb") as f:
                        st = os.fstat(f.fileno())
                        raw = json.loads(f.read())
                except FileNotFoundError:
                    self._loaded = True
                    return False
                self._base = ([f"{packs}/{name}{_SUFFIX}" for name in raw["packs"]], raw["files"])
                self._stamp = (st.st_ino, st.st_mtime_ns)
            try:
                self._changes = _read(changes_path(self._root))["files"]
            except FileNotFoundError:
                self._changes = {}
            # A fold between reading the index and its changes leaves the index read without the
            # changes it took in: read both again.
            if _stamp(index_path(self._root)) == self._stamp:
                break
            self._base = None
        self._packs = packs
        self._loaded = True
        return True

    def folded(self, changes: Mapping[str, PackedFile | None]) -> IndexBuilder:
        """The index with ``changes`` (all changes in place, as :meth:`changes` gives them and more)
        folded in: the new index for the version's directory, with no changes file beside it."""
        self.load()
        built = IndexBuilder()
        if self._base is not None:
            pack_paths, files = self._base
            for rel, e in files.items():
                if rel not in changes:
                    built.add(rel, (pack_paths[e[0]], e[1], e[2]), e[3], e[4])
        for rel, pf in changes.items():
            if pf is not None:
                built.add(rel, (pf.pack, pf.offset, pf.size), pf.mtime, pf.tag)
        return built

    @property
    def packed(self) -> bool:
        """Whether the version serves files from packs (else all of it is in its directory); asked
        without reading the index."""
        if self._loaded:
            return self._base is not None
        return os.path.exists(index_path(self._root))

    @property
    def changed(self) -> int:
        """How many paths were changed in place since the index was written (without reading it)."""
        if self._loaded:
            return len(self._changes)
        try:
            return len(_read(changes_path(self._root))["files"])
        except FileNotFoundError:
            return 0

    def get(self, rel: str) -> PackedFile | None:
        if not self._loaded:
            self.load()
        base = self._base
        if base is None:
            return None
        if self._changes and rel in self._changes:
            e = self._changes[rel]
            return None if e is None else PackedFile(f"{self._packs}/{e[0]}{_SUFFIX}", e[1], e[2], e[3], e[4])
        e = base[1].get(rel)
        return None if e is None else PackedFile(base[0][e[0]], e[1], e[2], e[3], e[4])

    def changes(self) -> dict[str, PackedFile | None]:
        """The files changed in place so far (None: gone)."""
        self.load()
        return {rel: None if e is None else self.get(rel) for rel, e in self._changes.items()}

    def paths_below(self, folder: str) -> list[str]:
        """Every packed path inside ``folder`` (for a folder deleted in place)."""
        self.load()
        below = folder + "/"
        base = self._base[1] if self._base is not None else {}
        return [rel for rel in itertools.chain(base, self._changes) if rel.startswith(below)]


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
        # Every static site's small files: for the worker alone (apps see their own site as files).
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
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
