"""An app's own folder, writable: the version it runs, under an overlay whose writes land on the site's
quota volume.

Apps as people write them write beside their code: Django's ``startproject`` keeps ``db.sqlite3``
there (and SQLite makes its journal next to it), Flask puts its database in ``instance/``, PHP apps
keep uploads and caches in their own folders. A read-only folder turns each of those into an error
the owner cannot fix without rewriting the app. The published version itself stays read-only and
shared (its files are the worker's blobs, hard-linked into every version):

- the version directory is bound through an idmapped mount, so its files (root's on disk) appear as
  the site's own and the app may write them;
- that mount is the lower layer of an overlay whose upper layer is ``<volume>/files``: a write copies
  the file up onto the site's volume, whose size cap counts it; the blobs are never written;
- the sandbox binds the overlay at the version's own path, so paths stay what they are on the host.

What the app wrote outlives restarts and new versions. A new version whose deploy changed a path
(a different file there than in the version the app last ran on) takes that path back from the
app's copy, as Kudu's deploy overwrites only what a deployment changed: pushing the same
``db.sqlite3`` again keeps the live database, pushing a new one replaces it.

Linux-only, as root (the worker runs apps in sandboxes only as root): ``open_tree``,
``mount_setattr`` and ``move_mount`` have no wrapper in Python or util-linux 2.38 that applies an
idmap, so they are called directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import filecmp
import os
import shutil
import stat
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from roles.worker._source import is_database

__all__ = ["WritableFiles", "mount_files", "unmount_files"]

# System call numbers, the same on x86_64 and arm64 (syscalls added after 5.0 share one table).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = 0o2000000
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_IDMAP = 0x100000
_MS_NOSUID, _MS_NODEV = 2, 4
_MNT_DETACH = 2
# struct mount_attr {u64 attr_set, attr_clr, propagation, userns_fd}
_MOUNT_ATTR = struct.Struct("=QQQQ")
_TOOLS = "/usr/bin:/bin:/usr/sbin:/sbin"
_MARK = "version"  # <volume>/.overlay/version: the version the upper layer last ran on


@dataclass(frozen=True, slots=True)
class WritableFiles:
    """One instance's overlay: ``merged`` is bound at the version's path in its sandbox."""

    merged: str
    lower: str
    work: str


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _user_namespace(uid: int, gid: int) -> int:
    """A user namespace in which root is ``uid``/``gid`` outside, as an fd (it lives while the fd or a
    mount made with it does). A short-lived ``unshare`` holds it while its maps are written."""
    unshare = shutil.which("unshare", path=_TOOLS) or "unshare"
    proc = subprocess.Popen([unshare, "--user", "--", "cat"], stdin=subprocess.PIPE)
    try:
        ours = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 5.0
        while True:
            try:
                if os.readlink(f"/proc/{proc.pid}/ns/user") != ours:
                    break
            except FileNotFoundError:
                raise OSError(errno.ESRCH, "unshare --user exited before it made a namespace") from None
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, "unshare --user made no namespace in 5 s")
            time.sleep(0.0005)
        with open(f"/proc/{proc.pid}/uid_map", "w") as f:
            f.write(f"0 {uid} 1\n")
        with open(f"/proc/{proc.pid}/gid_map", "w") as f:
            f.write(f"0 {gid} 1\n")
        return os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()


def _idmapped_bind(source: str, target: str, userns: int) -> None:
    """Bind ``source`` at ``target``, read-only, its root-owned files seen as the namespace's root."""
    libc = _libc()
    tree = _check(
        libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source), _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC),
        "open_tree",
    )
    try:
        attr = ctypes.create_string_buffer(
            _MOUNT_ATTR.pack(_MOUNT_ATTR_IDMAP | _MOUNT_ATTR_RDONLY, 0, 0, userns)
        )
        _check(
            libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, attr, _MOUNT_ATTR.size),
            "mount_setattr",
        )
        _check(
            libc.syscall(
                _SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH
            ),
            "move_mount",
        )
    finally:
        os.close(tree)


def _overlay(lower: str, upper: str, work: str, target: str) -> None:
    for path in (lower, upper, work):
        if any(c in path for c in ",:\\"):
            raise OSError(errno.EINVAL, f"an overlay layer path cannot hold , : or \\ ({path})")
    options = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    _check(
        _libc().mount(b"overlay", os.fsencode(target), b"overlay", _MS_NOSUID | _MS_NODEV, options),
        "mount overlay",
    )


def _same(old: Path, new: Path) -> bool:
    """Whether a deploy left ``old``'s path as it was in ``new`` (both may be missing)."""
    try:
        a = old.lstat()
    except (FileNotFoundError, NotADirectoryError):
        a = None
    try:
        b = new.lstat()
    except (FileNotFoundError, NotADirectoryError):
        b = None
    if a is None or b is None:
        return a is None and b is None
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) or (stat.S_ISDIR(a.st_mode) and stat.S_ISDIR(b.st_mode)):
        return True
    if stat.S_ISREG(a.st_mode) and stat.S_ISREG(b.st_mode):
        return a.st_size == b.st_size and filecmp.cmp(old, new, shallow=False)
    if stat.S_ISLNK(a.st_mode) and stat.S_ISLNK(b.st_mode):
        return os.readlink(old) == os.readlink(new)
    return False


