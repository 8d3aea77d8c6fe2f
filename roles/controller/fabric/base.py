"""The fabric interface: where role hosts come from, and how the controller runs roles on them."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FabricProvider", "HostInfo", "RoleLauncher", "RoleSpec"]


@dataclass(frozen=True)
class HostInfo:
    name: str
    fabric: str
    address: str


@dataclass(frozen=True)
class RoleSpec:
    """What to run on a host: one role process with its own home directory."""

    kind: str
    host: str
    home: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def config_file(self) -> Path:
        return self.home / "role.json"


class RoleLauncher(abc.ABC):
    """Starts, watches and stops role processes on one host."""

    @abc.abstractmethod
    async def start(self, spec: RoleSpec) -> None:
        """Start the role (or adopt one already running from an earlier controller) and keep it running."""

    @abc.abstractmethod
    async def stop(self, kind: str) -> None:
        """Stop the role: SIGTERM, then SIGKILL after a bound."""

    @abc.abstractmethod
    async def stop_all(self) -> None: ...

    @abc.abstractmethod
    def describe(self, kind: str) -> tuple[str, str]:
        """(state, reason) of the process as the launcher sees it, e.g. ("running", "")."""


class FabricProvider(abc.ABC):
    """A source of hosts: ``local`` (this machine), later ``ssh`` and ``netns``."""

    name: str

    @abc.abstractmethod
    async def list_hosts(self) -> list[HostInfo]: ...

    @abc.abstractmethod
    async def provision(self, name: str) -> HostInfo:
        """Make a new host (or, for providers that only reach existing hosts, check it is reachable)."""

    @abc.abstractmethod
    async def destroy(self, name: str) -> None: ...

    @abc.abstractmethod
    def launcher(self, host: str) -> RoleLauncher:
        """How to run role processes on ``host``."""
