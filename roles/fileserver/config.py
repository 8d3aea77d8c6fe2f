from __future__ import annotations

from dataclasses import dataclass

from shared.config import RoleConfig

__all__ = ["FileserverConfig"]


@dataclass(frozen=True, kw_only=True)
class FileserverConfig(RoleConfig):
    role: str = "fileserver"
    # Versions kept per site for rollback; older ones are pruned with the blobs only they used.
    keep_versions: int = 20
