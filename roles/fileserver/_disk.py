"""One site's content on disk. Blocking calls: the store runs them in threads.

``<home>/content/<uid>/``::

    journal                 changes not yet in a checkpoint (see _journal.py): the durable record
    checkpoint.json         the newest version whose blobs, folders and record are all on disk
    history                 what made its last versions, and how to take them back (see _history.py)
    blobs/<sha[:2]>/<sha>   content-addressed, read-only; written to staging while hashed, then renamed
    packs/<id>.pack, .idx   many small blobs of one batch (a zip deploy) in one file, and where each is:
                            a file per blob costs an inode each, which is the dearest part of a deploy
    trees/<sha[:2]>/<sha>   one folder of a version, addressed by the sha256 of its encoding
    versions/<N>.json       one small record per version: its root folder, totals, time and source
    staging/                uploads in progress (leftovers of a crash are collected after a grace time)

Blobs, folders and version records are written without an fsync of their own: until a checkpoint
makes them durable in one ``syncfs``, the journal holds what is needed to write them again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

from shared.direct import DirectWriter
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
    """A blob being received: bytes go through sha256 and to a staging file at once (a big one
    around the page cache, see :mod:`shared.direct`)."""

    def __init__(self, staging: Path) -> None:
        staging.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=staging, prefix="upload-", suffix=".tmp")
        self.path = Path(name)
        self._fd = fd
        self._writer = DirectWriter(fd)
        self._hash = hashlib.sha256()

    @property
    def size(self) -> int:
        return self._writer.size

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self._writer.write(data)

    def write_all(self, parts: list[bytes]) -> None:
        for part in parts:
            self.write(part)

    def sync_so_far(self) -> None:
        """Put what was written so far on disk (from another thread while writes go on), so the
        fsync at the end of a big upload has little left to wait for. Direct writes are there."""
        if not self._writer.direct:
            os.fdatasync(self._fd)

    def finish(self, *, durable: bool = True) -> str:
        try:
            self._writer.finish()
            if durable:
                os.fsync(self._fd)
        finally:
            self._close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        self._writer.abort()
        self._close()
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Packed(NamedTuple):
    """Where a packed blob is: its pack's name, offset and size."""

    pack: str
    offset: int
    size: int


class SiteDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.packs = root / "packs"
        # sha -> where it is packed; read from the packs' indexes when first needed.
        self._packed: dict[str, Packed] | None = None
        self._pack_lock = threading.Lock()
        # Small blobs whose bytes are in a journal record, kept in memory until the next checkpoint
        # writes them as one pack: an upload's 226 waits for no file of its own.
        self._held: dict[str, bytes] = {}
        self.versions = root / "versions"
        self.trees = root / "trees"
        self.staging = root / "staging"
        self.journal = root / "journal"
        self.checkpoint = root / "checkpoint.json"
        self.history = root / "history"

    def blob(self, sha: str) -> Path:
        return self.blobs / sha[:2] / sha

    def blob_size(self, sha: str) -> int:
        held = self._held.get(sha)
        if held is not None:
            return len(held)
        packed = self.packed().get(sha)
        if packed is not None:
            return packed.size
        try:
            return self.blob(sha).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {sha} was never uploaded to this site", hint="upload it first") from None

    def has_blob(self, sha: str) -> bool:
        return sha in self._held or sha in self.packed() or self.blob(sha).is_file()

    def hold(self, sha: str, data: bytes) -> None:
        """Keep a small blob in memory: the journal record that puts it carries its bytes."""
        with self._pack_lock:
            self._held[sha] = data

    def held(self, sha: str) -> bytes | None:
        """A small blob's bytes if only memory (and the journal) holds them yet."""
        return self._held.get(sha)

    def write_held(self) -> None:
        """Write the held blobs as one pack (for a checkpoint, which then makes it durable)."""
        with self._pack_lock:
            held = list(self._held.items())
        if held:
            self.write_pack(held)
            with self._pack_lock:
                for sha, _ in held:
                    self._held.pop(sha, None)

    # --- packs of small blobs

    def packed(self) -> dict[str, Packed]:
        """Every packed blob (the packs' indexes are read once)."""
        with self._pack_lock:
            if self._packed is None:
                self._packed = self._read_indexes()
            return self._packed

    def _read_indexes(self) -> dict[str, Packed]:
        found: dict[str, Packed] = {}
        if not self.packs.is_dir():
            return found
        for index in self.packs.glob("*.idx"):
            pack = index.with_suffix(".pack")
            try:
                entries = json.loads(index.read_bytes())
                length = pack.stat().st_size
            except (OSError, ValueError):
                continue  # a batch a crash cut short: never committed, collected after the grace time
            for sha, offset, size in entries:
                if offset + size <= length:
                    found[str(sha)] = Packed(pack.name, int(offset), int(size))
        return found

    def write_pack(self, blobs: Sequence[tuple[str, bytes | memoryview]]) -> None:
        """Store many small blobs as one pack and its index (not yet durable: the commit that uses
        them runs one syncfs first). Blobs stored already are left out."""
        known = self.packed()
        body = io.BytesIO()
        entries: list[tuple[str, int, int]] = []
        seen: set[str] = set()
        loose = str(self.blobs)
        # Only a folder of loose blobs that exists can hold one: no stat for most blobs of a packed site.
        try:
            folders = set(os.listdir(loose))
        except FileNotFoundError:
            folders = set()
        for sha, data in blobs:
            if sha in known or sha in seen:
                continue
            path = f"{loose}/{sha[:2]}/{sha}"
            if sha[:2] in folders and os.path.isfile(path):
                os.utime(path)  # about to be committed again: spared by the GC
                continue
            seen.add(sha)
            entries.append((sha, body.tell(), len(data)))
            body.write(data)
        if not entries:
            return
        name = uuid.uuid4().hex
        # The pack before its index: an index never names bytes that are not there.
        _write_plain(self.packs / f"{name}.pack", body.getvalue(), mode=0o444)
        _write_plain(self.packs / f"{name}.idx", json.dumps(entries).encode(), mode=0o444)
        with self._pack_lock:
            assert self._packed is not None
            for sha, offset, size in entries:
                self._packed[sha] = Packed(f"{name}.pack", offset, size)

    def read_blobs(self, shas: list[str]) -> list[bytes]:
        """The bytes of each blob, packed or not; a pack is opened once per call."""
        packed = self.packed()
        out: list[bytes] = []
        fds: dict[str, int] = {}
        try:
            for sha in shas:
                held = self._held.get(sha)
                if held is not None:
                    out.append(held)
                    continue
                where = packed.get(sha)
                if where is None:
                    try:
                        out.append(self.blob(sha).read_bytes())
                    except FileNotFoundError:
                        raise NotFound(f"this site has no blob {sha}") from None
                    continue
                fd = fds.get(where.pack)
                if fd is None:
                    fd = fds[where.pack] = os.open(self.packs / where.pack, os.O_RDONLY)
                data = os.pread(fd, where.size, where.offset)
                if len(data) != where.size:
                    raise NotFound(f"packed blob {sha} of this site is damaged")
                out.append(data)
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def open_blob(self, sha: str) -> IO[bytes]:
        """The blob's bytes to read, packed or not."""
        if sha in self._held or sha in self.packed():
            (data,) = self.read_blobs([sha])
            return io.BytesIO(data)
        try:
            return self.blob(sha).open("rb")
        except FileNotFoundError:
            raise NotFound(f"this site has no blob {sha}") from None

    def blob_file(self, sha: str) -> Path:
        """A file of the blob, for what streams it (a download); a packed one is written out once."""
        path = self.blob(sha)
        if not path.is_file():
            if sha not in self._held and sha not in self.packed():
                raise NotFound(f"this site has no blob {sha}")
            (data,) = self.read_blobs([sha])
            _write_plain(path, data, mode=0o444)
        return path

    def start_upload(self) -> Upload:
        return Upload(self.staging)

    def install(self, upload: Upload, sha: str, *, durable: bool = True) -> None:
        """Move a finished upload into place; an identical blob already there is kept (and its age reset)."""
        final = self.blob(sha)
        if sha in self.packed():
            upload.path.unlink(missing_ok=True)
            return
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

    def write_history(self, data: bytes) -> None:
        _write_plain(self.history, data)

    def read_history(self) -> bytes | None:
        try:
            return self.history.read_bytes()
        except FileNotFoundError:
            return None

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
        return removed + self._collect_packs(used, cutoff)

    def _collect_packs(self, used: set[str], cutoff: float) -> int:
        """Remove packs none of whose blobs is used (a pack partly in use stays whole)."""
        if not self.packs.is_dir():
            return 0
        packed = self.packed()
        live = {where.pack for sha, where in packed.items() if sha in used}
        gone: set[str] = set()
        for path in list(self.packs.iterdir()):
            pack = path.with_suffix(".pack").name
            with contextlib.suppress(FileNotFoundError):
                if pack not in live and path.stat().st_mtime < cutoff:
                    path.unlink()
                    gone.add(pack)
        if gone:
            # Only what went: a batch may have written a pack meanwhile.
            with self._pack_lock:
                assert self._packed is not None
                self._packed = {sha: w for sha, w in self._packed.items() if w.pack not in gone}
        return len(gone)


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
