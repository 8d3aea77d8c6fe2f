"""Site trees and commit ops: pure functions over a site's files, no filesystem access.

A version is a tree of folders, each stored once under the sha256 of its encoding (as git stores
trees), so a new version writes only the folders on the paths that changed. The flat form workers read
is the manifest (:class:`shared.contracts.content.Manifest`).
Paths are relative POSIX paths from :func:`shared.paths.site_relpath`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from shared.contracts.content import CommitOp, PutOp, RenameOp, encode_manifest
from shared.contracts.fields import SHA256_PATTERN
from shared.errors import AlreadyExists, InUse, InvalidInput, NotFound

__all__ = [
    "SHA256_RE",
    "Change",
    "FileEntry",
    "Folder",
    "Tree",
    "Undo",
    "apply_ops",
    "check_sha256",
    "diff",
    "human_size",
    "undo_ops",
    "walk",
]

SHA256_RE = re.compile(SHA256_PATTERN)


def check_sha256(value: object) -> str:
    if not isinstance(value, str) or not SHA256_RE.match(value):
        raise InvalidInput(f"{value!r} is not a sha256 (64 lower-case hex digits)")
    return value


def human_size(n: int) -> str:
    """``12.3 MB``, ``10 MB``, ``512 bytes`` (binary units, as quotas are set in MB of 1024 KB)."""
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1024
        if value < 1024 or unit == "TB":
            break
    text = f"{value:.1f}".removesuffix(".0")
    return f"{text} {unit}"


def _split(path: str) -> list[str]:
    return path.split("/")


@dataclass(frozen=True, slots=True)
class FileEntry:
    sha256: str
    size: int
    mtime: float

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "mtime": self.mtime}


class Folder:
    """One directory of a version: its files and sub-folders, by name.

    A folder is immutable once it has a digest (the sha256 of :meth:`encode`); only the transaction that
    made or copied it (``owner``) changes it, so earlier versions that share it never see a change.
    """

    __slots__ = ("digest", "entries", "owner")

    def __init__(self, entries: dict[str, FileEntry | Folder] | None = None, owner: object = None) -> None:
        self.entries: dict[str, FileEntry | Folder] = entries if entries is not None else {}
        self.owner = owner
        self.digest: str | None = None

    def encode(self) -> bytes:
        """The canonical form a folder is stored and addressed by (sub-folders by their digest)."""
        files: dict[str, list[Any]] = {}
        dirs: dict[str, str] = {}
        for name, child in self.entries.items():
            if isinstance(child, Folder):
                assert child.digest is not None, "sub-folders are frozen first"
                dirs[name] = child.digest
            else:
                files[name] = [child.sha256, child.size, child.mtime]
        return json.dumps({"d": dirs, "f": files}, sort_keys=True, separators=(",", ":")).encode()

    @staticmethod
    def decode(data: bytes, load: Callable[[str], Folder]) -> Folder:
        raw = json.loads(data)
        entries: dict[str, FileEntry | Folder] = {}
        for name, digest in raw["d"].items():
            entries[name] = load(digest)
        for name, (sha, size, mtime) in raw["f"].items():
            entries[name] = FileEntry(sha, int(size), float(mtime))
        return Folder(entries)


def _walk_files(folder: Folder, prefix: str) -> Iterator[tuple[str, FileEntry | Folder]]:
    for name, child in folder.entries.items():
        path = f"{prefix}{name}"
        yield path, child
        if isinstance(child, Folder):
            yield from _walk_files(child, path + "/")


def walk(root: Folder) -> Iterator[tuple[str, FileEntry | Folder]]:
    """Every file and directory under ``root``, by its path in the site."""
    return _walk_files(root, "")


class Tree:
    """A site's files and directories as nested folders; changes copy only the folders on their path.

    ``Tree.begin()`` starts a change of a frozen tree; :meth:`freeze` gives every changed folder its
    digest (writing it through a callback) and ends the change. Totals are kept as changes are made.
    """

    def __init__(
        self,
        root: Folder | None = None,
        *,
        total_bytes: int = 0,
        file_count: int = 0,
        dir_count: int | None = None,
    ) -> None:
        self._owner = object()
        self.root = root if root is not None else Folder(owner=self._owner)
        self.total_bytes = total_bytes
        self.file_count = file_count
        # Counted on first use for a tree read from disk (version records predate the count), then kept.
        self._dir_count = 0 if root is None else dir_count
        # Whether a change made it differ from where it began (a put of the same entry does not).
        self.changed = False
        # The folder the last put went into: a deploy puts file after file into the same one.
        self._last: tuple[str, Folder] | None = None

    def begin(self) -> Tree:
        """A new tree that starts as this one; changing it leaves this one as it is."""
        return Tree(
            self.root, total_bytes=self.total_bytes, file_count=self.file_count, dir_count=self._dir_count
        )

    # --- reading

    @property
    def dir_count(self) -> int:
        if self._dir_count is None:
            self._dir_count = sum(isinstance(e, Folder) for _, e in _walk_files(self.root, ""))
        return self._dir_count

    @property
    def entry_count(self) -> int:
        """Files and directories: what a site's entry limit counts (each is an inode on every worker)."""
        return self.file_count + self.dir_count

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return {p: e.to_json() for p, e in _walk_files(self.root, "") if isinstance(e, FileEntry)}

    @property
    def dirs(self) -> set[str]:
        return {p for p, e in _walk_files(self.root, "") if isinstance(e, Folder)}

    def get(self, path: str) -> FileEntry | Folder | None:
        node: FileEntry | Folder | None = self.root
        for part in _split(path):
            if not isinstance(node, Folder):
                return None
            node = node.entries.get(part)
        return node

    def manifest(self, site: str, version: int) -> bytes:
        """This tree as the :class:`~shared.contracts.content.Manifest` of ``version``, in JSON."""
        files: list[tuple[str, FileEntry]] = []
        dirs: list[str] = []

        def collect(folder: Folder, prefix: str) -> None:
            # Not through walk(): a generator per folder and a yield per file cost more than the JSON.
            for name, entry in folder.entries.items():
                if isinstance(entry, Folder):
                    dirs.append(prefix + name)
                    collect(entry, f"{prefix}{name}/")
                else:
                    files.append((prefix + name, entry))

        collect(self.root, "")
        return encode_manifest(site, version, self.total_bytes, files, dirs)

    def same_as(self, other: Tree) -> bool:
        return self.root is other.root or (
            self.root.digest is not None and self.root.digest == other.root.digest
        )

    def freeze(self, store: Callable[[str, bytes], None]) -> str:
        """Give each changed folder its digest, handing its encoding to ``store``; returns the root's."""

        def visit(folder: Folder) -> str:
            if folder.digest is None:
                for child in folder.entries.values():
                    if isinstance(child, Folder):
                        visit(child)
                data = folder.encode()
                folder.digest = hashlib.sha256(data).hexdigest()
                folder.owner = None
                store(folder.digest, data)
            return folder.digest

        return visit(self.root)

    # --- changing

    def _own(self, folder: Folder) -> Folder:
        if folder.owner is self._owner:
            return folder
        return Folder(dict(folder.entries), owner=self._owner)

    def _folder(self, path: str, *, create: bool, target: str) -> Folder:
        """The folder at ``path`` ("" is the root), made writable for this change (and its parents)."""
        self.root = node = self._own(self.root)
        if not path:
            return node
        walked = []
        for part in _split(path):
            walked.append(part)
            child = node.entries.get(part)
            if child is None:
                if not create:
                    raise NotFound(f"no directory {'/'.join(walked)!r}")
                child = Folder(owner=self._owner)
                if self._dir_count is not None:
                    self._dir_count += 1
            elif isinstance(child, FileEntry):
                raise InvalidInput(f"cannot create {target!r}: {'/'.join(walked)!r} is a file")
            else:
                child = self._own(child)
            node.entries[part] = child
            node = child
        return node

    @staticmethod
    def _parent_and_name(path: str) -> tuple[str, str]:
        parent, _, name = path.rpartition("/")
        return parent, name

    def put(self, path: str, entry: FileEntry) -> None:
        parent, name = self._parent_and_name(path)
        last = self._last
        if last is not None and last[0] == parent and last[1].owner is self._owner:
            folder = last[1]  # still this change's, and still at ``parent`` (no rename or rmdir since)
        else:
            folder = self._folder(parent, create=True, target=path)
            self._last = (parent, folder)
        old = folder.entries.get(name)
        if isinstance(old, Folder):
            raise InvalidInput(f"cannot write {path!r}: it is a directory")
        if old == entry:
            return
        if isinstance(old, FileEntry):
            self.total_bytes -= old.size
            self.file_count -= 1
        folder.entries[name] = entry
        self.total_bytes += entry.size
        self.file_count += 1
        self.changed = True

    def delete(self, path: str) -> None:
        node = self.get(path)
        if isinstance(node, Folder):
            raise InvalidInput(f"cannot delete {path!r}: it is a directory", hint="use rmdir")
        if node is None:
            raise NotFound(f"no file {path!r}")
        parent, name = self._parent_and_name(path)
        del self._folder(parent, create=False, target=path).entries[name]
        self.total_bytes -= node.size
        self.file_count -= 1
        self.changed = True

    def mkdir(self, path: str) -> None:
        node = self.get(path)
        if node is not None:
            kind = "directory" if isinstance(node, Folder) else "file"
            raise AlreadyExists(f"cannot create directory {path!r}: a {kind} of that name exists")
        self._folder(path, create=True, target=path)
        self.changed = True

    def rmdir(self, path: str) -> None:
        node = self.get(path)
        if isinstance(node, FileEntry):
            raise InvalidInput(f"cannot remove {path!r}: it is a file", hint="use delete")
        if node is None:
            raise NotFound(f"no directory {path!r}")
        if node.entries:
            # 550 over FTP (RFC 959: action not taken), as for any folder that cannot go yet.
            raise InUse(
                f"cannot remove directory {path!r}: it is not empty", hint="remove what is in it first"
            )
        parent, name = self._parent_and_name(path)
        del self._folder(parent, create=False, target=path).entries[name]
        if self._dir_count is not None:
            self._dir_count -= 1
        self._last = None
        self.changed = True

    def rename(self, src: str, dst: str) -> None:
        self._last = None
        node = self.get(src)
        if src == dst:
            if node is None:
                raise NotFound(f"no file or directory {src!r}")
            return
        target = self.get(dst)
        if isinstance(target, Folder):
            raise AlreadyExists(f"cannot rename {src!r} to {dst!r}: a directory of that name exists")
        if node is None:
            raise NotFound(f"no file or directory {src!r}")
        if isinstance(node, Folder):
            if target is not None:
                raise AlreadyExists(f"cannot rename {src!r} to {dst!r}: a file of that name exists")
            if dst.startswith(src + "/"):
                raise InvalidInput(f"cannot move directory {src!r} into itself ({dst!r})")
        # A file may replace a file, as POSIX rename and FTP RNTO do.
        src_parent, src_name = self._parent_and_name(src)
        dst_parent, dst_name = self._parent_and_name(dst)
        into = self._folder(dst_parent, create=True, target=dst)
        old = into.entries.get(dst_name)
        if isinstance(old, FileEntry):
            self.total_bytes -= old.size
            self.file_count -= 1
        del self._folder(src_parent, create=False, target=src).entries[src_name]
        into = self._folder(dst_parent, create=False, target=dst)
        into.entries[dst_name] = node
        self.changed = True


