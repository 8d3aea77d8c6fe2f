"""One site's content as a publishing session sees it: the newest manifest, and writes that go to the
fileserver as commits.

An upload becomes visible only through one ``put`` of the whole file when it is complete
(:meth:`Upload.commit`); closing it without that leaves the site as it was. A small one is held in
memory until then; a big new file is sent on to the fileserver while it arrives, in a PUT whose body
ends only at the commit (an upload that continues a file is spooled whole first).
"""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, NamedTuple

from roles.publisher._cache import BlobCache, CacheFill
from roles.publisher._fileserver import FilePut, FileserverClient, FileStream
from roles.publisher._sites import SiteInfo
from shared.contracts.content import (
    CommitAnswer,
    CommitOp,
    FileStored,
    Manifest,
    VersionDiff,
    storage_room,
)
from shared.errors import NotFound, QuotaExceeded
from shared.logs import ContextLogger

__all__ = [
    "CachedDownload",
    "Download",
    "FileInfo",
    "SiteContent",
    "StreamedDownload",
    "Tree",
    "TreeShelf",
    "Upload",
]

_EXACT_FOR = 0.5
_SPOOL_MEMORY = 1024 * 1024
# A streamed download is read and sent in chunks this big.
_STREAM_CHUNK = 256 * 1024
# Files, in all sites together, of the trees kept between sessions.
_SHELF_FILES = 200_000


class FileInfo(NamedTuple):
    size: int
    mtime: float
    sha256: str


@dataclass
class Tree:
    """A manifest indexed for lookups: files, directories (``""`` is the root) and their children."""

    version: int
    total_bytes: int
    files: dict[str, FileInfo]
    dirs: set[str]
    mtime: float
    _children: dict[str, list[str]] | None = field(default=None, repr=False)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> Tree:
        files = {p: FileInfo(e.size, e.mtime, e.sha256) for p, e in manifest.files.items()}
        dirs = {""}
        dirs.update(manifest.dirs)
        for path in files:
            dirs.update(_parents(path))
        newest = max((f.mtime for f in files.values()), default=0.0)
        return cls(manifest.version, manifest.total_bytes, files, dirs, newest)

    def copy(self) -> Tree:
        return Tree(self.version, self.total_bytes, dict(self.files), set(self.dirs), self.mtime)

    def put(self, rel: str, info: FileInfo, version: int, total_bytes: int) -> None:
        if rel not in self.files:
            self._learn(rel)
        self.files[rel] = info
        self.version, self.total_bytes, self.mtime = version, total_bytes, max(self.mtime, info.mtime)

    def _learn(self, path: str) -> None:
        """The index learns a new name and any new parents (rebuilding it would cost a pass over the
        whole site for every file a mirror adds)."""
        self._add_child(path)
        for parent in _parents(path):
            if parent not in self.dirs:
                self.dirs.add(parent)
                self._add_child(parent)

    def _add_child(self, path: str) -> None:
        if self._children is not None:
            parent, name = posixpath.split(path)
            self._children.setdefault(parent, []).append(name)

    def apply_changes(self, changes: VersionDiff) -> None:
        """Bring the tree to a newer version from the fileserver's list of changed paths."""
        # Names only added (a mirror's MKD, another session's uploads) go into the index as they come;
        # anything removed, or a file where a directory was, makes it be rebuilt when next asked.
        keep_index = all(changes.dirs.values())
        for path, entry in changes.files.items():
            if entry is None:
                keep_index = False
                if self.files.pop(path, None) is None:
                    self.dirs.discard(path)
            else:
                if path in self.dirs:
                    keep_index = False
                    self.dirs.discard(path)
                elif path not in self.files:
                    self._learn(path)
                self.files[path] = FileInfo(entry.size, entry.mtime, entry.sha256)
                self.mtime = max(self.mtime, entry.mtime)
        for path in changes.new_dirs:
            if path not in self.dirs:
                if path in self.files:
                    keep_index = False
                self._learn(path)
                self.dirs.add(path)
        self.version, self.total_bytes = changes.version, changes.total_bytes
        if not keep_index:
            self._children = None

    def is_dir(self, rel: str) -> bool:
        return rel in self.dirs

    def is_file(self, rel: str) -> bool:
        return rel in self.files

    def children(self, rel: str) -> list[str]:
        if self._children is None:
            index: dict[str, list[str]] = {d: [] for d in self.dirs}
            for path in (*self.files, *self.dirs):
                if path:
                    parent, name = posixpath.split(path)
                    index[parent].append(name)
            self._children = index
        return sorted(self._children.get(rel, []))