# What a path of the app's folder is in a published version: no such folder (nor anything below it),
# a real folder reached through no symlink, or one a symlink is on the way to (never followed).
_MISSING, _REAL, _LINKED = 0, 1, 2


def _folder_in(root: Path, rel: str, parent: int) -> int:
    """What ``rel`` is in the version at ``root``, from what its parent folder is there: one lstat."""
    if parent != _REAL:
        return parent
    try:
        mode = (root / rel).lstat().st_mode
    except OSError:
        return _MISSING
    if stat.S_ISLNK(mode):
        return _LINKED
    return _REAL if stat.S_ISDIR(mode) else _MISSING


def _dropped_database(old: Path, new: Path, rel: str) -> bool:
    """Whether a deploy only left out a database the app has its own copy of: a version published
    once with ``db.sqlite3`` (an empty one ``makemigrations`` made, a developer's copy) and then
    without it (``.gitignore``d, as it should be) must not delete the live database with it. Only
    a version that publishes a different file at that path replaces it."""
    return is_database(rel) and not os.path.lexists(new) and os.path.lexists(old)


def _take_back_deployed(upper: Path, old_root: Path, new_root: Path) -> list[str]:
    """Drop the app's copies of paths the new version changed, and its deletions of them (overlay
    whiteouts, listed among the files); returns their paths. Folders the app made stay.

    The app may still be changing ``upper`` (its old instance retires after the new one starts), so
    the walk holds each folder open and removes by name inside it: a folder swapped for a symlink
    meanwhile is never followed. It goes only into folders that either version has (a published
    symlink never leads the comparison out of a version): what the app made below them holds
    nothing a deploy changed, and a chain of thousands of folders there cost the worker a realpath
    of each, seconds of its CPU per new version."""
    dropped: list[str] = []
    kinds = {".": (_REAL, _REAL)}
    for folder, dirs, files, dir_fd in os.fwalk(upper):
        rel = os.path.normpath(os.path.relpath(folder, upper))
        in_old, in_new = kinds.pop(rel)
        links = [d for d in dirs if stat.S_ISLNK(os.stat(d, dir_fd=dir_fd, follow_symlinks=False).st_mode)]
        kept: list[str] = []
        for d in dirs:
            sub = os.path.normpath(os.path.join(rel, d))
            kind = (_folder_in(old_root, sub, in_old), _folder_in(new_root, sub, in_new))
            if d not in links and _LINKED not in kind and _REAL in kind:
                kinds[sub] = kind
                kept.append(d)
        dirs[:] = kept
        for name in files + links:
            if _dropped_database(old_root / rel / name, new_root / rel / name, os.path.join(rel, name)):
                continue
            if not _same(old_root / rel / name, new_root / rel / name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
                dropped.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(dropped)


def _sweep(base: Path) -> None:
    """Remove what overlays that are gone left behind (a worker that died hard; its volume was
    unmounted with every mount on it); those of live instances stay."""
    live = {p.name.removeprefix("merged-") for p in base.glob("merged-*") if os.path.ismount(p)}
    for path in base.iterdir():
        kind, _, serial = path.name.partition("-")
        if kind not in ("lower", "merged", "work") or serial in live or os.path.ismount(path):
            continue
        if kind == "work":
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.rmdir()


def mount_files(
    volume: Path, version_root: str, serial: str, uid: int, gid: int
) -> tuple[WritableFiles, list[str]]:
    """The overlay for one instance of a site on ``volume`` (mounted), running ``version_root``;
    also the paths of the app's files the new version took back. OSError: it could not be made."""
    base = volume / ".overlay"
    base.mkdir(mode=0o700, exist_ok=True)
    upper = volume / "files"
    if not upper.exists():
        upper.mkdir(mode=0o755)
        os.chown(upper, uid, gid)
    mark = base / _MARK
    taken_back: list[str] = []
    try:
        last = mark.read_text()
    except FileNotFoundError:
        last = ""
    if last and last != version_root and Path(last).is_dir():
        taken_back = _take_back_deployed(upper, Path(last), Path(version_root))
    _sweep(base)
    lower, merged, work = (base / f"{kind}-{serial}" for kind in ("lower", "merged", "work"))
    for d in (lower, merged, work):
        d.mkdir(mode=0o700, exist_ok=True)
    userns = _user_namespace(uid, gid)
    try:
        _idmapped_bind(version_root, str(lower), userns)
    finally:
        os.close(userns)
    try:
        _overlay(str(lower), str(upper), str(work), str(merged))
    except OSError:
        _libc().umount2(os.fsencode(lower), _MNT_DETACH)
        raise
    tmp = base / f"{_MARK}.tmp"
    tmp.write_text(version_root)
    tmp.replace(mark)
    return WritableFiles(str(merged), str(lower), str(work)), taken_back


def unmount_files(files: WritableFiles) -> None:
    """Unmounted (lazily: a sandbox being torn down may hold it a moment) and its directories gone."""
    libc = _libc()
    for point in (files.merged, files.lower):
        libc.umount2(os.fsencode(point), _MNT_DETACH)
    for point in (files.merged, files.lower):
        with contextlib.suppress(OSError):
            os.rmdir(point)
    shutil.rmtree(files.work, ignore_errors=True)
