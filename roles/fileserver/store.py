"""The content store: every served site's versions, quota checks, and the change feed.

Sites are known by name from the pushed snapshot and stored by their immutable uid, so a site deleted
and created again under the same name starts empty. Each site has one lock: commits, blob installs and
garbage collection of a site happen one at a time; blocking filesystem work runs in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roles.fileserver._disk import SiteDir, Upload, move_to_trash, purge_trash, restore_from_trash
from roles.fileserver._history import History
from roles.fileserver._journal import Journal, Record, read_records, truncate
from roles.fileserver._manifest import (
    FileEntry,
    Folder,
    Tree,
    Undo,
    apply_ops,
    check_sha256,
    diff,
    human_size,
    walk,
)
from roles.fileserver._zip import ZipMember
from roles.fileserver.config import FileserverConfig
from roles.fileserver.feed import ChangeFeed
from shared.contracts.content import (
    BLOB_BATCH_MAX,
    SITE_ENTRIES_MAX,
    BlobStored,
    CommitAnswer,
    CommitOp,
    CommitRequest,
    FileStored,
    PutOp,
    RollbackAnswer,
    SiteContentInfo,
    SiteVersions,
    VersionEntry,
    VersionList,
    encode_diff,
    encode_manifest,
    over_quota,
)
from shared.contracts.health import FileserverFigures
from shared.contracts.snapshots import FileserverSnapshot
from shared.disk import disk_space, is_disk_full
from shared.errors import (
    Changed,
    InvalidInput,
    NotFound,
    QuotaExceeded,
    SitecloudError,
    StorageUnavailable,
    TooManyEntries,
    Unavailable,
)
from shared.files import syncfs
from shared.logs import get_logger
from shared.paths import site_relpath
from shared.states import HealthStatus

__all__ = ["ContentStore"]

_FLUSH_BYTES = 1024 * 1024
# A big upload is put on disk every this many bytes while it arrives, not all by the fsync at its end.
_SYNC_BYTES = 32 * 1024 * 1024
# Blobs up to this size travel in the journal record that puts them: one fsync for both.
_INLINE_BYTES = 1024 * 1024
# A journal is folded into a checkpoint when it grows past this, and every few seconds otherwise.
_CHECKPOINT_BYTES = 64 * 1024 * 1024
_CHECKPOINT_EVERY = 5.0
_RECENT = 64
# Commits of up to this many ops are applied on the event loop (a file by file change).
_INLINE_OPS = 8
_BATCH_READ_BYTES = 64 * 1024 * 1024
# A published version follows its fsync at once; past this, something is wrong (never seen).
_READABLE_WAIT = 30.0
# A put answers the changes since the uploader's version up to this many paths (a parallel mirror's
# sessions interleave a few files each); more, and the uploader asks for them.
_PUT_CHANGES_LIMIT = 256
_QUOTA_HINT = "delete files, or move the site to a plan with more storage"


@dataclass
class _Site:
    name: str
    uid: str
    quota_bytes: int
    disk: SiteDir
    # The plan's retention: a version goes once it is neither among the last ``keep_versions`` versions
    # or publishes nor younger than ``keep_days`` (0: the fileserver's default count, no age rule).
    keep_versions: int = 0
    keep_days: float = 0.0
    # What readers see: the newest version whose journal record is on disk.
    version: int = 0
    tree: Tree = field(default_factory=Tree)
    # Where commits build on: may be ahead of ``version`` while its record waits for an fsync.
    head_version: int = 0
    head: Tree = field(default_factory=Tree)
    # Kept version records (number -> record), oldest first: pruning walks it from there.
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    # Versions whose tree left ``recent`` before a checkpoint wrote it (a burst of uploads between two
    # checkpoints, beyond the plan's last N): they can no longer be served, and leave ``records`` at
    # the next prune, under the lock a checkpoint holds while it reads them.
    ghosts: list[int] = field(default_factory=list)
    # The kept versions that are publishes of their own, oldest first: a deploy, a rollback, or the
    # last upload of a run of FTP uploads. Retention keeps the last N of these besides the last N
    # versions, so one FTP session of many files does not push every earlier deploy out.
    milestones: deque[int] = field(default_factory=deque)
    journal: Journal | None = None
    checkpointed: int = 0
    checkpointing: bool = False
    # Blobs written without an fsync that no journal record carries: one syncfs before a commit uses them.
    unsynced: set[str] = field(default_factory=set)
    manifest_cache: tuple[int, bytes] | None = None
    # The newest versions' trees (at least every kept one), kept in memory (they share all but their changed folders) so the
    # difference to a recent version costs only the changed paths.
    recent: dict[int, Tree] = field(default_factory=dict)
    # Folder encodings made since the last checkpoint, written to disk by the next one.
    pending: dict[str, bytes] = field(default_factory=dict)
    # Version records on disk that retention dropped: the next checkpoint removes their files.
    dropped: list[int] = field(default_factory=list)
    # What made the newest versions, kept after retention drops them (see ``ContentStore.diff``).
    history: History = field(default_factory=History)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Set (and replaced) each time ``version`` moves on, for answers that wait to be readable.
    published: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def total_bytes(self) -> int:
        return self.tree.total_bytes


def _store_batch(disk: SiteDir, buffer: bytearray, frames: list[tuple[int, int]]) -> list[tuple[str, int]]:
    """Blocking: hash a batch's blobs (framed in ``buffer``) and write them as one pack."""
    with memoryview(buffer) as view:
        blobs = [(hashlib.sha256(view[o : o + n]).hexdigest(), view[o : o + n]) for o, n in frames]
        disk.write_pack(blobs)
        stored = [(sha, len(data)) for sha, data in blobs]
        for _, data in blobs:
            data.release()
    return stored


def _load_folder(disk: SiteDir, digest: str, cache: dict[str, Folder]) -> Folder:
    folder = cache.get(digest)
    if folder is None:
        folder = Folder.decode(disk.read_folder(digest), lambda d: _load_folder(disk, d, cache))
        folder.digest = digest
        cache[digest] = folder
    return folder


