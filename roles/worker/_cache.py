"""The worker's content cache on disk (blocking calls; the sync runs them in threads).

Layout under the worker's apps root (its home, or a directory apps can reach: see ``_layout.py``)::

    blobs/<sha[:2]>/<sha>          verified content, by SHA-256 (shared by every site and version)
    packs/<name>.pack              small blobs fetched together, in one file (see ``_packs.py``)
    sites/<site>/uid               which incarnation of the site the directory holds (its content id)
    sites/<site>/v<N>/             a built version: its folders, and hard links to blobs
    sites/<site>/v<N>.files        a static version's index of its small files, served from packs
    sites/<site>/current -> v<N>   flipped atomically (a new symlink renamed over the old one)
    sites/<site>/edited            names v<N> once file-by-file changes were applied to it in place
    trash/                         whole site directories on their way out

A blob that no version links to any more has a link count of 1; that is how it is found unreferenced.
A pack is unreferenced when no index names it.

A site whose content or settings show an app keeps every file in its version directory (apps see
their site as files): its blobs that came in packs are copied out. A static site's version has only
its folders and large files there; its small files are in its index (no inode per file).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import itertools
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from roles.worker._fallback import Fallbacks, fallbacks
from roles.worker._packs import (
    CHANGES_SUFFIX,
    FOLD_CHANGES_AT,
    INDEX_SUFFIX,
    IndexBuilder,
    PackedFile,
    PackStore,
    VersionFiles,
    changes_path,
    index_packs,
    index_path,
    packed_file,
    write_changes,
)
from roles.worker._static import web_root
from shared.contracts.content import FileMeta
from shared.files import fsync_dir

__all__ = ["ContentCache", "SiteVersion", "version_line", "version_tag"]

# v<N>, or v<N>-<hex> when version N is built again beside itself (its files moved out of packs).
_VERSION_DIR = re.compile(r"^v([0-9]+)(?:-[0-9a-f]{8})?$")

# ext2/3/4 inode flags (linux/fs.h): "top of a directory hierarchy" for the Orlov allocator.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


def spread_subdirs(directory: Path) -> None:
    """Ask ext4 to place ``directory``'s sub-folders in block groups of their own (``chattr +T``).

    A new file's inode goes in its folder's block group, and ext4 without a journal passes over every
    inode freed there in the last few minutes before it takes one (``recently_deleted``): in a group
    where other trees were just removed, each create scans thousands of them (0.1-0.5 ms a file
    instead of 20 us). Folders spread over many groups mostly land where nothing was freed lately.
    A hint only: other filesystems refuse the call, and nothing else changes.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        flags = array.array("i", [0])  # the kernel reads and writes an int
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        if not flags[0] & _FS_TOPDIR_FL:
            flags[0] |= _FS_TOPDIR_FL
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags, True)
    except OSError:
        pass
    finally:
        os.close(fd)


def version_tag(content_id: str, number: int) -> bytes:
    """What a front end's cache names a version by: content id and number, so never another site's
    nor an earlier site's of the same name."""
    return f"{content_id or '-'}.{number}".encode()


def version_line(tag: bytes) -> bytes:
    """The header line an answer that may be kept carries its version in (b"" for none)."""
    return b"X-Sitecloud-Version: " + tag + b"\r\n" if tag else b""


@dataclass(frozen=True, slots=True)
class SiteVersion:
    number: int
    # realpath of the version directory: requests are checked to stay inside it.
    root: str
    # The site's content id: a site deleted and made again under its name has a new one.
    content_id: str = ""
    # What a front end's cache names this version by (content id and number: never another site's, nor an
    # earlier site's of the same name), and the header line a cacheable answer carries it in.
    tag: bytes = field(init=False, repr=False, compare=False)
    line: bytes = field(init=False, repr=False, compare=False)
    # Its small files kept in packs (none for a version whose files are all in its directory).
    files: VersionFiles = field(init=False, repr=False, compare=False)
    # The folder its visitors see as "/" (see web_root), and what a path with no file gets (its
    # 404 page, a single-page app's page: see _fallback.py), each found on first use.
    found_web: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    found_fallbacks: list[Fallbacks] = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def web(self) -> str:
        if not self.found_web:
            self.found_web.append(web_root(self.root, self.files))
        return self.found_web[0]

    @property
    def fallbacks(self) -> Fallbacks:
        if not self.found_fallbacks:
            self.found_fallbacks.append(fallbacks(self.root, self.web, self.files))
        return self.found_fallbacks[0]

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", VersionFiles(self.root))
        if self.number == 0:
            # A directory changed in place before a restart: its number is unknown, so nothing names it.
            object.__setattr__(self, "tag", b"")
            object.__setattr__(self, "line", b"")
            return
        tag = version_tag(self.content_id, self.number)
        object.__setattr__(self, "tag", tag)
        object.__setattr__(self, "line", version_line(tag))


