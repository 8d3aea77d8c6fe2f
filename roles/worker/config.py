from __future__ import annotations

from dataclasses import dataclass

from shared.config import RoleConfig

__all__ = ["WorkerConfig"]


@dataclass(frozen=True, kw_only=True)
class WorkerConfig(RoleConfig):
    role: str = "worker"
    # Where front ends connect (mTLS, frontend certificates only).
    data_port: int = 0
    # An idle keep-alive connection is closed after this many seconds.
    keepalive_timeout: float = 30.0
    # A request (head and body) must arrive within this many seconds of its first byte (slowloris).
    request_timeout: float = 15.0
    # A peer that reads nothing of a response for this long is dropped.
    send_timeout: float = 60.0
    # On SIGTERM, in-flight responses get this long to finish.
    drain_timeout: float = 10.0
    # The version a site just left stays on disk this long, for requests still reading it.
    version_grace: float = 15.0
    # In-memory cache of small hot files (per process), dropped per site on a version flip.
    hot_cache_bytes: int = 32 * 1024 * 1024
