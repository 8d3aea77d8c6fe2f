from __future__ import annotations

from dataclasses import dataclass

from shared.config import RoleConfig

__all__ = ["WorkerConfig"]


@dataclass(frozen=True, kw_only=True)
class WorkerConfig(RoleConfig):
    role: str = "worker"
    # Where front ends connect (mTLS, frontend certificates only).
    data_port: int = 0