class ContentCache:
    def __init__(self, root: Path) -> None:
        # Blobs and version trees share a filesystem: versions are hard links to blobs.
        self.blobs = root / "blobs"
        self.sites = root / "sites"
        self.trash = root / "trash"
        for d in (self.blobs, self.sites, self.trash):
            d.mkdir(parents=True, exist_ok=True)
        self.packs = PackStore(root / "packs")
        self.packs.load()
        # Every new inode of the cache is a blob, made in one of blobs/'s 256 folders.
        spread_subdirs(self.blobs)
        # The blob folders known to exist (``blobs/<sha[:2]>``).
        self._folders: set[str] = set()
        # Names for downloads in progress: unique in this process, and a restart's are collected.
        self._tmp_prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self._tmp_numbers = itertools.count()

    # -- blobs

    def blob_path(self, sha: str) -> Path:
        return self.blobs / sha[:2] / sha

    def has_blob(self, sha: str) -> bool:
        return self.packs.has(sha) or self.blob_path(sha).is_file()

    def missing_blobs(self, files: Iterable[FileMeta | None]) -> list[FileMeta]:
        """The blobs of ``files`` not in the cache yet, each once (one stat per blob, no Path objects:
        a zip deploy asks this of 20,000 files)."""
        blobs = str(self.blobs)
        missing: list[FileMeta] = []
        seen: set[str] = set()
        for meta in files:
            if meta is None or meta.sha256 in seen:
                continue
            sha = meta.sha256
            seen.add(sha)
            if self.packs.has(sha):
                continue
            try:
                if stat.S_ISREG(os.stat(f"{blobs}/{sha[:2]}/{sha}").st_mode):
                    continue
            except OSError:
                pass
            missing.append(meta)
        return missing

    def _folder(self, sha: str) -> str:
        folder = f"{self.blobs}/{sha[:2]}"
        if sha[:2] not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(sha[:2])
        return folder

    def new_blob_file(self, sha: str) -> tuple[int, str]:
        """A temporary file in the folder the blob goes to: its rename stays in that folder, and
        downloads in parallel do not all queue on one directory's lock."""
        tmp = f"{self._folder(sha)}/.tmp-{self._tmp_prefix}{next(self._tmp_numbers)}"
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), tmp

    def commit_blob(self, tmp: str, sha: str, mtime: float) -> None:
        """Move a verified download into place (a rename: readers see all of it or nothing)."""
        os.chmod(tmp, 0o644)
        if mtime > 0:
            os.utime(tmp, (mtime, mtime))
        os.replace(tmp, self.blob_path(sha))

    def write_pack(self, blobs: list[tuple[str, bytes]]) -> None:
        """Store verified small blobs fetched together as one pack."""
        self.packs.write(blobs)

    def _place(self, sha: str, dest: str, mtime: float, *, link: bool) -> None:
        """Make ``dest`` a file with blob ``sha``'s bytes: a hard link to the blob, or a copy.

        Only a site no app sees gets links (``link``): an app could read another site's use of the same
        bytes from the inode it would share with it (its link count, and the mtime of the first copy).
        """
        blob = f"{self.blobs}/{sha[:2]}/{sha}"
        if link:
            try:
                os.link(blob, dest)
                return
            except FileNotFoundError:
                if not self.packs.has(sha):
                    raise
            except OSError as exc:
                if exc.errno not in (errno.EMLINK, errno.EXDEV):
                    raise
                # A blob shared by very many files hit the filesystem's link limit (or blobs ended up
                # on another filesystem): copy it.
                self._copy(blob, dest, mtime)
                return
        elif not self.packs.has(sha):
            self._copy(blob, dest, mtime)
            return
        # Only in a pack: this version keeps its files in its directory (an app's site).
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(self.packs.read(sha))
            while view:
                view = view[os.write(fd, view) :]
            if mtime > 0:
                os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)

    @staticmethod
    def _copy(blob: str, dest: str, mtime: float) -> None:
        shutil.copyfile(blob, dest)  # (sendfile / copy_file_range: in the kernel)
        os.chmod(dest, 0o644)
        if mtime > 0:
            os.utime(dest, (mtime, mtime))

    def _packed(self, meta: FileMeta) -> PackedFile | None:
        where = self.packs.location(meta.sha256)
        if where is None:
            return None
        return packed_file(*where, meta.mtime if meta.mtime > 0 else time.time(), meta.sha256)

    def collect_blobs(self) -> int:
        """Drop blobs no version links to, packs no version's index names (and stale downloads);
        return the bytes that remain."""
        referenced: set[str] = set()
        for site in os.scandir(self.sites):
            with contextlib.suppress(OSError):
                for found in os.scandir(site.path):
                    if found.name.endswith((INDEX_SUFFIX, CHANGES_SUFFIX)):
                        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                            referenced.update(index_packs(found.path))
        total = self.packs.collect(referenced)
        for entry in os.scandir(self.blobs):
            if entry.name.startswith(".tmp-"):
                Path(entry.path).unlink(missing_ok=True)
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            for blob in os.scandir(entry.path):
                st = blob.stat(follow_symlinks=False)
                # A download's temporary file has one link too: collection never runs during one.
                if st.st_nlink <= 1:
                    Path(blob.path).unlink(missing_ok=True)
                else:
                    total += st.st_size
        return total

    # -- sites

    def site_dir(self, site: str) -> Path:
        return self.sites / site

    def site_names(self) -> list[str]:
        return [e.name for e in os.scandir(self.sites) if e.is_dir(follow_symlinks=False)]

    def read_content_id(self, site: str) -> str | None:
        try:
            return (self.site_dir(site) / "uid").read_text().strip() or None
        except OSError:
            return None

    def load_current(self, site: str) -> SiteVersion | None:
        """The version ``current`` points at, if it is there."""
        site_dir = self.site_dir(site)
        try:
            target = os.readlink(site_dir / "current")
        except OSError:
            return None
        match = _VERSION_DIR.match(target)
        if not match or not (site_dir / target).is_dir():
            return None
        content_id = self.read_content_id(site) or ""
        with contextlib.suppress(OSError):
            if (site_dir / "edited").read_text().strip() == target:
                # Changed in place since it was built: served as it is, but its number is unknown.
                return SiteVersion(0, os.path.realpath(site_dir / target), content_id)
        return SiteVersion(int(match.group(1)), os.path.realpath(site_dir / target), content_id)

    def build_version(
        self,
        site: str,
        content_id: str,
        version: int,
        files: dict[str, FileMeta],
        dirs: list[str],
        *,
        packed: bool = False,
    ) -> SiteVersion:
        """Build ``v<version>`` from blobs (all present), then flip ``current`` to it. With ``packed``,
        files whose blobs are in packs are listed in the version's index instead of made as files."""
        site_dir = self.site_dir(site)
        site_dir.mkdir(exist_ok=True)
        if self.read_content_id(site) != content_id:
            (site_dir / "uid").write_text(content_id + "\n")
        current = self.load_current(site)
        name = f"v{version}"
        if current is not None and current.number == version:
            if current.files.packed == packed or not current.files.packed:
                return current
            # The same version again, all in files (the site now runs an app): built beside the one
            # served, which stays whole until ``current`` flips.
            name = f"v{version}-{uuid.uuid4().hex[:8]}"
        build = Path(tempfile.mkdtemp(dir=site_dir, prefix=".build-"))
        index_tmp = None
        try:
            # Each folder made once (not a mkdir per file: a site is mostly many files in few folders).
            folders = set(dirs) | {os.path.dirname(rel) for rel in files}
            folders.discard("")
            for d in sorted(folders):
                os.makedirs(build / d, exist_ok=True)
            base = str(build)
            index = IndexBuilder()
            where = self.packs.location
            now = time.time()
            for rel, meta in files.items():
                loc = where(meta.sha256) if packed else None
                if loc is not None:
                    index.add(rel, loc, meta.mtime if meta.mtime > 0 else now, meta.sha256)
                else:
                    self._place(meta.sha256, f"{base}/{rel}", meta.mtime, link=packed)
            final = site_dir / name
            if packed:
                index_tmp = index.write(str(final))
            if final.exists():
                shutil.rmtree(final)
            os.rename(build, final)
            Path(changes_path(str(final))).unlink(missing_ok=True)
            if index_tmp is not None:
                os.replace(index_tmp, index_path(str(final)))
            else:
                Path(index_path(str(final))).unlink(missing_ok=True)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            if index_tmp is not None:
                Path(index_tmp).unlink(missing_ok=True)
            raise
        link = site_dir / f".current-{uuid.uuid4().hex}"
        os.symlink(name, link)
        os.replace(link, site_dir / "current")
        (site_dir / "edited").unlink(missing_ok=True)
        fsync_dir(site_dir)
        built = SiteVersion(version, os.path.realpath(final), content_id)
        if index_tmp is not None:
            built.files.adopt(index)
        return built

    def apply_changes(
        self,
        site: str,
        current: SiteVersion,
        version: int,
        changes: dict[str, FileMeta | None],
        dirs: list[str],
    ) -> SiteVersion:
        """Bring the served version to ``version`` in place, path by path.

        Only for changes that were made file by file on the fileserver (FTP uploads): each file is
        swapped in with a rename, so a reader sees the old file or the new one, never half of either.
        A version with an index gets a new index (renamed over the old one) for its small files.
        """
        root = Path(current.root)
        packed = current.files.packed
        overlay = current.files.changes() if packed else {}
        before = dict(overlay)
        # After a restart the directory's name no longer tells its version: it is then rebuilt whole.
        marker = self.site_dir(site) / "edited"
        if not marker.exists():
            marker.write_text(root.name + "\n")
            fsync_dir(marker.parent)
        for rel, meta in changes.items():
            if meta is None:
                target = root / rel
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
                if packed:
                    for gone in [rel, *current.files.paths_below(rel)]:
                        overlay[gone] = None
        for rel in sorted(dirs):
            (root / rel).mkdir(parents=True, exist_ok=True)
        for rel, meta in changes.items():
            if meta is None:
                continue
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            pf = self._packed(meta) if packed else None
            if pf is not None:
                overlay[rel] = pf
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                else:
                    dest.unlink(missing_ok=True)
                continue
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            tmp = dest.parent / f".new-{uuid.uuid4().hex}"
            self._place(meta.sha256, str(tmp), meta.mtime, link=packed)
            os.replace(tmp, dest)
            if packed:
                overlay[rel] = None  # (the file in the directory is served, not the index's)
        changed = SiteVersion(version, current.root, current.content_id)
        if packed and len(overlay) > FOLD_CHANGES_AT:
            index = current.files.folded(overlay)
            os.replace(index.write(current.root), index_path(current.root))
            Path(changes_path(current.root)).unlink(missing_ok=True)
            changed.files.adopt(index)
            return changed
        if overlay != before:
            write_changes(current.root, overlay)
        changed.files.inherit(current.files)
        changed.files.load()
        return changed

    def prune(self, site: str, keep: set[int]) -> None:
        """Remove versions (and failed builds) other than ``keep`` and the current one."""
        site_dir = self.site_dir(site)
        # By the link's target, not the version number: a version changed in place has number 0.
        try:
            served = os.readlink(site_dir / "current")
        except OSError:
            served = ""
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(site_dir):
                name = entry.name.removesuffix(INDEX_SUFFIX).removesuffix(CHANGES_SUFFIX)
                match = _VERSION_DIR.match(name)
                stale = match and name != served and int(match.group(1)) not in keep
                if stale or entry.name.startswith(".build-"):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        Path(entry.path).unlink(missing_ok=True)

    def drop(self, site: str) -> None:
        """Forget a site: its directory leaves ``sites/`` in one rename, then is deleted."""
        site_dir = self.site_dir(site)
        if not site_dir.exists():
            return
        doomed = self.trash / f"{site}-{uuid.uuid4().hex}"
        os.rename(site_dir, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def empty_trash(self) -> None:
        for entry in os.scandir(self.trash):
            shutil.rmtree(entry.path, ignore_errors=True)
