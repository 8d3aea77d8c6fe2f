"""One site's content on disk. Blocking calls: the store runs them in threads.

``<home>/content/<uid>/``::

    journal                 changes not yet in a checkpoint (see _journal.py): the durable record
    checkpoint.json         the newest version whose blobs, folders and record are all on disk
    blobs/<sha[:2]>/<sha>   content-addressed, read-only; written to staging while hashed, then renamed
    trees/<sha[:2]>/<sha>   one folder of a version, addressed by the sha256 of its encoding
    versions/<N>.json       one small record per version: its root folder, totals, time and source
    staging/                uploads in progress (leftovers of a crash are collected after a grace time)

Blobs, folders and version records are written without an fsync of their own: until a checkpoint
makes them durable in one ``syncfs``, the journal holds what is needed to write them again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from shared.errors import NotFound
from shared.files import atomic_write_json, fsync_dir, read_json, syncfs

__all__ = ["SiteDir", "Upload", "move_to_trash", "purge_trash", "restore_from_trash"]


def _write_plain(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write beside ``path`` and rename over it: never half there, durable at the next checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per thread: two requests may write the same blob at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class Upload:
    """A blob being received: bytes go to a staging file and through sha256 at once."""

    def __init__(self, staging: Path) -> None:
        staging.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=staging, prefix="upload-", suffix=".tmp")
        self.path = Path(name)
        self._file: IO[bytes] = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def finish(self, *, durable: bool = True) -> str:
        self._file.flush()
        if durable:
            os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class SiteDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.versions = root / "versions"
        self.trees = root / "trees"
        self.staging = root / "staging"
        self.journal = root / "journal"
        self.checkpoint = root / "checkpoint.json"

    def blob(self, sha: str) -> Path:
        return self.blobs / sha[:2] / sha

    def blob_size(self, sha: str) -> int:
        try:
            return self.blob(sha).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {sha} was never uploaded to this site", hint="upload it first") from None

    def start_upload(self) -> Upload:
        return Upload(self.staging)

    def install(self, upload: Upload, sha: str, *, durable: bool = True) -> None:
        """Move a finished upload into place; an identical blob already there is kept (and its age reset)."""
        final = self.blob(sha)
        if final.exists():
            upload.path.unlink(missing_ok=True)
            # The GC spares young unreferenced blobs: this one is about to be committed again.
            os.utime(final)
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(upload.path, 0o444)
        os.replace(upload.path, final)
        if durable:
            fsync_dir(final.parent)

    def restore_blob(self, sha: str, data: bytes) -> None:
        """Write a blob again from the journal when the copy on disk is missing or not whole."""
        path = self.blob(sha)
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size == len(data) and hashlib.sha256(path.read_bytes()).hexdigest() == sha:
                return
        _write_plain(path, data, mode=0o444)

    # --- folders and version records

    def folder_path(self, digest: str) -> Path:
        return self.trees / digest[:2] / digest

    def write_folder(self, digest: str, data: bytes, *, check: bool = False) -> None:
        """Store a folder once; ``check`` rewrites one a crash left short (replay)."""
        path = self.folder_path(digest)
        if path.exists():
            if not check:
                return
            with contextlib.suppress(OSError):
                if hashlib.sha256(path.read_bytes()).hexdigest() == digest:
                    return
        _write_plain(path, data, mode=0o444)

    def read_folder(self, digest: str) -> bytes:
        try:
            data = self.folder_path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"folder {digest} of this site is not stored") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise NotFound(f"folder {digest} of this site is damaged")
        return data

    def write_version(self, record: dict[str, Any]) -> None:
        _write_plain(self.manifest_path(int(record["version"])), json.dumps(record).encode())

    def read_checkpoint(self) -> dict[str, Any] | None:
        try:
            value: dict[str, Any] = read_json(self.checkpoint)
        except FileNotFoundError:
            return None
        return value

    def write_checkpoint(self, record: dict[str, Any]) -> None:
        """Everything written so far becomes durable, then the checkpoint names the version it holds."""
        syncfs(self.root)
        atomic_write_json(self.checkpoint, record)

    def version_numbers(self) -> list[int]:
        if not self.versions.is_dir():
            return []
        numbers = []
        for entry in self.versions.iterdir():
            stem, dot, ext = entry.name.partition(".")
            if dot and ext == "json" and stem.isdigit():
                numbers.append(int(stem))
        return sorted(numbers)

    def manifest_path(self, version: int) -> Path:
        return self.versions / f"{version}.json"

    def read_version(self, version: int) -> dict[str, Any]:
        try:
            record: dict[str, Any] = read_json(self.manifest_path(version))
        except (FileNotFoundError, ValueError):
            raise NotFound(f"version {version} is not kept", hint="old versions are pruned") from None
        return record

    def drop_versions(self, versions: list[int]) -> None:
        """Drop version records (their folders and blobs go at the next collection)."""
        for version in versions:
            self.manifest_path(version).unlink(missing_ok=True)

    def _in_use(self, roots: list[str]) -> tuple[set[str], set[str]]:
        """The folders and blobs reachable from ``roots`` (each shared folder is read once)."""
        folders: set[str] = set()
        blobs: set[str] = set()
        todo = list(roots)
        while todo:
            digest = todo.pop()
            if digest in folders:
                continue
            folders.add(digest)
            try:
                node = json.loads(self.folder_path(digest).read_bytes())
            except (OSError, ValueError):
                continue
            todo.extend(node["d"].values())
            blobs.update(entry[0] for entry in node["f"].values())
        return folders, blobs

    def collect_garbage(self, roots: list[str], *, grace: float, now: float | None = None) -> int:
        """Remove blobs and folders no version in ``roots`` uses, and stale staging files, older than
        ``grace`` seconds.

        Young unreferenced blobs are spared: they were just uploaded for a commit yet to come.
        Returns the number of files removed.
        """
        cutoff = (now if now is not None else time.time()) - grace
        folders, used = self._in_use(roots)
        removed = 0
        candidates: list[Path] = []
        if self.blobs.is_dir():
            candidates += [
                b for d in self.blobs.iterdir() if d.is_dir() for b in d.iterdir() if b.name not in used
            ]
        if self.trees.is_dir():
            candidates += [
                t for d in self.trees.iterdir() if d.is_dir() for t in d.iterdir() if t.name not in folders
            ]
        if self.staging.is_dir():
            candidates += list(self.staging.iterdir())
        for path in candidates:
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed


def _trash_entries(trash: Path, uid: str) -> list[tuple[int, Path]]:
    if not trash.is_dir():
        return []
    out = []
    for entry in trash.iterdir():
        name, dot, stamp = entry.name.rpartition(".")
        if dot and name == uid and stamp.isdigit():
            out.append((int(stamp), entry))
    return sorted(out)


def move_to_trash(root: Path, trash: Path) -> Path:
    trash.mkdir(parents=True, exist_ok=True)
    stamp = int(time.time())
    while (target := trash / f"{root.name}.{stamp}").exists():
        stamp += 1
    os.replace(root, target)
    return target


def restore_from_trash(root: Path, trash: Path) -> bool:
    """Bring back the newest trashed content of a site whose uid is served again."""
    entries = _trash_entries(trash, root.name)
    if root.exists() or not entries:
        return False
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(entries[-1][1], root)
    return True


def purge_trash(trash: Path, *, older_than: float) -> list[str]:
    """Delete trashed site content older than ``older_than`` seconds; returns what went."""
    if not trash.is_dir():
        return []
    cutoff = time.time() - older_than
    gone = []
    for entry in trash.iterdir():
        _, dot, stamp = entry.name.rpartition(".")
        if dot and stamp.isdigit() and int(stamp) < cutoff:
            shutil.rmtree(entry, ignore_errors=True)
            gone.append(entry.name)
    return gone
