"""A role's disk running out: how full it is, when to warn, and the error a write that found it full
answers with.

A full disk is the host's condition, not the request's: the write that met it is refused as
:class:`~shared.errors.StorageFull` (507, FTP 452), saying nothing was stored, and the role goes on
serving everything else. Each role that keeps what it stores on a disk says Degraded in its health
while that disk is nearly full, so `sitecloud role list` warns before uploads start failing.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from shared.errors import StorageFull

__all__ = ["DiskSpace", "disk_space", "is_disk_full", "storage_full"]

_MB = 1024 * 1024
# Nearly full: under 5 % of the disk free, and never more than 1 GiB asked for (5 % of a big disk is
# tens of GB that nothing needs held back).
_FLOOR_SHARE = 0.05
_FLOOR_MAX = 1024 * _MB


@dataclass(frozen=True)
class DiskSpace:
    free: int
    total: int

    @property
    def floor(self) -> int:
        """Free bytes under which the disk counts as nearly full."""
        return min(_FLOOR_MAX, int(self.total * _FLOOR_SHARE))

    @property
    def nearly_full(self) -> bool:
        return self.free < self.floor

    def describe(self) -> str:
        return f"{self.free / _MB:,.0f} MB free of {self.total / _MB:,.0f} MB"


def disk_space(path: Path) -> DiskSpace:
    """The space of the filesystem ``path`` is on, as an unprivileged writer sees it."""
    st = os.statvfs(path)
    return DiskSpace(free=st.f_bavail * st.f_frsize, total=st.f_blocks * st.f_frsize)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that found no space left (on the disk, or in the user's disk quota)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def storage_full() -> StorageFull:
    """What a tenant is told: the cloud's storage, not their quota, and nothing half-stored."""
    return StorageFull(
        "the cloud's storage is full: nothing was stored",
        hint="this is not your site's quota; the cloud's admin must free or add disk space, then try again",
    )