def _load_tree(disk: SiteDir, record: dict[str, Any], cache: dict[str, Folder] | None = None) -> Tree:
    root = _load_folder(disk, str(record["root"]), {} if cache is None else cache)
    dirs = record.get("dirs")
    return Tree(
        root,
        total_bytes=int(record["total_bytes"]),
        file_count=int(record["files"]),
        dir_count=None if dirs is None else int(dirs),
    )


def _version_record(version: int, tree: Tree, root: str | None, source: str, now: float) -> dict[str, Any]:
    return {
        "version": version,
        "root": root,
        "total_bytes": tree.total_bytes,
        "files": tree.file_count,
        "dirs": tree.dir_count,
        "time": now,
        "source": source,
    }


def _publishes(records: dict[int, dict[str, Any]]) -> deque[int]:
    """The kept versions that are publishes of their own: all but an FTP upload another one follows."""
    numbers = list(records)
    # Each with the one after it (none after the last; none at all with no version kept).
    following: list[int | None] = [*numbers[1:], None] if numbers else []
    return deque(
        n
        for n, after in zip(numbers, following, strict=True)
        if after is None or not (records[n]["source"] == "ftp" == records[after]["source"])
    )


def _load_site(site: _Site, trash: Path) -> tuple[bool, int]:
    """Read a site's newest version from disk and replay its journal; returns whether its content came
    back from the trash, and how many journal records were replayed."""
    restored = restore_from_trash(site.disk.root, trash)
    disk = site.disk
    if not disk.root.is_dir():
        return restored, 0
    cache: dict[str, Folder] = {}
    checkpoint = disk.read_checkpoint()
    numbers = disk.version_numbers()
    tree, version = Tree(), 0
    history = History()
    if checkpoint is not None:
        version = int(checkpoint["version"])
        if version:
            tree = _load_tree(disk, checkpoint, cache)
        raw = disk.read_history()
        if raw is not None:
            history = History.decode(raw)
    elif numbers:
        # Content stored as flat manifests by an older fileserver: each kept one becomes a tree.
        for number in numbers:
            manifest = disk.read_version(number)
            if "root" in manifest:
                continue
            tree = Tree()
            for path, entry in manifest["files"].items():
                tree.put(path, FileEntry(entry["sha256"], int(entry["size"]), float(entry["mtime"])))
            for path in manifest["dirs"]:
                if tree.get(path) is None:
                    tree.mkdir(path)
            root = tree.freeze(disk.write_folder)
            disk.write_version(
                _version_record(number, tree, root, "deploy", disk.manifest_path(number).stat().st_mtime)
            )
            version = number
    replayed = 0
    if disk.journal.exists():
        journal = Journal(disk.journal)
        raw = journal.open()
        journal.close()
        for record, _ in read_records(raw):
            header = record.header
            number = int(header["v"])
            if number <= version:
                continue
            if number != version + 1:
                break
            if record.data:
                disk.restore_blob(str(header["blob"]), record.data)
            if "rollback" in header:
                base = disk.read_version(int(header["rollback"]))
                tree = _load_tree(disk, base, cache)
                history.add(number, flipped=True, undos=None)
            else:
                replace = bool(header.get("replace"))
                tree = Tree() if replace else tree.begin()
                sizes = {op["sha256"]: int(op["size"]) for op in header["ops"] if op["op"] == "put"}
                ops = CommitRequest.parse({"ops": header["ops"]}, what="journal record").ops
                undos: list[Undo] | None = None if replace else []
                apply_ops(tree, ops, blob_size=sizes.__getitem__, now=float(header["t"]), undos=undos)
                # As the commit remembered it, so a worker behind is answered as it was before the restart.
                history.add(number, flipped=str(header["src"]) != "ftp", undos=undos)
            root = tree.freeze(lambda d, b: disk.write_folder(d, b, check=True))
            disk.write_version(_version_record(number, tree, root, str(header["src"]), float(header["t"])))
            version = number
            replayed += 1
    for number in disk.version_numbers():
        with contextlib.suppress(NotFound):
            kept = disk.read_version(number)
            if number <= version and "root" in kept:
                kept["written"] = True
                site.records[number] = kept
    site.milestones = _publishes(site.records)
    # Written by a checkpoint that did not finish (or by an older fileserver): it is not this version's.
    site.history = history if history.newest == version else History()
    if version or replayed:
        root = tree.freeze(disk.write_folder)
        disk.write_history(site.history.encode())
        disk.write_checkpoint(_version_record(version, tree, root, "checkpoint", time.time()))
        if disk.journal.exists():
            truncate(disk.journal)
    # Records a crash left past the journal's end were never acknowledged: their numbers are free.
    disk.drop_versions([n for n in disk.version_numbers() if n > version])
    site.version = site.head_version = site.checkpointed = version
    site.tree = site.head = tree
    # Counted here, in a thread, rather than by the first commit on the event loop.
    _ = tree.dir_count
    return restored, replayed


def _freed_bytes(before: Tree, after: Tree, undos: list[Undo] | None) -> int:
    """The bytes of files ``before`` held that ``after`` does not (by content): what keeping the
    version before costs the disk beside this one. An upper bound (content kept at another path
    counts too), so history bounded by it stays within the quota. ``undos`` None: a whole new tree."""
    if undos is None:
        kept = {e.sha256 for _, e in walk(after.root) if isinstance(e, FileEntry)}
        return sum(e.size for _, e in walk(before.root) if isinstance(e, FileEntry) and e.sha256 not in kept)
    freed = 0
    for undo in undos:
        old = undo.before
        if old is None:
            continue
        now = after.get(undo.dst if undo.op == "rename" else undo.path)
        if not (isinstance(now, FileEntry) and now.sha256 == old.sha256):
            freed += old.size
    return freed


def _carry_freed(records: dict[int, dict[str, Any]], gone: set[int]) -> None:
    """Versions leave from between kept ones: what they freed is freed by the next kept one now (its
    version before is further back), so the sum over kept versions stays an upper bound."""
    carry, after_kept = 0, False
    for number, record in records.items():
        if number in gone:
            if after_kept:
                carry += record.get("freed", 0)
        else:
            if carry:
                record["freed"] = record.get("freed", 0) + carry
                carry = 0
            after_kept = True


def _quota_message(site: _Site, total: int) -> str:
    return f"site {site.name} would use {human_size(total)} of its {human_size(site.quota_bytes)} quota"