def _parents(path: str) -> Iterator[str]:
    parts = path.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


class TreeShelf:
    """The tree each site's last session ended with, for the next session to start from: one small
    call for the changes since then instead of the whole manifest (0.1 s in a 9,000-file site, paid
    by each session's first command). Shared by the sessions' threads; a session takes a copy."""

    def __init__(self, max_files: int = _SHELF_FILES) -> None:
        self._max_files = max_files
        self._lock = threading.Lock()
        self._trees: OrderedDict[str, Tree] = OrderedDict()  # by content id, oldest use first
        self._files = 0

    def take(self, content_id: str) -> Tree | None:
        with self._lock:
            tree = self._trees.get(content_id)
            if tree is None:
                return None
            self._trees.move_to_end(content_id)
        return tree.copy()  # a kept tree is never changed, so it is copied outside the lock

    def leave(self, content_id: str, tree: Tree) -> None:
        """Keep ``tree`` (its session is done with it) unless a newer one is kept already."""
        if len(tree.files) > self._max_files:
            return
        with self._lock:
            kept = self._trees.get(content_id)
            if kept is not None:
                if kept.version >= tree.version:
                    return
                self._files -= len(kept.files)
            self._trees[content_id] = tree
            self._trees.move_to_end(content_id)
            self._files += len(tree.files)
            while self._files > self._max_files:
                _, old = self._trees.popitem(last=False)
                self._files -= len(old.files)


