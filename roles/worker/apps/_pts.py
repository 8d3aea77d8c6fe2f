"""An app's pseudo-terminals: a devpts instance of its own, with a cap.

bwrap's ``--dev`` gives each sandbox a new devpts instance, but every instance but the host's first
draws from one pool, ``kernel.pty.max`` less ``kernel.pty.reserve`` (3,072 by default): an app that
opened ``/dev/ptmx`` over and over (a dozen processes of 250 files each, within its limits) held every
pseudo-terminal of every other sandbox and container on the host, whose ``openpty`` then failed with
ENOSPC. So the worker mounts, for each instance, a devpts instance with ``max=`` set and the sandbox
binds it over bwrap's ``/dev/pts``: a web terminal (ttyd, a notebook's terminals) still gets its
terminals, and no app gets more than :data:`PTYS_PER_APP`.

Linux-only, as root (the worker runs apps in sandboxes only as root).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

__all__ = ["PTYS_PER_APP", "mount_pts", "sweep_pts", "unmount_pts"]

# Pseudo-terminals one app instance may hold: a small worker's 50 apps hold at most 800 of the 3,072.
PTYS_PER_APP = 16
# bwrap's own devpts options (``--dev``), and the cap.
_OPTIONS = f"newinstance,ptmxmode=0666,mode=0620,max={PTYS_PER_APP}"
_MS_NOSUID, _MS_NOEXEC = 2, 8
_MNT_DETACH = 2
_PREFIX = "pts-"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def mount_pts(run_dir: Path, serial: str) -> str:
    """A capped devpts instance for the instance ``serial``, mounted in ``run_dir`` (root's, 0700):
    the path the sandbox binds at ``/dev/pts``. OSError if it cannot be made."""
    target = run_dir / f"{_PREFIX}{serial}"
    target.mkdir(mode=0o700, exist_ok=True)
    if (
        _libc().mount(b"devpts", os.fsencode(target), b"devpts", _MS_NOSUID | _MS_NOEXEC, _OPTIONS.encode())
        < 0
    ):
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
