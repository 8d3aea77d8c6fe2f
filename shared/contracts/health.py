"""What each role answers on ``GET /v1/health``, and what the controller reads from it.

Every answer is one flat JSON object: the fields of :class:`RoleHealth` that every role has, then the
role's own figures (:class:`WorkerFigures` and the like). A role builds its figures; the control plane
(:mod:`shared.control`) adds the common fields and answers ``to_json()``. The controller parses the
answer with the type of the role's kind (:data:`HEALTHS`), takes its state from :meth:`RoleHealth.state`
and keeps the figures (:meth:`RoleHealth.load`) as the role's load. A figure that is absent is left
out of the answer, as it always was.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Self

from pydantic import Field

from shared.contracts._base import Contract
from shared.contracts.fields import VersionNumber
from shared.states import HealthStatus, RoleState

__all__ = [
    "HEALTHS",
    "ControllerHealth",
    "FileserverFigures",
    "FileserverHealth",
    "FrontendFigures",
    "FrontendHealth",
    "ManagementFigures",
    "ManagementHealth",
    "PublisherFigures",
    "PublisherHealth",
    "RoleFigures",
    "RoleHealth",
    "WorkerFigures",
    "WorkerHealth",
]

Count = Annotated[int, Field(ge=0)]
Port = Annotated[int, Field(ge=0, le=65535)]


class RoleFigures(Contract):
    """A role's own part of its health answer: Ready unless it says Degraded, and why."""

    # The wire holds the plain string ("ready", "degraded"); a newer status reads as a refusal.
    status: Annotated[HealthStatus, Field(strict=False)] = HealthStatus.READY
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    @classmethod
    def merge(cls, *parts: RoleFigures) -> Self:
        """A role's figures from the parts that build them, each setting its own fields (a later
        part's win)."""
        return cls.model_validate({k: v for part in parts for k, v in part if k in part.model_fields_set})


class RoleHealth(RoleFigures):
    """The fields every role's health answer has."""

    COMMON: ClassVar[frozenset[str]] = frozenset(
        {"role", "host", "status", "reason", "code_version", "config_version", "pid", "uptime", "listeners"}
    )

    role: str
    host: str = ""
    code_version: str = ""
    # The snapshot version the role serves with (0: none yet).
    config_version: VersionNumber = 0
    pid: int = 0
    uptime: float = 0.0
    # The real ports (a config may say 0, or a supervisor may hold others): name -> port.
    listeners: dict[str, Port] = {}

    def state(self) -> tuple[RoleState, str]:
        """The role's own answer as the state the controller records, and its reason."""
        if self.status == HealthStatus.DEGRADED:
            return RoleState.DEGRADED, self.reason or "the role says it is degraded"
        return RoleState.READY, ""

    def load(self) -> dict[str, Any]:
        """The role's figures (what is not common to every answer), as JSON, for the runtime DB."""
        return {k: v for k, v in self.to_json().items() if k not in self.COMMON}

    @classmethod
    def answer(cls, common: dict[str, Any], figures: RoleFigures) -> RoleHealth:
        """The whole answer of a role: ``common`` fields and the role's ``figures`` (whose status wins)."""
        return cls.model_validate({**common, **dict(figures)})


# -- each role's figures ---------------------------------------------------------------------------


class FrontendFigures(RoleFigures):
    domain: str | None = None
    sites: Count | None = None
    hostnames: Count | None = None
    # Which certificate <site>.<domain> is served with: "acme" (the platform's) or "cloud-ca".
    wildcard: str | None = None
    https: bool | None = None
    processes: Count | None = None
    serving_pids: list[int] | None = None
    # Usage counts not yet reported, by site; reports sent since start.
    usage_pending: dict[str, int] | None = None
    usage_reports_sent: Count | None = None
    client_connections: Count | None = None
    # Connections closed at accept: their address held max_connections_per_ip already.
    connections_refused: Count | None = None
    # Visitor connections cut for sitting on an answer they stopped reading (max_stalled_readers).
    stalled_readers_cut: Count | None = None
    # New TLS handshakes that waited for their share of the process's time, and that wait now.
    tls_handshakes_waited: Count | None = None
    tls_handshakes_waiting: Count | None = None
    upstream_connections: Count | None = None
    upstream_idle: Count | None = None
    upstream_lanes: Count | None = None
    cache_entries: Count | None = None
    cache_bytes: Count | None = None
    cache_hits: Count | None = None
    cache_fills: Count | None = None
    # Hits sent without asking the worker, and workers whose version feed is live (roles/frontend/_feed.py).
    cache_held_hits: Count | None = None
    cache_feeds_live: Count | None = None


class WorkerFigures(RoleFigures):
    sites: Count | None = None
    sites_synced: Count | None = None
    bytes_cached: Count | None = None
    fileserver_reachable: bool | None = None
    processes: Count | None = None
    serving_pids: list[int] | None = None
    # Access lines the serving processes dropped because the main process did not take them in time.
    access_lines_dropped: Count | None = None
    apps_dynamic: Count | None = None
    apps_active: Count | None = None
    apps_max_active: Count | None = None
    # How app limits are held: "cgroup" or "rlimit"; the sandbox ("bwrap" or "off"), its egress.
    app_limits: str | None = None
    app_sandbox: str | None = None
    app_egress: str | None = None
    app_cpu_seconds: dict[str, float] | None = None
    apps_dir: str | None = None
    # Sites of the snapshot this worker cannot serve, with why (the first hundred).
    failed_sites: dict[str, str] | None = None
    connections: Count | None = None
    hot_cache_bytes: Count | None = None


class FileserverFigures(RoleFigures):
    sites: Count | None = None
    total_bytes: Count | None = None
    # The change feed's sequence number.
    seq: Count | None = None
    # The disk content is stored on: free bytes (as the fileserver may use them) and its size.
    disk_free_bytes: Count | None = None
    disk_bytes: Count | None = None


class PublisherFigures(RoleFigures):
    ftp_port: Port | None = None
    deploy_port: Port | None = None
    ftp_sessions: Count | None = None
    ftp_tls: bool | None = None
    login_throttle_entries: Count | None = None
    sites: Count | None = None


class ManagementFigures(RoleFigures):
    api_port: Port | None = None


# -- whole answers, by kind ------------------------------------------------------------------------


class FrontendHealth(RoleHealth, FrontendFigures):
    pass


class WorkerHealth(RoleHealth, WorkerFigures):
    pass


class FileserverHealth(RoleHealth, FileserverFigures):
    pass


class PublisherHealth(RoleHealth, PublisherFigures):
    pass


class ManagementHealth(RoleHealth, ManagementFigures):
    pass


class ControllerHealth(RoleHealth):
    """The controller's own answer: it is up."""


HEALTHS: dict[str, type[RoleHealth]] = {
    "frontend": FrontendHealth,
    "worker": WorkerHealth,
    "fileserver": FileserverHealth,
    "publisher": PublisherHealth,
    "management": ManagementHealth,
    "controller": ControllerHealth,
}
"""The health answer of each kind of role."""
