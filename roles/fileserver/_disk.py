"""One site's content on disk. Blocking calls: the store runs them in threads.

``<home>/content/<uid>/``::

    blobs/<sha[:2]>/<sha>   content-addressed, read-only; written to staging while hashed, then renamed
    versions/<N>.json       one manifest per version, written atomically
    staging/                uploads in progress (leftovers of a crash are collected after a grace time)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from shared.errors import NotFound
from shared.files import atomic_write_json, fsync_dir, read_json

__all__ = ["SiteDir", "Upload", "move_to_trash", "purge_trash", "restore_from_trash"]


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

    def finish(self) -> str:
        self._file.flush()
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
        self.staging = root / "staging"

    def blob(self, sha: str) -> Path:
        return self.blobs / sha[:2] / sha

    def blob_size(self, sha: str) -> int:
        try:
            return self.blob(sha).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {sha} was never uploaded to this site", hint="upload it first") from None

    def start_upload(self) -> Upload:
        return Upload(self.staging)

    def install(self, upload: Upload, sha: str) -> None:
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
        fsync_dir(final.parent)

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

    def read_manifest(self, version: int) -> dict[str, Any]:
        try:
            manifest: dict[str, Any] = read_json(self.manifest_path(version))
        except FileNotFoundError:
            raise NotFound(f"version {version} is not kept", hint="old versions are pruned") from None
        return manifest

    def read_manifest_bytes(self, version: int) -> bytes:
        try:
            return self.manifest_path(version).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"version {version} is not kept", hint="old versions are pruned") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path(int(manifest["version"])), manifest)

    def prune(self, keep: int) -> None:
        """Drop all but the newest ``keep`` versions (their blobs go at the next collection)."""
        for version in self.version_numbers()[:-keep]:
            self.manifest_path(version).unlink(missing_ok=True)

    def collect_garbage(self, *, grace: float, now: float | None = None) -> int:
        """Remove blobs no kept version uses and stale staging files, older than ``grace`` seconds.

        Young unreferenced blobs are spared: they were just uploaded for a commit yet to come.
        Returns the number of files removed.
        """
        cutoff = (now if now is not None else time.time()) - grace
        used: set[str] = set()
        for version in self.version_numbers():
            with contextlib.suppress(FileNotFoundError):
                used.update(e["sha256"] for e in read_json(self.manifest_path(version))["files"].values())
        removed = 0
        candidates: list[Path] = []
        if self.blobs.is_dir():
            candidates += [
                b for d in self.blobs.iterdir() if d.is_dir() for b in d.iterdir() if b.name not in used
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