class SiteContent:
    """A publishing session's handle on one site; used from one thread at a time."""

    def __init__(
        self,
        site: SiteInfo,
        client: FileserverClient,
        log: ContextLogger,
        cache: BlobCache,
        shelf: TreeShelf,
    ) -> None:
        self.site = site
        self.client = client
        self.log = log
        self.cache = cache
        self._shelf = shelf
        self._tree: Tree | None = None
        self._fresh = False
        # Until then, the tree is known exact (this session's own put was the site's only change).
        self._exact_until = 0.0
        self._asked = False  # whether the fileserver was asked during the current FTP command

    def close(self) -> None:
        self.client.close()
        if self._tree is not None:
            self._shelf.leave(self.site.content_id, self._tree)
            self._tree = None

    def invalidate(self) -> None:
        """The next lookup asks the fileserver whether the site changed (once per FTP command).

        Right after this session's own upload the answer is known, and a client sending file after file
        is spared one round trip per file; another session's change shows within ``_EXACT_FOR``.
        """
        self._asked = False
        if time.monotonic() >= self._exact_until:
            self._fresh = False

    def current_tree(self) -> Tree:
        """The tree as the fileserver has it now, for an answer that would refuse the command (another
        session's MKD a moment ago is not "no directory"): asks, unless this command already did."""
        if not self._asked:
            self._fresh = False
        return self.tree()

    def tree(self) -> Tree:
        if self._tree is not None and self._fresh:
            return self._tree
        if self._tree is None:
            self._tree = self._shelf.take(self.site.content_id)
        if self._tree is not None and self._tree.version > 0:
            # One small call brings the cached tree up to date: the paths changed since its version.
            try:
                changes = self.client.changes(self.site, self._tree.version)
            except NotFound:
                changes = None  # that version is no longer kept
            if changes is not None:
                if changes.version != self._tree.version:
                    self._tree.apply_changes(changes)
                self._fresh = self._asked = True
                return self._tree
        self._tree = Tree.from_manifest(self.client.manifest(self.site))
        self._fresh = self._asked = True
        return self._tree

    def commit(self, ops: Sequence[CommitOp], *, replace: bool = False) -> CommitAnswer:
        self._fresh = False
        self._exact_until = 0.0
        return self.client.commit(self.site, ops, replace=replace, source="ftp")

    def put(self, rel: str, source: IO[bytes]) -> FileStored:
        """Store a whole file; the cached tree learns it without fetching the manifest again."""
        self._fresh = False
        self._exact_until = 0.0
        since = self._tree.version if self._tree is not None else None
        return self.stored(rel, self.client.put_file(self.site, rel, source, since=since))

    def start_put(self, rel: str) -> FilePut:
        """A put of ``rel`` whose bytes go to the fileserver as they are written."""
        self._fresh = False
        self._exact_until = 0.0
        return self.client.start_put(self.site, rel)

    def stored(self, rel: str, answer: FileStored) -> FileStored:
        """The cached tree learns this session's put without fetching the manifest again."""
        tree, changes = self._tree, answer.changes
        if tree is None or answer.version <= tree.version:
            return answer
        if answer.version == tree.version + 1:
            # Nobody else changed the site in between: this put is the whole difference.
            tree.put(
                rel, FileInfo(answer.size, time.time(), answer.sha256), answer.version, answer.total_bytes
            )
        elif (
            changes is not None
            and not changes.whole
            and (changes.since, changes.version) == (tree.version, answer.version)
        ):
            # Other sessions (a client's parallel transfers) committed meanwhile: their changes came
            # with the answer, this put among them.
            tree.apply_changes(changes)
        else:
            return answer
        # The tree is known exact for a moment (the next STOR of a mirror asks nothing first).
        self._fresh = True
        self._exact_until = time.monotonic() + _EXACT_FOR
        return answer

    def download(self, rel: str, name: str) -> Download | StreamedDownload | CachedDownload:
        seen = self._tree.files.get(rel) if self._tree is not None else None
        if seen is None or seen.size <= _SPOOL_MEMORY:
            # A small file (or one this session has not seen yet) is fetched by its path: the newest
            # bytes, in one round trip with no look at the changes first. One that turns out big goes
            # the big file's way below.
            download = Download(name)
            try:
                fetched = self.client.download(self.site, rel, download.file, limit=_SPOOL_MEMORY)
            except BaseException:
                download.close()
                raise
            if fetched is not None:
                download.file.seek(0)
                return download
            download.close()
            self._exact_until, self._fresh = 0.0, False  # it is big now: learn its sha256
        info = self.tree().files.get(rel)
        if info is not None and info.size > _SPOOL_MEMORY and time.monotonic() < self._exact_until:
            # The bytes sent are picked by sha256: ask for another session's change even right after
            # this session's own put (one small call, worth it for a big file).
            self._exact_until, self._fresh = 0.0, False
            info = self.tree().files.get(rel)
        if info is not None and info.size > _SPOOL_MEMORY:
            copy = self.cache.open(info.sha256, info.size)
            if copy is not None:
                return CachedDownload(name, copy)
            # A big file is sent on as it arrives, not fetched whole first (that doubled its time); by
            # its blob, so the bytes are those of the sha256 its copy will be kept under.
            stream = self.client.stream_blob(self.site, info.sha256, path=rel)
            return StreamedDownload(name, stream, info, self.cache.fill())
        download = Download(name)
        try:
            self.client.download(self.site, rel, download.file)
            download.file.seek(0)
        except BaseException:
            download.close()
            raise
        return download

    def start_upload(self, rel: str, name: str, *, keep_existing: bool, append: bool) -> Upload:
        """A spool for ``rel``; it may grow to what the quota leaves once the old file is replaced."""
        tree = self.tree()
        old_size = tree.files[rel].size if rel in tree.files else 0
        room = storage_room(self.site.quota_bytes, tree.total_bytes, old_size)
        upload = Upload(self, rel, name, limit=room, stream=not keep_existing)
        try:
            if keep_existing and rel in tree.files:
                self.client.download(self.site, rel, upload.file)
                upload.file.seek(0, os.SEEK_END if append else os.SEEK_SET)
        except BaseException:
            upload.close()
            raise
        return upload


class Download:
    """A small file fetched whole from the fileserver into memory, for an FTP download to send (a
    file on disk would cost an inode per download; pyftpdlib sends it without sendfile then)."""

    def __init__(self, name: str) -> None:
        self.name = name  # the virtual path, for pyftpdlib's transfer log
        self.file = io.BytesIO()

    @property
    def closed(self) -> bool:
        return self.file.closed

    def read(self, size: int = -1) -> bytes:
        return self.file.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        self.file.close()


