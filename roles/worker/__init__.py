"""The worker role: serves sites from a local content cache pulled from the fileserver."""

from roles.worker.config import WorkerConfig

__all__ = ["WorkerConfig"]
