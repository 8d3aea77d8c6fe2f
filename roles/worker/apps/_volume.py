"""A disk quota for what a sandboxed app may write: its HOME and TMPDIR on a size-capped volume.

Each site gets a sparse ext4 image (``<base>/volume.img``, root only) mounted through a loop device at
``<base>/volume`` while its app runs; the sandbox binds ``volume/home`` and ``volume/tmp`` at the site's
HOME and TMPDIR paths. Why this over the other options:

- a hard limit the kernel enforces (ENOSPC at the cap), not a watch that notices after the fact;
- it needs nothing of the host filesystem (ext4 project quotas need ``prjquota`` at mount time, which
  hosts rarely have; XFS is not a given);
- it is cheap: the image is sparse (it takes what the site writes), ``mkfs`` of a new one takes
  ~25 ms and a mount ~10 ms. A volume stays mounted for a grace period after the site's last app
  process stops (a site woken again soon pays no mount), then goes: a long-idle site holds no loop
  device and no mount.

``mkfs`` is still the largest part of a new site's first start, so the worker keeps a couple of
blank images made ahead (:class:`BlankImages`, root's, never used by any site before): a new site
takes one by a rename and its filesystem root gets the site's owner once mounted.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import shutil
import struct
from pathlib import Path

from shared.errors import Unavailable

__all__ = ["BlankImages", "HomeVolume", "unmount_lazily", "unmount_stale"]

_TOOLS = "/usr/sbin:/usr/bin:/sbin:/bin"
# Below this much free space (beyond ext4's own reserve for metadata, which writes cannot use: 2% of
# the blocks, at most 4096) the volume counts as full: a write has hit the quota.
FULL_MARGIN = 256 * 1024
# Blank images kept ready per size: enough for a few new sites at once, a few MB of disk each.
BLANKS = 2


def _mkfs_argv(image: Path, uid: int, gid: int) -> list[str]:
    # No reserved blocks (the cap is the site's), a small journal, lazy inode tables: fast.
    return [
        "mkfs.ext4", "-q", "-F", "-m", "0", "-J", "size=4",
        "-E", f"root_owner={uid}:{gid},lazy_itable_init=1,nodiscard", str(image),
    ]  # fmt: skip


async def _run(*argv: str, ok: tuple[int, ...] = (0,)) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    if proc.returncode not in ok:
        raise Unavailable(f"{Path(argv[0]).name} failed: {out.decode(errors='replace').strip()[:300]}")


# <linux/loop.h> and <sys/mount.h>.
_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_AUTOCLEAR = 4
# struct loop_config: fd, block_size, struct loop_info64 (device, inode, rdevice, offset, sizelimit,
# number, encrypt_type, encrypt_key_size, flags, file_name[64], crypt_name[64], encrypt_key[32],
# init[2]), reserved[8].
_LOOP_CONFIG = struct.Struct("=IIQQQQQIIII64s64s32sQQ8Q")
_MS_NOSUID, _MS_NODEV, _MS_NOATIME = 2, 4, 1024


def _mount_loop(image: str, mountpoint: str) -> None:
    """``mount -o loop,nosuid,nodev,noatime`` in a few system calls. util-linux's ``mount`` costs a
    start from idle 10-30 ms on a busy host (an exec, libmount reading every mount there is); this
    costs one or two. The loop device clears itself when the filesystem is unmounted (autoclear),
    as with ``mount -o loop``. OSError: the caller falls back to ``mount``."""
    libc = ctypes.CDLL(None, use_errno=True)
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(16):
                number = fcntl.ioctl(control, _LOOP_CTL_GET_FREE)
                loop = os.open(f"/dev/loop{number}", os.O_RDWR | os.O_CLOEXEC)
                try:
                    name = os.fsencode(image)[:63]
                    config = _LOOP_CONFIG.pack(
                        backing, 0, 0, 0, 0, 0, 0, 0, 0, 0, _LO_FLAGS_AUTOCLEAR, name, b"", b"", 0, 0,
                        *[0] * 8,
                    )  # fmt: skip
                    try:
                        fcntl.ioctl(loop, _LOOP_CONFIGURE, config)
                    except OSError as exc:
                        if exc.errno == errno.EBUSY:  # another process took it first
                            continue
                        raise
                    flags = _MS_NOSUID | _MS_NODEV | _MS_NOATIME
                    if libc.mount(
                        f"/dev/loop{number}".encode(), os.fsencode(mountpoint), b"ext4", flags, None
                    ):
                        err = ctypes.get_errno()
                        raise OSError(err, f"mount: {os.strerror(err)}")
                    return
                finally:
                    os.close(loop)  # the mount holds the device now; without one, it clears
            raise OSError(errno.EBUSY, "no free loop device")
        finally:
            os.close(control)
    finally:
        os.close(backing)


async def unmount_lazily(mountpoint: Path) -> None:
    await _run("umount", "--lazy", str(mountpoint))


async def unmount_stale(apps_dir: Path) -> int:
    """Unmount the volumes a worker that died hard left mounted under ``apps_dir`` (their apps died
    with it); returns how many."""
    stale = _volume_mounts(apps_dir)
    for point in stale:
        await _run("umount", "--lazy", point)
    return len(stale)


def _volume_mounts(apps_dir: Path) -> list[str]:
    prefix = f"{apps_dir}/"
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix) and point.endswith("/volume"):
                found.append(point)
    return found


class BlankImages:
    """Freshly made, never mounted images, by size, in a root-only directory of their own."""

    def __init__(self, directory: Path, keep: int = BLANKS) -> None:
        self._dir = directory
        self._keep = keep
        self._made = 0
        self._filling: dict[int, asyncio.Task[None]] = {}

    def take(self, size_mb: int) -> Path | None:
        """A blank image of ``size_mb`` (the caller renames it away at once), if one is ready;
        more are made meanwhile."""
        self.fill(size_mb)
        for path in sorted(self._dir.glob(f"{size_mb}-*.img")):
            return path
        return None

    def fill(self, size_mb: int) -> None:
        """Make blanks of this size in the background, up to the number kept."""
        task = self._filling.get(size_mb)
        if task is None or task.done():
            self._filling[size_mb] = asyncio.get_running_loop().create_task(self._fill(size_mb))

    async def _fill(self, size_mb: int) -> None:
        self._dir.mkdir(mode=0o700, exist_ok=True)
        for path in self._dir.glob(".*.making"):
            if f"-{os.getpid()}-" not in path.name:  # a worker that died hard left it
                path.unlink(missing_ok=True)
        while len(list(self._dir.glob(f"{size_mb}-*.img"))) < self._keep:
            self._made += 1
            making = self._dir / f".{size_mb}-{os.getpid()}-{self._made}.making"
            fd = os.open(making, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, size_mb * 1024 * 1024)
            finally:
                os.close(fd)
            try:
                await _run(*_mkfs_argv(making, 0, 0))
            except BaseException:
                making.unlink(missing_ok=True)
                raise
            os.rename(making, self._dir / f"{size_mb}-{os.getpid()}-{self._made}.img")

    async def close(self) -> None:
        """Stop making blanks; half-made ones go (whole ones stay for the next worker)."""
        tasks = [t for t in self._filling.values() if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for path in self._dir.glob(".*.making"):
            path.unlink(missing_ok=True)


class HomeVolume:
    """One site's volume, shared by its app processes (an old one finishing, a new one starting)."""

    def __init__(
        self, base: Path, *, uid: int, gid: int, grace: float = 0.0, blanks: BlankImages | None = None
    ) -> None:
        self.image = base / "volume.img"
        self.mountpoint = base / "volume"
        self.home = self.mountpoint / "home"
        self.tmp = self.mountpoint / "tmp"
        self._uid = uid
        self._gid = gid
        self._users = 0
        self._lock = asyncio.Lock()
        self._grace = grace
        self._expiry: asyncio.TimerHandle | None = None
        self._expiring: asyncio.Task[None] | None = None
        self._blanks = blanks

    @staticmethod
    def available() -> bool:
        tools = ("mkfs.ext4", "e2fsck", "resize2fs", "mount", "umount", "losetup", "findmnt", "cp")
        return os.path.exists("/dev/loop-control") and all(shutil.which(t, path=_TOOLS) for t in tools)

    async def acquire(self, size_mb: int, old_home: Path, old_tmp: Path) -> None:
        """Mounted (made first if need be, grown if the cap went up) for one more user."""
        async with self._lock:
            self._keep()
            # Mounted already (an old process of the site still runs): a bigger cap waits for the
            # next mount, as ext4 cannot always grow online (it needs room for descriptors).
            if not self.mounted():
                await self._mount(size_mb, old_home, old_tmp)
            self._users += 1

    async def release(self) -> None:
        async with self._lock:
            self._users = max(0, self._users - 1)
            if self._users > 0 or not self.mounted():
                return
            if self._grace > 0:
                self._expiry = asyncio.get_running_loop().call_later(self._grace, self._expire)
            else:
                await self._unmount()

    def _keep(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _expire(self) -> None:
        self._expiry = None

        async def unmount_unused() -> None:
            async with self._lock:
                if self._users == 0 and self._expiry is None and self.mounted():
                    await self._unmount()

        self._expiring = asyncio.get_running_loop().create_task(unmount_unused())

    async def _unmount(self) -> None:
        # Lazy: a sandbox still being torn down keeps the filesystem until it has gone.
        await _run("umount", "--lazy", str(self.mountpoint))

    async def close(self) -> None:
        """Unmounted whoever still holds it (the worker is stopping, its apps have gone)."""
        async with self._lock:
            self._keep()
            self._users = 0
            if self.mounted():
                await self._unmount()

    def mounted(self) -> bool:
        return os.path.ismount(self.mountpoint)

    def size(self) -> int:
        """The cap now in force (the image's size; ext4 keeps a little of it for itself)."""
        try:
            return self.image.stat().st_size
        except OSError:
            return 0

    def usage(self) -> tuple[int, int]:
        """(used, size) in bytes; (0, 0) when it is not mounted."""
        if not self.mounted():
            return 0, 0
        st = os.statvfs(self.mountpoint)
        return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize

    def full(self) -> bool:
        if not self.mounted():
            return False
        st = os.statvfs(self.mountpoint)
        reserve = min(st.f_blocks // 50, 4096) * st.f_frsize
        return st.f_bavail * st.f_frsize < reserve + FULL_MARGIN

    async def _detached(self) -> bool:
        """Whether no loop device holds the image (a sandbox being torn down may, for a moment)."""
        for _ in range(20):
            proc = await asyncio.create_subprocess_exec(
                "losetup", "--associated", str(self.image), stdout=asyncio.subprocess.PIPE
            )
            out, _ = await proc.communicate()
            if proc.returncode == 0 and not out.strip():
                return True
            await asyncio.sleep(0.05)
        return False

    def _create_image(self, size: int) -> bool:
        """A sparse image of ``size`` bytes, root's only; False when there is one already."""
        try:
            fd = os.open(self.image, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return True

    async def _mount(self, size_mb: int, old_home: Path, old_tmp: Path) -> None:
        size = size_mb * 1024 * 1024
        blank = None if self.image.exists() or self._blanks is None else self._blanks.take(size_mb)
        fresh = False
        if blank is not None:
            try:
                os.rename(blank, self.image)
                fresh = True
            except FileNotFoundError:  # another volume took it first
                blank = None
        if not fresh and self._create_image(size):
            fresh = True
            try:
                await _run(*_mkfs_argv(self.image, self._uid, self._gid))
            except BaseException:
                self.image.unlink(missing_ok=True)  # half made: made again next time
                raise
        elif not fresh and self.image.stat().st_size < size and await self._detached():
            # The plan grew: grow the image and its filesystem, offline (no loop device has it).
            os.truncate(self.image, size)
            await _run("e2fsck", "-f", "-p", str(self.image), ok=(0, 1))  # 1: it fixed something
            await _run("resize2fs", str(self.image))
        self.mountpoint.mkdir(mode=0o700, exist_ok=True)
        try:
            await asyncio.to_thread(_mount_loop, str(self.image), str(self.mountpoint))
        except OSError:
            await _run(
                "mount",
                "-t",
                "ext4",
                "-o",
                "loop,nosuid,nodev,noatime",
                str(self.image),
                str(self.mountpoint),
            )
        if blank is not None:
            os.chown(self.mountpoint, self._uid, self._gid)  # what mkfs's root_owner does for its own
        for d in (self.home, self.tmp):
            if not d.exists():
                d.mkdir(mode=0o700)
                os.chown(d, self._uid, self._gid)
        if fresh:
            # What the site kept in its home before it had a volume moves onto it, once.
            # cp -a keeps owners and copies symlinks as links (never follows the tenant's).
            for old, new in ((old_home, self.home), (old_tmp, self.tmp)):
                if old.is_dir() and not old.is_symlink() and any(old.iterdir()):
                    await _run("cp", "-a", "--no-dereference", f"{old}/.", f"{new}/")
                    for entry in list(old.iterdir()):
                        if entry.is_dir() and not entry.is_symlink():
                            shutil.rmtree(entry, ignore_errors=True)
                        else:
                            entry.unlink(missing_ok=True)