class StreamedDownload:
    """A big file for an FTP download to send, read from the fileserver as the client takes it (in
    chunks bigger than pyftpdlib's own 64 KB: fewer trips through its loop)."""

    chunk = _STREAM_CHUNK

    def __init__(self, name: str, stream: FileStream, info: FileInfo, fill: CacheFill | None) -> None:
        self.name = name  # the virtual path, for pyftpdlib's transfer log
        self._stream = stream
        self._info = info
        self._fill = fill
        self._at = 0
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._at += len(data)
        if self._fill is not None:
            self._fill.write(data)
            if not data or self._at == self._info.size:
                self._fill.keep(self._info.sha256, self._info.size)
                self._fill = None
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Forward only, as a resumed download (REST) needs: the skipped bytes are read and dropped."""
        if whence != os.SEEK_SET or offset < self._at:
            raise OSError("a streamed download only moves forward")
        while self._at < offset and self.read(min(offset - self._at, 256 * 1024)):
            pass
        return self._at

    def tell(self) -> int:
        return self._at

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._stream.close()
            if self._fill is not None:
                self._fill.drop()


class CachedDownload:
    """A big file sent from the publisher's own copy: a real file, so pyftpdlib sends it with
    sendfile(2) on a plain data connection (and in big reads on a TLS one)."""

    chunk = _STREAM_CHUNK

    def __init__(self, name: str, file: IO[bytes]) -> None:
        self.name = name  # the virtual path, for pyftpdlib's transfer log
        self.file = file

    @property
    def closed(self) -> bool:
        return self.file.closed

    def fileno(self) -> int:
        return self.file.fileno()

    def read(self, size: int = -1) -> bytes:
        return self.file.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        self.file.close()


class Upload:
    """The file object an FTP upload writes into; :meth:`commit` publishes it, :meth:`close` drops it.

    With ``stream``, the bytes are written in order from the start: past ``_SPOOL_MEMORY`` in memory
    they go on to the fileserver as they come (the file is not written twice on the way); otherwise
    (APPE, REST) they are spooled, to memory while small, then to disk.
    """

    def __init__(self, content: SiteContent, rel: str, name: str, *, limit: int, stream: bool) -> None:
        self.content = content
        self.rel = rel
        self.name = name  # the virtual path, for pyftpdlib's transfer log
        self.limit = limit
        self._stream = stream
        self.file: IO[bytes]
        if stream:
            self.file = io.BytesIO()
        else:
            self.file = tempfile.SpooledTemporaryFile(_SPOOL_MEMORY, prefix="sitecloud-put-")  # noqa: SIM115
        self._put: FilePut | None = None
        self._fill: CacheFill | None = None  # the publisher's copy of a big one, for downloads
        self._sent = 0  # bytes handed to _put
        self._closed = False
        self.committed: FileStored | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes) -> int:
        end = self.tell() + len(data)
        if end > self.limit:
            # Fail as soon as the upload outgrows the quota, not after the whole file has arrived.
            raise QuotaExceeded(
                f"upload of /{self.rel} stopped: the site {self.content.site.name} would exceed its "
                f"quota of {self.content.site.quota_bytes} bytes",
                hint="delete files or ask for a bigger plan",
            )
        if self._put is None and self._stream and end > _SPOOL_MEMORY:
            self._put = self.content.start_put(self.rel)
            self._fill = self.content.cache.fill()
            head = self.file.getvalue()  # type: ignore[attr-defined]  # a BytesIO when streaming
            self.file = io.BytesIO()
            self._put.write(head)
            if self._fill is not None:
                self._fill.write(head)
            self._sent = len(head)
        if self._put is not None:
            self._put.write(data)
            if self._fill is not None:
                self._fill.write(data)
            self._sent += len(data)
            return len(data)
        return self.file.write(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if self._put is not None:
            raise OSError("an upload being sent on only moves forward")
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self._sent if self._put is not None else self.file.tell()

    def commit(self) -> FileStored:
        """``put`` the whole file: it appears whole or not at all."""
        if self._put is not None:
            answer = self.content.stored(self.rel, self._put.finish())
            if self._fill is not None:
                # The fileserver named the sha256 of exactly the bytes the copy holds.
                self._fill.keep(answer.sha256, answer.size)
                self._fill = None
        else:
            self.file.flush()
            self.file.seek(0)
            answer = self.content.put(self.rel, self.file)
        self.committed = answer
        self.content.log.info("stored /%s (%s bytes) as version %s", self.rel, answer.size, answer.version)
        return answer

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._put is not None and self.committed is None:
            self._put.abort()
        if self._fill is not None:
            self._fill.drop()
        self.file.close()