# What a path became: a file, a directory ("dir"), or nothing (None: the file or directory is gone).
Change = FileEntry | Literal["dir"] | None


def diff(old: Folder, new: Folder, prefix: str = "") -> Iterator[tuple[str, Change]]:
    """The paths that differ from ``old`` to ``new``, skipping folders with equal digests.

    Within a gone directory, its contents come before it; within a new one, it comes first.
    """
    if old is new or (old.digest is not None and old.digest == new.digest):
        return
    for name, gone in old.entries.items():
        child = new.entries.get(name)
        path = f"{prefix}{name}"
        if isinstance(gone, Folder) and not isinstance(child, Folder):
            yield from diff(gone, Folder(), path + "/")
            yield path, None
        elif isinstance(gone, FileEntry) and child is None:
            yield path, None
    for name, child in new.entries.items():
        before = old.entries.get(name)
        path = f"{prefix}{name}"
        if isinstance(child, Folder):
            if isinstance(before, Folder):
                yield from diff(before, child, path + "/")
                continue
            if before is not None:
                yield path, None
            yield path, "dir"
            yield from diff(Folder(), child, path + "/")
        elif child != before:
            yield path, child


BlobSize = Callable[[str], int]


@dataclass(frozen=True, slots=True)
class Undo:
    """What one applied op needs to be taken back: the file it replaced or removed, and the folders
    it made on its way (a put or rename makes missing parents, as mkdir -p does)."""

    op: str
    path: str
    before: FileEntry | None = None
    made: tuple[str, ...] = ()
    dst: str = ""


