"""Manifests and commit ops: pure functions over a site's file tree, no filesystem access.

A manifest is ``{"site", "version", "total_bytes", "files": {path: {sha256, size, mtime}}, "dirs": [...]}``.
Paths are relative POSIX paths from :func:`shared.paths.site_relpath`. The tree keeps one invariant:
every ancestor of a file or directory is itself in ``dirs``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shared.errors import AlreadyExists, InvalidInput, NotFound
from shared.paths import site_relpath

__all__ = [
    "SHA256_RE",
    "Tree",
    "apply_ops",
    "check_sha256",
    "empty_manifest",
    "human_size",
]

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_OPS = 200_000

FileEntry = dict[str, Any]


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


def empty_manifest(site: str) -> dict[str, Any]:
    return {"site": site, "version": 0, "total_bytes": 0, "files": {}, "dirs": []}


def _parents(path: str) -> Iterable[str]:
    parts = path.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def _under(path: str, prefix: str) -> bool:
    return path.startswith(prefix + "/")


@dataclass
class Tree:
    """A site's files and directories while ops are applied to it."""

    files: dict[str, FileEntry] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Tree:
        return cls(
            files={p: dict(e) for p, e in manifest["files"].items()},
            dirs=set(manifest["dirs"]),
        )

    @property
    def total_bytes(self) -> int:
        return sum(int(e["size"]) for e in self.files.values())

    def manifest(self, site: str, version: int) -> dict[str, Any]:
        return {
            "site": site,
            "version": version,
            "total_bytes": self.total_bytes,
            "files": dict(sorted(self.files.items())),
            "dirs": sorted(self.dirs),
        }

    def same_as(self, manifest: dict[str, Any]) -> bool:
        return self.files == manifest["files"] and self.dirs == set(manifest["dirs"])

    def _make_parents(self, path: str) -> None:
        for parent in _parents(path):
            if parent in self.files:
                raise InvalidInput(f"cannot create {path!r}: {parent!r} is a file")
            self.dirs.add(parent)

    def _has_children(self, path: str) -> bool:
        return any(_under(p, path) for p in self.files) or any(_under(d, path) for d in self.dirs)

    def put(self, path: str, entry: FileEntry) -> None:
        if path in self.dirs:
            raise InvalidInput(f"cannot write {path!r}: it is a directory")
        self._make_parents(path)
        self.files[path] = entry

    def delete(self, path: str) -> None:
        if path in self.dirs:
            raise InvalidInput(f"cannot delete {path!r}: it is a directory", hint="use rmdir")
        if path not in self.files:
            raise NotFound(f"no file {path!r}")
        del self.files[path]

    def mkdir(self, path: str) -> None:
        if path in self.dirs or path in self.files:
            kind = "directory" if path in self.dirs else "file"
            raise AlreadyExists(f"cannot create directory {path!r}: a {kind} of that name exists")
        self._make_parents(path)
        self.dirs.add(path)

    def rmdir(self, path: str) -> None:
        if path in self.files:
            raise InvalidInput(f"cannot remove {path!r}: it is a file", hint="use delete")
        if path not in self.dirs:
            raise NotFound(f"no directory {path!r}")
        if self._has_children(path):
            raise InvalidInput(f"cannot remove directory {path!r}: it is not empty")
        self.dirs.discard(path)

    def rename(self, src: str, dst: str) -> None:
        if src == dst:
            if src not in self.files and src not in self.dirs:
                raise NotFound(f"no file or directory {src!r}")
            return
        if dst in self.dirs:
            raise AlreadyExists(f"cannot rename {src!r} to {dst!r}: a directory of that name exists")
        if src in self.files:
            # A file may replace a file, as POSIX rename and FTP RNTO do.
            self._make_parents(dst)
            self.files[dst] = self.files.pop(src)
            return
        if src not in self.dirs:
            raise NotFound(f"no file or directory {src!r}")
        if dst in self.files:
            raise AlreadyExists(f"cannot rename {src!r} to {dst!r}: a file of that name exists")
        if _under(dst, src):
            raise InvalidInput(f"cannot move directory {src!r} into itself ({dst!r})")
        self._make_parents(dst)

        def moved(p: str) -> str:
            return dst + p[len(src) :]

        self.files = {moved(p) if _under(p, src) else p: e for p, e in self.files.items()}
        self.dirs = {moved(d) if d == src or _under(d, src) else d for d in self.dirs}


BlobSize = Callable[[str], int]


def _path(op: dict[str, Any], key: str) -> str:
    value = op.get(key)
    if not isinstance(value, str):
        raise InvalidInput(f"op {op.get('op')!r} needs a string {key!r}")
    return site_relpath(value, allow_root=False)


def apply_ops(tree: Tree, ops: object, *, blob_size: BlobSize, now: float) -> None:
    """Apply commit ops to ``tree`` in order; raises on the first op that cannot be applied.

    ``blob_size`` gives an uploaded blob's size, or raises :class:`NotFound` when it was never uploaded.
    """
    if not isinstance(ops, list):
        raise InvalidInput("'ops' must be a list")
    if len(ops) > MAX_OPS:
        raise InvalidInput(f"a commit may have at most {MAX_OPS} ops")
    for op in ops:
        if not isinstance(op, dict):
            raise InvalidInput("each op must be a JSON object")
        kind = op.get("op")
        if kind == "put":
            path = _path(op, "path")
            sha = check_sha256(op.get("sha256"))
            mtime = op.get("mtime", now)
            if not isinstance(mtime, int | float) or isinstance(mtime, bool):
                raise InvalidInput(f"put {path!r}: 'mtime' must be a number")
            tree.put(path, {"sha256": sha, "size": blob_size(sha), "mtime": float(mtime)})
        elif kind == "delete":
            tree.delete(_path(op, "path"))
        elif kind == "mkdir":
            tree.mkdir(_path(op, "path"))
        elif kind == "rmdir":
            tree.rmdir(_path(op, "path"))
        elif kind == "rename":
            tree.rename(_path(op, "from"), _path(op, "to"))
        else:
            raise InvalidInput(f"unknown op {kind!r}", hint="ops are put, delete, mkdir, rmdir and rename")