def _check_entries(site: _Site, tree: Tree) -> None:
    """Refuse a change that grows a site past :data:`SITE_ENTRIES_MAX` files and folders; one that
    does not grow it passes, so a site already past the limit can always be made smaller."""
    entries = tree.entry_count
    if entries > SITE_ENTRIES_MAX and entries > site.head.entry_count:
        raise TooManyEntries(
            f"site {site.name} would hold {entries:,} files and folders; "
            f"a site may hold at most {SITE_ENTRIES_MAX:,}",
            hint="delete files or folders first, or spread the content over more sites",
        )


class ContentStore:
    def __init__(self, config: FileserverConfig) -> None:
        self.config = config
        self._content = config.home / "content"
        self._trash = config.home / "trash"
        self.feed = ChangeFeed(config.state_dir / "feed.json")
        self._sites: dict[str, _Site] = {}
        self._apply_lock = asyncio.Lock()
        self._applied = False
        self._log = get_logger(config.role, host=config.host)
        # Running totals for metrics: versions made, blobs stored (and their bytes).
        self.commits = 0
        self._tasks: set[asyncio.Future[None]] = set()
        self.blobs_received = 0
        self.blob_bytes_received = 0

    async def open(self) -> None:
        await asyncio.to_thread(self.feed.open)

    async def close(self) -> None:
        for task in list(self._tasks):
            try:
                await task
            except Exception:  # its failure is no reason to skip the checkpoint below
                self._log.exception("background work failed while the store closed")
        # A clean stop leaves every journal folded in: the next start replays nothing.
        await self.checkpoint_all()
        await self.feed.close()

    # --- snapshot -------------------------------------------------------------------------------

    async def apply_snapshot(self, snapshot: FileserverSnapshot) -> None:
        """Serve exactly the snapshot's sites; content of sites that left it goes to the trash."""
        wanted = snapshot.sites
        async with self._apply_lock:
            old = self._sites
            # Keyed by uid: the same content keeps its lock and state even if its name changed.
            known = {s.uid: s for s in old.values()}
            new: dict[str, _Site] = {}
            fresh: list[_Site] = []
            announce: list[_Site] = []
            for name, want in wanted.items():
                uid, quota = want.content_id, want.quota_bytes
                site = known.get(uid)
                if site is None:
                    site = _Site(name, uid, quota, SiteDir(self._content / uid))
                    fresh.append(site)
                    announce.append(site)
                elif site.name != name:
                    site.name = name
                    announce.append(site)
                site.quota_bytes = quota
                site.keep_versions, site.keep_days = want.keep_versions, float(want.keep_days)
                new[name] = site
            for site in fresh:
                restored, replayed = await asyncio.to_thread(_load_site, site, self._trash)
                if restored:
                    self._log.bind(site=site.name).info("restored content of uid %s from the trash", site.uid)
                if replayed:
                    self._log.bind(site=site.name).info(
                        "replayed %s journal records: version %s", replayed, site.version
                    )
            self._sites = new
            kept = {s.uid for s in new.values()}
            for site in old.values():
                if site.uid not in kept:
                    # Its journal folded in first: the trash holds plain versions, no file stays open.
                    await self.checkpoint(site)
                    async with site.lock:
                        if site.journal is not None:
                            site.journal.close()
                            site.journal = None
                        await self._trash_uid(site.uid, site.name)
            # Content left by sites this process never knew (a snapshot applied before a crash).
            for uid in await asyncio.to_thread(self._uids_on_disk):
                if uid not in kept:
                    await self._trash_uid(uid, None)
            if self._applied:
                # A site that is new (or new under an old name) has a version workers should learn.
                for site in announce:
                    await self.feed.publish(site.name, site.version)
            self._applied = True
        await self.purge_trash()

    def _uids_on_disk(self) -> list[str]:
        if not self._content.is_dir():
            return []
        return [p.name for p in self._content.iterdir() if p.is_dir()]

    async def _trash_uid(self, uid: str, name: str | None) -> None:
        root = self._content / uid
        if await asyncio.to_thread(root.exists):
            target = await asyncio.to_thread(move_to_trash, root, self._trash)
            self._log.bind(site=name).info(
                "site uid %s is no longer served: content moved to %s", uid, target
            )

    async def purge_trash(self) -> None:
        gone = await asyncio.to_thread(purge_trash, self._trash, older_than=self.config.trash_days * 86400)
        for name in gone:
            self._log.info("purged %s from the trash", name)

    # --- reads ----------------------------------------------------------------------------------

    def site(self, name: str, uid: str | None = None) -> _Site:
        """The site of ``name``; with ``uid``, only if the name is that site's here too (a worker told
        of a new site under an old name before this fileserver was must not get the old one's)."""
        site = self._sites.get(name)
        if site is None:
            raise NotFound(f"site {name} is not served by this fileserver")
        if uid is not None and site.uid != uid:
            # One of the two configs is behind the other: retried, the call finds them agreeing.
            self._log.bind(site=name).warning(
                "asked for uid %s, but the name is uid %s here: refused until the configs agree",
                uid,
                site.uid,
            )
            raise StorageUnavailable(
                hint=f"site {name} was just created again or swapped; try again in a moment"
            )
        return site

    def health(self) -> FileserverFigures:
        space = disk_space(self.config.home)
        # Nearly full, it still serves (downloads, workers' syncs, uploads while they fit): a warning
        # to the admin before uploads are refused with storage_full, not a reason to route around it.
        full = space.nearly_full
        return FileserverFigures(
            sites=len(self._sites),
            total_bytes=sum(s.total_bytes for s in self._sites.values()),
            seq=self.feed.seq,
            disk_free_bytes=space.free,
            disk_bytes=space.total,
            status=HealthStatus.DEGRADED if full else HealthStatus.READY,
            reason=(
                f"its disk is nearly full ({space.describe()}): uploads are refused once it is full; "
                "free or add disk space on this host"
            )
            if full
            else None,
        )

    def info(self, name: str, uid: str | None = None) -> SiteContentInfo:
        site = self.site(name, uid)
        return SiteContentInfo(
            site=site.name, version=site.version, total_bytes=site.total_bytes, quota_bytes=site.quota_bytes
        )

    def versions(self) -> SiteVersions:
        return SiteVersions(seq=self.feed.seq, sites={n: s.version for n, s in sorted(self._sites.items())})

    async def _tree_of(self, site: _Site, version: int, *, head: bool = False) -> Tree:
        newest = site.head_version if head else site.version
        if version == newest:
            return site.head if head else site.tree
        if version < 1 or version > newest:
            raise NotFound(f"site {site.name} has no version {version} (newest is {newest})")
        recent = site.recent.get(version)
        if recent is not None:
            return recent
        record = site.records.get(version)
        if record is None or record["root"] is None:
            raise NotFound(
                f"version {version} of site {site.name} is no longer kept",
                hint=self._retention(site),
            )
        return await asyncio.to_thread(_load_tree, site.disk, record)

    async def manifest_bytes(self, name: str, version: int | None, uid: str | None = None) -> bytes:
        """A version's manifest (the newest when ``version`` is None)."""
        site = self.site(name, uid)
        wanted = site.version if version is None else version
        if wanted == 0 and site.version == 0:
            return encode_manifest(site.name, 0, 0, [], [])
        cached = site.manifest_cache
        if cached is not None and cached[0] == wanted:
            return cached[1]
        tree = await self._tree_of(site, wanted)
        body = await asyncio.to_thread(tree.manifest, site.name, wanted)
        if wanted == site.version:
            site.manifest_cache = (wanted, body)
        return body

    async def diff(
        self, name: str, since: int, version: int | None, limit: int | None = None, uid: str | None = None
    ) -> bytes:
        """The paths that differ between two versions, for a worker that has ``since``; with ``limit``,
        a difference that is whole or longer comes without its paths (the worker builds anew then).

        ``since`` may be a version retention has dropped (under a trickle of FTP changes, the last N go
        within a second): its tree is then rebuilt from a newer one by taking back what came after it.
        A ``version`` dropped meanwhile is answered with the newest (the answer says which)."""
        site = self.site(name, uid)
        wanted = site.version if version is None else version
        try:
            new = await self._tree_of(site, wanted) if wanted else Tree()
        except NotFound:
            if wanted >= site.version:
                raise
            wanted, new = site.version, site.tree
        # A deploy or rollback in between flips the site whole: a worker builds it anew, not file by file.
        whole = since == 0 or any(self._flipped(site, n) for n in range(since + 1, wanted + 1))
        files: list[tuple[str, FileEntry | None]] = []
        dirs: list[str] = []
        if not (whole and limit is not None):
            old = Tree() if since == 0 else await self._past_tree(site, since, wanted, new)
            for path, change in diff(old.root, new.root):
                if change == "dir":
                    dirs.append(path)
                else:
                    files.append((path, change))
                if limit is not None and len(files) + len(dirs) > limit:
                    whole, files, dirs = True, [], []
                    break
        return encode_diff(
            site.name,
            since=since,
            version=wanted,
            total_bytes=new.total_bytes,
            whole=whole,
            files=files,
            dirs=dirs,
        )

    @staticmethod
    def _flipped(site: _Site, version: int) -> bool:
        """Whether ``version`` changed the site whole; a version neither remembered nor kept counts as
        one (a worker that builds anew is slower, never wrong)."""
        known = site.history.flipped(version)
        if known is not None:
            return known
        record = site.records.get(version)
        return record is None or record["source"] != "ftp"

    async def _past_tree(self, site: _Site, since: int, wanted: int, new: Tree) -> Tree:
        """The tree of ``since``: kept, or rebuilt from ``wanted``'s by taking back what came after."""
        try:
            return await self._tree_of(site, since)
        except NotFound as err:
            if since > wanted:
                raise
            past = site.history.rewind(new, wanted, since)
            if past is None:
                raise err from None
            return past

    def version_list(self, name: str, uid: str | None = None) -> VersionList:
        site = self.site(name, uid)
        return VersionList(
            versions=[
                VersionEntry(
                    version=n,
                    time=float(r["time"]),
                    source=r["source"],
                    files=int(r["files"]),
                    total_bytes=int(r["total_bytes"]),
                )
                for n, r in site.records.items()
                # Listed only if it can be served (see ``ghosts``).
                if n <= site.version and (r["root"] is not None or n in site.recent)
            ],
            current=site.version or None,
        )

    async def zip_members(
        self, name: str, version: int | None, uid: str | None = None
    ) -> tuple[int, list[ZipMember]]:
        """What a zip of a version holds (the newest when ``version`` is None): its files, and its empty
        directories so that unpacking it gives the same tree."""
        site = self.site(name, uid)
        wanted = site.version if version is None else version
        tree = Tree() if wanted == 0 and site.version == 0 else await self._tree_of(site, wanted)
        members = []
        for path, entry in walk(tree.root):
            if isinstance(entry, FileEntry):
                members.append(
                    ZipMember(path, functools.partial(site.disk.open_blob, entry.sha256), entry.mtime)
                )
            elif not entry.entries:
                members.append(ZipMember(path, None, time.time()))
        return wanted, sorted(members, key=lambda m: m.path)

    async def blob_path(self, name: str, sha: str, uid: str | None = None) -> Path:
        site = self.site(name, uid)
        try:
            return await asyncio.to_thread(site.disk.blob_file, check_sha256(sha))
        except NotFound:
            raise NotFound(f"site {site.name} has no blob {sha}") from None

    async def read_blobs(self, name: str, shas: list[str], uid: str | None = None) -> list[bytes]:
        """Several blobs at once, in the order asked (a worker fetching a site's many small files)."""
        site = self.site(name, uid)
        try:
            blobs = await asyncio.to_thread(site.disk.read_blobs, shas)
        except NotFound as err:
            raise NotFound(f"site {site.name}: {err}") from None
        if sum(len(b) for b in blobs) > _BATCH_READ_BYTES:
            raise InvalidInput(f"ask for at most {_BATCH_READ_BYTES} bytes of blobs at once")
        return blobs

    def _newest_file(self, name: str, path: str, uid: str | None) -> tuple[_Site, FileEntry]:
        site = self.site(name, uid)
        rel = site_relpath(path, allow_root=False)
        entry = site.tree.get(rel)
        if isinstance(entry, Folder):
            raise InvalidInput(f"{rel!r} in site {site.name} is a directory")
        if entry is None:
            raise NotFound(f"site {site.name} has no file {rel!r}")
        return site, entry

    async def file_bytes(self, name: str, path: str, uid: str | None = None) -> bytes | None:
        """A small file of the newest version, whole (None for a big one: see :meth:`file_path`).

        Read from memory or its pack: a file of its own would cost a packed blob a create (0.1-0.5 ms
        on this VM's ext4) and the download a thread per chunk."""
        site, entry = self._newest_file(name, path, uid)
        if entry.size > _INLINE_BYTES:
            return None
        held = site.disk.held(entry.sha256)
        if held is not None:
            return held
        (data,) = await asyncio.to_thread(site.disk.read_blobs, [entry.sha256])
        return data

    async def file_path(self, name: str, path: str, uid: str | None = None) -> Path:
        """The blob holding a file of the newest version."""
        site, entry = self._newest_file(name, path, uid)
        return await asyncio.to_thread(site.disk.blob_file, entry.sha256)

    # --- writes ---------------------------------------------------------------------------------

    def _too_big(self, site: _Site, size: int, *, known: bool) -> QuotaExceeded:
        return QuotaExceeded(
            f"a file of {'' if known else 'at least '}{human_size(size)} does not fit in "
            f"site {site.name}'s {human_size(site.quota_bytes)} quota",
            hint=_QUOTA_HINT,
        )

    async def _receive(
        self, site: _Site, chunks: AsyncIterator[bytes], length: int | None, *, keep: int
    ) -> tuple[Upload, str, bytes | None]:
        """Stream a body to a staging file while hashing it; a body of at most ``keep`` bytes is also
        returned whole (it goes into the journal, so the file needs no fsync of its own)."""
        if length is not None and length > site.quota_bytes:
            raise self._too_big(site, length, known=True)
        upload: Upload = await asyncio.to_thread(site.disk.start_upload)
        # One batch is written and hashed in a thread while the next arrives (no copies on the way).
        writing: asyncio.Future[None] | None = None
        syncing: asyncio.Future[None] | None = None
        synced = 0
        try:
            batch: list[bytes] = []
            batched = 0
            kept = bytearray()
            received = 0
            async for chunk in chunks:
                received += len(chunk)
                if received > site.quota_bytes:
                    raise self._too_big(site, received, known=length is not None)
                if received <= keep:
                    kept += chunk
                batch.append(chunk)
                batched += len(chunk)
                if batched >= _FLUSH_BYTES:
                    if writing is not None:
                        await writing
                    writing = asyncio.ensure_future(asyncio.to_thread(upload.write_all, batch))
                    batch, batched = [], 0
                    if received - synced >= _SYNC_BYTES and (syncing is None or syncing.done()):
                        synced = received
                        syncing = asyncio.ensure_future(asyncio.to_thread(upload.sync_so_far))
            if writing is not None:
                await writing
                writing = None
            if syncing is not None:
                await syncing
                syncing = None
            small = received <= keep
            await asyncio.to_thread(upload.write_all, batch)
            # A small blob is made durable by the journal record that carries it, or by one syncfs
            # before the commit that uses it; a big one by its own fsync.
            sha = await asyncio.to_thread(upload.finish, durable=not small)
            return upload, sha, bytes(kept) if small else None
        except BaseException:
            pending = {f for f in (writing, syncing) if f is not None and not f.done()}
            if pending:
                await asyncio.wait(pending)
            await asyncio.to_thread(upload.discard)
            raise

    async def upload_blob(
        self, name: str, chunks: AsyncIterator[bytes], length: int | None, uid: str | None = None
    ) -> BlobStored:
        """Store a streamed blob; refused as soon as it alone passes the site's quota."""
        site = self.site(name, uid)
        upload, sha, small = await self._receive(site, chunks, length, keep=_INLINE_BYTES)
        try:
            async with site.lock:
                await asyncio.to_thread(site.disk.install, upload, sha, durable=small is None)
                if small is not None:
                    site.unsynced.add(sha)
        except BaseException:
            await asyncio.to_thread(upload.discard)
            raise
        self.blobs_received += 1
        self.blob_bytes_received += upload.size
        return BlobStored(sha256=sha, size=upload.size)

    async def upload_blobs(
        self, name: str, chunks: AsyncIterator[bytes], uid: str | None = None
    ) -> list[tuple[str, int]]:
        """Store many small blobs sent in one body as ``size (8 bytes, big-endian) | bytes`` frames.

        Like single small blobs they get no fsync of their own: the commit that uses them makes them
        durable with one syncfs, so a deploy of thousands of files costs one round trip per batch.
        Returns each blob's sha256 and size, in the order sent.
        """
        site = self.site(name, uid)
        buffer = bytearray()
        # (offset, size) of each blob's bytes in ``buffer``: hashed and stored in one go at the end.
        frames: list[tuple[int, int]] = []
        at = received = 0
        async for chunk in chunks:
            received += len(chunk)
            if received > site.quota_bytes + 8 * BLOB_BATCH_MAX:
                raise self._too_big(site, received, known=False)
            buffer += chunk
            while len(buffer) - at >= 8:
                size = int.from_bytes(buffer[at : at + 8], "big")
                if size > site.quota_bytes:
                    raise self._too_big(site, size, known=True)
                if len(buffer) - at < 8 + size:
                    break
                frames.append((at + 8, size))
                at += 8 + size
                if len(frames) > BLOB_BATCH_MAX:
                    raise InvalidInput(f"a batch may hold at most {BLOB_BATCH_MAX} blobs")
        if at != len(buffer):
            raise InvalidInput("the batch ends inside a frame: each is an 8-byte size, then that many bytes")

        # One pack for the whole batch: an inode per blob would cost more than all the rest.
        stored = await asyncio.to_thread(_store_batch, site.disk, buffer, frames)
        async with site.lock:
            site.unsynced.update(sha for sha, _ in stored)
        self.blobs_received += len(stored)
        self.blob_bytes_received += sum(size for _, size in stored)
        return stored

    async def put_file(
        self,
        name: str,
        path: str,
        chunks: AsyncIterator[bytes],
        length: int | None,
        uid: str | None = None,
    ) -> FileStored:
        """Store a file's bytes and put it at ``path`` in one step, durable once its journal record is."""
        site = self.site(name, uid)
        rel = site_relpath(path, allow_root=False)
        if length is not None and length <= _INLINE_BYTES:
            # A small file is taken whole in memory: one write of its blob, no staging file.
            if length > site.quota_bytes:
                raise self._too_big(site, length, known=True)
            body = bytearray()
            async for chunk in chunks:
                body += chunk
            small: bytes | None = bytes(body)
            sha = hashlib.sha256(body).hexdigest()
            size = len(body)
            # Its bytes go into the journal record: no file until the next checkpoint writes a pack.
            site.disk.hold(sha, bytes(body))
        else:
            upload, sha, small = await self._receive(site, chunks, length, keep=_INLINE_BYTES)
            size = upload.size
            try:
                async with site.lock:
                    await asyncio.to_thread(site.disk.install, upload, sha, durable=small is None)
            except BaseException:
                await asyncio.to_thread(upload.discard)
                raise
        self.blobs_received += 1
        self.blob_bytes_received += size
        # Built, not validated: the path went through site_relpath above and the sha256 is our own (a
        # validation per uploaded file is a noticeable share of what an FTP upload costs here).
        ops = [PutOp.model_construct(path=rel, sha256=sha)]
        # Into the site the bytes were stored for, even if the name went to another one meanwhile.
        answer = await self.commit(
            name, ops, replace=False, source="ftp", blob=(sha, small or b""), uid=site.uid
        )
        return FileStored.model_construct(
            version=answer.version, total_bytes=answer.total_bytes, sha256=sha, size=size
        )

    async def put_answer(self, name: str, stored: FileStored, since: int | None, uid: str | None) -> bytes:
        """The JSON a put answers with: ``stored``, and the paths other commits changed between the
        uploader's version ``since`` and this one (sparing it a round trip), if any and not too many."""
        answer = stored.to_json()
        del answer["changes"]  # written below, as the diff's own JSON, when there are any
        body = json.dumps(answer).encode()
        if since is None or since + 1 >= stored.version:
            return body
        try:
            changes = await self.diff(name, since, stored.version, _PUT_CHANGES_LIMIT, uid)
        except NotFound:
            changes = b"null"  # ``since`` is no longer kept: the uploader asks for the manifest
        return body[:-1] + b', "changes": ' + changes + b"}"

    async def commit(
        self,
        name: str,
        ops: Sequence[CommitOp],
        *,
        replace: bool,
        source: str = "deploy",
        blob: tuple[str, bytes] | None = None,
        uid: str | None = None,
    ) -> CommitAnswer:
        """Apply ops all or nothing as a new version; an idempotent commit makes no new version.

        The answer comes once the version's journal record is on disk; commits that arrive meanwhile
        share the next fsync.
        """
        site = self.site(name, uid)
        async with site.lock:
            # The name may have gone, or gone to another site, while this waited for the lock.
            self.site(name, site.uid)
            version, now, started = site.head_version + 1, time.time(), time.monotonic()
            try:
                if not replace and len(ops) <= _INLINE_OPS:
                    # A file or two (an FTP upload): cheaper here than a hop to a thread and back.
                    made = self._apply(site, ops, replace, version, source, now)
                else:
                    made = await asyncio.to_thread(self._apply, site, ops, replace, version, source, now)
            except SitecloudError:
                await self._readable(site, site.head_version)
                raise
            if made is None:
                await self._readable(site, site.head_version)
                return CommitAnswer.model_construct(
                    version=site.head_version, total_bytes=site.head.total_bytes
                )
            tree, done, record, undos = made
            wanted = {op["sha256"] for op in done if op["op"] == "put"}
            data = b""
            if blob is not None and blob[1]:
                data = blob[1]
                site.unsynced.discard(blob[0])
            applied = time.monotonic()
            if site.unsynced & wanted:
                await asyncio.to_thread(syncfs, site.disk.root)
                site.unsynced -= wanted
            synced = time.monotonic()
            header: dict[str, Any] = {"v": version, "t": now, "src": source, "replace": replace, "ops": done}
            if data:
                header["blob"] = blob[0] if blob else None
            # A deploy's record (an op per file) is encoded and written off the loop.
            offset = await self._append(site, Record(header, data), in_thread=len(done) > _INLINE_OPS)
            self._remember(site, version, record)
            site.history.add(version, flipped=source != "ftp", undos=undos)
            site.head, site.head_version = tree, version
        await self._publish(site, site.journal, offset, version, tree)
        if len(done) > _INLINE_OPS:
            # A deploy's commit: where its time went (blobs made durable by one syncfs, the record by fsync).
            self._log.bind(site=site.name).info(
                "version %s: %s ops applied in %.2f s, blobs synced in %.2f s, journaled in %.2f s",
                version,
                len(done),
                applied - started,
                synced - applied,
                time.monotonic() - synced,
            )
        return CommitAnswer.model_construct(version=version, total_bytes=tree.total_bytes)

    async def rollback(
        self, name: str, version: int | None, *, if_newest: int | None = None, uid: str | None = None
    ) -> RollbackAnswer:
        """A new version with the content of an earlier one (the one before the newest by default);
        with ``if_newest``, only while that is still the newest version."""
        site = self.site(name, uid)
        async with site.lock:
            self.site(name, site.uid)
            if if_newest is not None and site.head_version != if_newest:
                raise Changed(
                    f"site {site.name} has changed since version {if_newest} (it is at {site.head_version})",
                    hint="nothing was rolled back",
                )
            target = site.head_version - 1 if version is None else version
            if target < 1 or target >= site.head_version or target not in site.records:
                kept = sorted(n for n in site.records if n < site.head_version)
                listed = f"kept: {', '.join(map(str, kept)) or 'none'}"
                if target == site.head_version:
                    raise NotFound(f"version {target} is site {site.name}'s content now", hint=listed)
                if 1 <= target < site.head_version:
                    raise NotFound(
                        f"version {target} of site {site.name} is no longer kept",
                        hint=f"{self._retention(site)}; {listed}",
                    )
                raise NotFound(
                    f"site {site.name} has no earlier version {target} to roll back to", hint=listed
                )
            tree = await self._tree_of(site, target, head=True)
            if over_quota(site.quota_bytes, tree.total_bytes, site.head.total_bytes):
                raise QuotaExceeded(_quota_message(site, tree.total_bytes), hint=_QUOTA_HINT)
            _check_entries(site, tree)
            number = site.head_version + 1
            now = time.time()
            offset = await self._append(
                site, Record({"v": number, "t": now, "src": "rollback", "rollback": target})
            )
            record = _version_record(number, tree, None, "rollback", now)
            record["rollback_of"] = target
            record["freed"] = _freed_bytes(site.head, tree, None)
            self._remember(site, number, record)
            site.history.add(number, flipped=True, undos=None)
            site.head, site.head_version = tree, number
        await self._publish(site, site.journal, offset, number, tree)
        return RollbackAnswer(version=number, total_bytes=tree.total_bytes, rolled_back_to=target)

    async def _readable(self, site: _Site, version: int) -> None:
        """Return once readers see ``version``. A commit refused (or changing nothing) was decided on
        the head, which runs ahead of what readers see while its record waits for an fsync; answered
        at once, an FTP session told "that directory exists" asked for the directory next and was told
        there is none. Waited for under the site's lock: a rare answer, and a short wait."""
        if site.version >= version:
            return
        assert site.journal is not None  # the head is ahead: its record was appended
        # That record's fsync (a failure raises here as it does for its committer).
        await site.journal.sync(site.journal.written)
        while site.version < version:
            # Its committer publishes it as soon as it runs again after that same fsync.
            try:
                await asyncio.wait_for(site.published.wait(), _READABLE_WAIT)
            except TimeoutError:
                raise Unavailable(
                    f"version {version} of site {site.name} is on disk but not published yet",
                    hint="try again in a moment",
                ) from None

    async def _append(self, site: _Site, record: Record, *, in_thread: bool = False) -> int:
        if site.journal is None:
            journal = Journal(site.disk.journal)
            await asyncio.to_thread(journal.open)
            site.journal = journal
        if in_thread:
            # Safe under the site's lock: the only appender, and no compaction meanwhile.
            return await asyncio.to_thread(site.journal.append, record)
        return site.journal.append(record)

    def _keep(self, site: _Site) -> int:
        return site.keep_versions or self.config.keep_versions

    def _retention(self, site: _Site) -> str:
        return f"the last {self._keep(site)} versions and publishes are kept" + (
            f", and those of the last {site.keep_days:g} days" if site.keep_days else ""
        )

    def _remember(self, site: _Site, number: int, record: dict[str, Any]) -> None:
        """Add a new version's record, then apply the plan's retention."""
        records, milestones = site.records, site.milestones
        last = milestones[-1] if milestones else None
        if last == number - 1 and record["source"] == "ftp" == records[last]["source"]:
            # The run of uploads goes on: its previous version is no longer where it ends.
            milestones.pop()
        records[number] = record
        milestones.append(number)
        self._prune(site)

    def _prune(self, site: _Site) -> None:
        """Drop the versions the plan's retention no longer keeps: a version stays while it is among
        the last N versions, or among the last N publishes (``milestones``), or younger than D days.

        Oldest first, stopping at the first one among the last N or younger than D days: ``records``
        is in version order, which is time order, so a commit costs the versions it drops and the
        older publishes it keeps (at most N), not the thousands a plan's days may keep.
        """
        records, keep, milestones = site.records, self._keep(site), site.milestones
        # A checkpoint may have written a ghost meanwhile: then it is kept like any other.
        gone = {n for n in site.ghosts if n in records and records[n]["root"] is None}
        _carry_freed(records, gone)
        for number in gone:
            del records[number]
            if number in milestones:
                milestones.remove(number)
        site.ghosts.clear()
        cutoff = time.time() - site.keep_days * 86400
        oldest_kept_publish = milestones[-keep] if len(milestones) >= keep else 0
        publishes = iter(milestones)
        publish = next(publishes, None)
        doomed: list[int] = []
        left = len(records)
        for number, record in records.items():
            if left <= keep or float(record["time"]) >= cutoff:
                break
            left -= 1
            while publish is not None and publish < number:
                publish = next(publishes, None)
            if number != publish or number < oldest_kept_publish:
                doomed.append(number)
        self._drop(site, doomed)
        self._trim_to_quota(site)

    def _drop(self, site: _Site, numbers: list[int]) -> None:
        records, milestones = site.records, site.milestones
        _carry_freed(records, set(numbers))
        for number in numbers:
            # Only a checkpointed version has a file; the next checkpoint removes it, off the loop.
            if records.pop(number).get("written"):
                site.dropped.append(number)
            site.recent.pop(number, None)
            if number in milestones:
                milestones.remove(number)

    def _trim_to_quota(self, site: _Site) -> None:
        """Older versions cost the disk the files they alone hold (``freed``): they go, oldest first,
        while the site's history with its newest version would pass its quota, whatever the plan's
        retention keeps. So a site never holds more than its quota on the fileserver, however often it
        deploys a site near its quota."""
        records = site.records
        if len(records) < 2:
            return
        numbers = list(records)
        held = records[numbers[-1]]["total_bytes"] + sum(records[n].get("freed", 0) for n in numbers[1:])
        doomed: list[int] = []
        for oldest, after in itertools.pairwise(numbers):
            if held <= site.quota_bytes:
                break
            doomed.append(oldest)
            held -= records[after].get("freed", 0)  # (that one is the oldest now: it costs nothing)
        if doomed:
            self._log.bind(site=site.name).info(
                "dropped versions %s-%s: with them the site would hold more than its quota",
                doomed[0],
                doomed[-1],
            )
            self._drop(site, doomed)

    async def _publish(
        self, site: _Site, journal: Journal | None, offset: int, version: int, tree: Tree
    ) -> None:
        assert journal is not None
        await journal.sync(offset)
        self.commits += 1
        site.recent[version] = tree
        while len(site.recent) > max(_RECENT, self._keep(site) + 1):
            # The last N publishes keep their trees until a checkpoint writes them, as the last N
            # versions do: a burst of uploads right after a deploy must not make it unservable.
            protected = set(itertools.islice(reversed(site.milestones), self._keep(site)))
            gone = min(n for n in site.recent if n not in protected)
            del site.recent[gone]
            record = site.records.get(gone)
            if record is not None and record["root"] is None:
                site.ghosts.append(gone)
        if version > site.version:
            site.version, site.tree = version, tree
            published, site.published = site.published, asyncio.Event()
            published.set()
            await self.feed.publish(site.name, version)
            if self._log.isEnabledFor(logging.DEBUG):
                self._log.bind(site=site.name).debug(
                    "version %s: %s files, %s", version, tree.file_count, human_size(tree.total_bytes)
                )
        if journal.size > _CHECKPOINT_BYTES and not site.checkpointing:
            self._background(self.checkpoint(site))

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _apply(
        self, site: _Site, ops: Sequence[CommitOp], replace: bool, version: int, source: str, now: float
    ) -> tuple[Tree, list[dict[str, Any]], dict[str, Any], list[Undo] | None] | None:
        """Blocking: the new tree, its ops as applied, its version record and how to take it back
        (None for a deploy that replaces the site)."""
        tree = Tree() if replace else site.head.begin()
        undos: list[Undo] | None = None if replace else []
        done = apply_ops(tree, ops, blob_size=site.disk.blob_size, now=now, undos=undos)
        if replace:
            # A deploy of what is there already makes no version: compare the two by their digests.
            if tree.freeze(site.pending.__setitem__) == site.head.freeze(site.pending.__setitem__):
                return None
        elif not tree.changed:
            return None
        total = tree.total_bytes
        if over_quota(site.quota_bytes, total, site.head.total_bytes):
            raise QuotaExceeded(_quota_message(site, total), hint=_QUOTA_HINT)
        _check_entries(site, tree)
        record = _version_record(version, tree, None, source, now)
        record["freed"] = _freed_bytes(site.head, tree, undos)
        # Its folders and record reach the disk at the next checkpoint: until then the journal has them.
        return tree, done, record, undos

    async def checkpoint(self, site: _Site) -> None:
        """Write what only the journal holds (folders, version records), make it all durable, then
        drop those records from the journal."""
        if site.checkpointing or site.journal is None:
            return
        site.checkpointing = True
        try:
            async with site.lock:
                journal = site.journal
                if journal is None:
                    return
                upto, version, tree = journal.written, site.head_version, site.head
                root = await asyncio.to_thread(self._write_versions, site)
            record = _version_record(version, tree, root, "checkpoint", time.time())
            await asyncio.to_thread(site.disk.write_checkpoint, record)
            async with site.lock:
                if site.journal is journal:
                    await journal.compact(upto)
                    site.checkpointed = version
                    if journal.size == 0:
                        # An idle site holds no file open, nor disk space for records to come.
                        journal.close(release=True)
                        site.journal = None
        finally:
            site.checkpointing = False

    @staticmethod
    def _write_versions(site: _Site) -> str:
        """Blocking, under the site's lock: give kept versions their root digests and write their folders
        and records (not yet durable); returns the head's root digest."""
        # Small blobs only the journal had so far: one pack, durable with the rest.
        site.disk.write_held()
        if site.dropped:
            site.disk.drop_versions(site.dropped)
            site.dropped.clear()
        for number, record in site.records.items():
            if record["root"] is None:
                kept = site.recent.get(number)
                if kept is None:
                    continue
                record["root"] = kept.freeze(site.pending.__setitem__)
        root = site.head.freeze(site.pending.__setitem__)
        for digest, data in site.pending.items():
            site.disk.write_folder(digest, data)
        site.pending.clear()
        # Beside the head it ends at: durable with the checkpoint, and read back at the next start.
        site.disk.write_history(site.history.encode())
        for record in site.records.values():
            if record["root"] is not None and not record.get("written"):
                site.disk.write_version(record)
                record["written"] = True
        return root

    # --- upkeep ---------------------------------------------------------------------------------

    async def collect_garbage(self) -> None:
        for site in list(self._sites.values()):
            # Every kept version's folders on disk first: only then do they tell what is in use.
            await self.checkpoint(site)
            async with site.lock:
                # Versions that aged out since the last commit (or a plan that now keeps fewer).
                self._prune(site)
                if site.dropped:
                    # Their files go before their folders can: no record left pointing at nothing.
                    await asyncio.to_thread(site.disk.drop_versions, list(site.dropped))
                    site.dropped.clear()
                if site.journal is not None or site.head.root.digest is None:
                    continue  # changed since: next time
                roots = [str(r["root"]) for r in site.records.values() if r["root"] is not None]
                roots.append(site.head.root.digest)
                removed = await asyncio.to_thread(
                    site.disk.collect_garbage, roots, grace=self.config.upload_grace
                )
            if removed:
                self._log.bind(site=site.name).info("collected %s unused blobs, folders and uploads", removed)
        await self.purge_trash()

    async def checkpoint_all(self) -> None:
        """Checkpoint every site with a journal; one that fails (its log says why) leaves the others
        to be done, and its journal keeps what it holds for the next try."""
        for site in list(self._sites.values()):
            if site.journal is not None:
                await self._upkeep(
                    f"checkpoint of site {site.name}", functools.partial(self.checkpoint, site)
                )

    async def _upkeep(self, what: str, work: Callable[[], Awaitable[None]]) -> None:
        try:
            await work()
        except Exception as exc:
            if is_disk_full(exc):
                # The host's condition: one line each round until space is freed, not a traceback.
                self._log.warning("%s failed, the disk is full (%s); trying again later", what, exc)
            else:
                self._log.exception("%s failed; trying again later", what)

    async def maintain(self, stop: asyncio.Event) -> None:
        """Checkpoint journals every few seconds and collect garbage every ``gc_interval`` until ``stop``.
        Garbage is collected even when checkpoints fail: on a full disk, it is what frees space."""
        next_gc = 0.0
        while not stop.is_set():
            await self.checkpoint_all()
            if time.monotonic() >= next_gc:
                await self._upkeep("garbage collection", self.collect_garbage)
                next_gc = time.monotonic() + self.config.gc_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(self.config.gc_interval, _CHECKPOINT_EVERY))