def _missing(tree: Tree, path: str) -> tuple[str, ...]:
    """The folders from the root down to ``path`` (itself included) that do not exist yet."""
    parts = _split(path)
    node: FileEntry | Folder | None = tree.root
    for depth, part in enumerate(parts):
        node = node.entries.get(part) if isinstance(node, Folder) else None
        if node is None:
            return tuple("/".join(parts[: n + 1]) for n in range(depth, len(parts)))
    return ()


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _undo_of(tree: Tree, op: CommitOp) -> Undo:
    """How to take ``op`` back, read from ``tree`` just before it is applied."""
    if isinstance(op, RenameOp):
        old = tree.get(op.dst)
        made = _missing(tree, _parent(op.dst)) if _parent(op.dst) else ()
        return Undo("rename", op.src, old if isinstance(old, FileEntry) else None, made, op.dst)
    if op.op == "mkdir":
        return Undo("mkdir", op.path, made=_missing(tree, op.path))
    old = tree.get(op.path)
    before = old if isinstance(old, FileEntry) else None
    made = _missing(tree, _parent(op.path)) if _parent(op.path) else ()
    return Undo(op.op, op.path, before, made)


def undo_ops(tree: Tree, undos: Sequence[Undo]) -> None:
    """Take back ops applied to ``tree`` (newest last), leaving it as it was before them."""
    for undo in reversed(undos):
        if undo.op == "rename":
            if undo.path != undo.dst:
                tree.rename(undo.dst, undo.path)
                if undo.before is not None:
                    tree.put(undo.dst, undo.before)
        elif undo.op == "rmdir":
            tree.mkdir(undo.path)
        elif undo.op in ("put", "delete"):
            if undo.before is not None:
                tree.put(undo.path, undo.before)
            elif undo.op == "put":
                tree.delete(undo.path)
        for folder in reversed(undo.made):
            tree.rmdir(folder)


