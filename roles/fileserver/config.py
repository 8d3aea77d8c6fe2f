"""The fileserver role."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import RoleConfig

__all__ = ["FileserverConfig"]


@dataclass(frozen=True, kw_only=True)
class FileserverConfig(RoleConfig):
    role: str = "fileserver"
    # Versions kept per site for rollback; older ones are pruned with the blobs only they used.
    keep_versions: int = 20
    # How often unused blobs, stale uploads and old trash are collected.
    gc_interval: float = 600.0
    # An uploaded blob no version uses yet is kept this long, waiting for its commit.
    upload_grace: float = 3600.0
    # Content of a site that left the snapshot stays in <home>/trash this long before it is deleted.
    trash_days: float = 7.0
