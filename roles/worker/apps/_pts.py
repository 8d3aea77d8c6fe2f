"""An app's pseudo-terminals: a devpts instance of its own, with a cap.

bwrap's ``--dev`` gives each sandbox a new devpts instance, but every instance but the host's first
draws from one pool, ``kernel.pty.max`` less ``kernel.pty.reserve`` (3,072 by default): an app that
opened ``/dev/ptmx`` over and over (a dozen processes of 250 files each, within its limits) held every
pseudo-terminal of every other sandbox and container on the host, whose ``openpty`` then failed with
ENOSPC. So the worker mounts, for each instance, a devpts instance with ``max=`` set and the sandbox
binds it over bwrap's ``/dev/pts``: a web terminal (ttyd, a notebook's terminals) still gets its
terminals, and no app gets more than :data:`PTYS_PER_APP`, nor more than its share of the pool
(:func:`ptys_per_app`): the worker's active apps together never hold it all.

Linux-only, as root (the worker runs apps in sandboxes only as root).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

__all__ = ["PTYS_PER_APP", "mount_pts", "pty_pool", "ptys_per_app", "sweep_pts", "unmount_pts"]

# Pseudo-terminals one app instance may hold at most: a small worker's 50 apps hold at most 800 of
# the 3,072.
PTYS_PER_APP = 16
# The kernel's defaults (kernel.pty.max, kernel.pty.reserve), where /proc/sys does not say.
_PTY_MAX, _PTY_RESERVE = 4096, 1024
# bwrap's own devpts options (``--dev``); the cap goes after them.
_OPTIONS = "newinstance,ptmxmode=0666,mode=0620,max="
_MS_NOSUID, _MS_NOEXEC = 2, 8
_MNT_DETACH = 2
_PREFIX = "pts-"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def pty_pool(sys_dir: str = "/proc/sys/kernel/pty") -> int:
    """The pseudo-terminals every devpts instance but the host's first draws from: ``max`` less
    ``reserve`` (which only the first may use)."""
    found = []
    for name, default in (("max", _PTY_MAX), ("reserve", _PTY_RESERVE)):
        try:
            found.append(int(Path(sys_dir, name).read_text()))
        except (OSError, ValueError):
            found.append(default)
    return max(found[0] - found[1], 0)


def ptys_per_app(pool: int, max_active: int) -> int:
    """Each app instance's cap: :data:`PTYS_PER_APP`, or less where the worker's ``max_active``
    instances would together hold the whole ``pool`` (a large worker's 200 apps of 16 each are more than
    the default 3,072); at least one, so a web terminal still opens."""
    return max(1, min(PTYS_PER_APP, pool // max(max_active, 1)))


def mount_pts(run_dir: Path, serial: str, cap: int = PTYS_PER_APP) -> str:
    """A devpts instance of at most ``cap`` terminals for the instance ``serial``, mounted in
    ``run_dir`` (root's, 0700): the path the sandbox binds at ``/dev/pts``. OSError if it cannot be
    made."""
    target = run_dir / f"{_PREFIX}{serial}"
    target.mkdir(mode=0o700, exist_ok=True)
    options = f"{_OPTIONS}{cap}".encode()
    if _libc().mount(b"devpts", os.fsencode(target), b"devpts", _MS_NOSUID | _MS_NOEXEC, options) < 0:
        err = ctypes.get_errno()
        with contextlib.suppress(OSError):
            target.rmdir()
        raise OSError(err, f"mount devpts: {os.strerror(err)}")
    return str(target)


def unmount_pts(path: str) -> None:
    """Unmounted (lazily: the sandbox holds its own copy of the mount while it lives) and gone."""
    _libc().umount2(os.fsencode(path), _MNT_DETACH)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def sweep_pts(run_dir: Path) -> None:
    """What a worker that died hard left in ``run_dir``: its instances are gone with it."""
    with contextlib.suppress(FileNotFoundError):
        for entry in run_dir.iterdir():
            if entry.name.startswith(_PREFIX) and entry.is_dir() and not entry.is_symlink():
                unmount_pts(str(entry))