def apply_ops(
    tree: Tree,
    ops: Sequence[CommitOp],
    *,
    blob_size: BlobSize,
    now: float,
    undos: list[Undo] | None = None,
) -> list[dict[str, Any]]:
    """Apply commit ops (their paths checked by the contract) to ``tree`` in order; raises on the
    first op that cannot be applied.

    ``blob_size`` gives an uploaded blob's size, or raises :class:`NotFound` when it was never uploaded.
    Returns the ops as applied (sizes and times filled in), which replay exactly; with ``undos``, also
    appends to it how to take each one back (see :func:`undo_ops`).
    """
    done: list[dict[str, Any]] = []
    for op in ops:
        if undos is not None:
            undos.append(_undo_of(tree, op))
        if isinstance(op, PutOp):
            entry = FileEntry(op.sha256, blob_size(op.sha256), now if op.mtime is None else op.mtime)
            tree.put(op.path, entry)
            done.append(
                {
                    "op": "put",
                    "path": op.path,
                    "sha256": entry.sha256,
                    "size": entry.size,
                    "mtime": entry.mtime,
                }
            )
        elif isinstance(op, RenameOp):
            tree.rename(op.src, op.dst)
            done.append(op.to_json())
        elif op.op == "delete":
            tree.delete(op.path)
            done.append(op.to_json())
        elif op.op == "mkdir":
            tree.mkdir(op.path)
            done.append(op.to_json())
        else:
            tree.rmdir(op.path)
            done.append(op.to_json())
    return done
