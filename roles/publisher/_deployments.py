"""Recent deployments per site, as Kudu's ``/api/deployments`` reports them.

Kudu clients (the Azure CLI, GitHub's deploy actions, curl scripts) poll the ``Location`` of an async
zip deploy and read ``status`` and ``complete``; the numbers below are Kudu's ``DeployStatus``. The
records live in the publisher's memory, a few per site: they describe what this process did, and a
restarted publisher starts with none (the fileserver's versions are the lasting history). A record
keeps its deploy's lines (the build's among them) for ``/api/deployments/{id}/log``, as Kudu's
``LogEntry`` list.
"""

from __future__ import annotations

import enum
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["DeployStatus", "Deployment", "DeploymentLog"]

# Records kept per site; older ones are forgotten first.
_KEEP_PER_SITE = 20
# Lines kept per record (the worker bounds a build's own lines too).
_MAX_LINES = 2000


class DeployStatus(enum.IntEnum):
    PENDING = 0
    BUILDING = 1
    DEPLOYING = 2
    FAILED = 3
    SUCCESS = 4


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Deployment:
    id: str
    site: str
    deployer: str  # "ZipDeploy" or "git", as Kudu names them
    author: str
    status: DeployStatus = DeployStatus.PENDING
    message: str = ""
    received_time: str = field(default_factory=_now)
    start_time: str | None = None
    end_time: str | None = None
    version: int | None = None
    # (UTC time, text) per line of the deploy and its build.
    lines: list[tuple[str, str]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.status in (DeployStatus.FAILED, DeployStatus.SUCCESS)

    def to_json(self, url: str, log_url: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "site_name": self.site,
            "status": int(self.status),
            "status_text": self.status.name.lower(),
            "complete": self.complete,
            "active": self.status is DeployStatus.SUCCESS,
            "author": self.author,
            "deployer": self.deployer,
            "message": self.message,
            "received_time": self.received_time,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "version": self.version,
            "url": url,
            "log_url": log_url,
        }


class DeploymentLog:
    """Thread-safe: deploys run in worker threads, the status endpoints in the event loop."""

    def __init__(self, keep_per_site: int = _KEEP_PER_SITE) -> None:
        self._keep = keep_per_site
        self._lock = threading.Lock()
        self._by_site: dict[str, OrderedDict[str, Deployment]] = {}

    def start(self, site: str, *, deployer: str, author: str) -> Deployment:
        record = Deployment(uuid.uuid4().hex, site, deployer, author)
        with self._lock:
            records = self._by_site.setdefault(site, OrderedDict())
            records[record.id] = record
            while len(records) > self._keep:
                records.popitem(last=False)
        return record

    def running(self, record: Deployment) -> None:
        with self._lock:
            record.status = DeployStatus.DEPLOYING
            record.start_time = _now()

    def note(self, record: Deployment, text: str) -> None:
        with self._lock:
            if len(record.lines) < _MAX_LINES:
                record.lines.append((_now(), text))

    def log_of(self, record: Deployment) -> list[dict[str, Any]]:
        """The record's lines as Kudu's ``/api/deployments/{id}/log`` lists them (type 0: a message)."""
        with self._lock:
            lines = list(record.lines)
        return [
            {"log_time": at, "id": f"{record.id}-{n}", "message": text, "type": 0, "details_url": None}
            for n, (at, text) in enumerate(lines)
        ]

    def finish(self, record: Deployment, *, version: int | None, message: str, failed: bool = False) -> None:
        """Complete the record: failed when no version was made, or (``failed``) when one was but its
        build failed."""
        with self._lock:
            ok = version is not None and not failed
            record.status = DeployStatus.SUCCESS if ok else DeployStatus.FAILED
            record.version = version
            record.message = message
            record.end_time = _now()

    def get(self, site: str, deployment_id: str) -> Deployment | None:
        with self._lock:
            records = self._by_site.get(site)
            if not records:
                return None
            if deployment_id == "latest":
                return next(reversed(records.values()))
            return records.get(deployment_id)

    def of_site(self, site: str) -> list[Deployment]:
        """The site's kept records, newest first (as Kudu's ``GET /api/deployments`` lists them)."""
        with self._lock:
            return list(reversed(self._by_site.get(site, {}).values()))

    def forget_sites_except(self, names: set[str]) -> None:
        """A deleted site's records go with it, so a re-created site starts with none."""
        with self._lock:
            for name in [n for n in self._by_site if n not in names]:
                del self._by_site[name]
