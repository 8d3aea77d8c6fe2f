"""What state a role (or a site) is in, as the controller records it and every edge shows it.

Stored in the runtime DB and sent over the wire as the plain strings below (a ``StrEnum`` compares
equal to them), so older rows and answers read the same.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["HealthStatus", "RoleState", "SiteState"]


class RoleState(StrEnum):
    INSTALLING = "Installing"
    STARTING = "Starting"
    # Serving with the current config and content.
    READY = "Ready"
    # Answering, but not doing all of its job (a site it cannot serve, a snapshot it refused): see reason.
    DEGRADED = "Degraded"
    # It answered health before and no longer does.
    UNHEALTHY = "Unhealthy"
    FAILED = "Failed"
    RESTARTING = "Restarting"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    REMOVED = "Removed"

    @property
    def down(self) -> bool:
        """Front ends route around a role in this state."""
        return self in (RoleState.UNHEALTHY, RoleState.FAILED)


class HealthStatus(StrEnum):
    """The ``status`` of a role's own health answer (``GET /v1/health``)."""

    READY = "ready"
    DEGRADED = "degraded"


class SiteState(StrEnum):
    """Whether a site serves, as the controller tells the roles that keep or publish its content."""

    RUNNING = "running"
    # Stopped by its owner: no worker or front end has it; its content stays and can be published to.
    STOPPED = "stopped"
    # Its subscription is suspended: served by nothing and published to by no one; its content stays.
    SUSPENDED = "suspended"

    @property
    def serving(self) -> bool:
        """Workers run it and front ends route it."""
        return self is SiteState.RUNNING

    @classmethod
    def of(cls, site: str, subscription: str) -> SiteState:
        """A site's state from its own (running, stopped) and its subscription's (active, suspended):
        a suspension wins, for a stopped site of a suspended subscription may not be published to
        either."""
        if subscription != "active":
            return cls.SUSPENDED
        return cls.RUNNING if site == "running" else cls.STOPPED
