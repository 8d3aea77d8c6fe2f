"""The fabric interface: where role hosts come from, and how the controller runs roles on them."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from shared.errors import InvalidInput

__all__ = [
    "FabricProvider",
    "HostInfo",
    "ProgressCallback",
    "ProgressStep",
    "RoleLauncher",
    "RoleSpec",
    "SshTarget",
]


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

    @property
    def code_file(self) -> Path:
        """The code hash of the checkout a local role's process was started from
        (``roles.controller.fabric._wheelhouse.code_hash``): a rolling upgrade restarts the ones on
        older code."""
        return self.home / "code.hash"

    @property
    def pid_file(self) -> Path:
        return self.home / "role.pid"


_DEFAULT_ROOT = PurePosixPath("/var/lib/sitecloud")


@dataclass(frozen=True)
class SshTarget:
    """How the controller reaches a host over SSH, and where installs go there."""

    # The DNS name or IP address the controller dials (and pins the host key under).
    address: str
    port: int = 22
    user: str = "root"
    # A key other than the controller's own (``role add --ssh-key``); None means the controller's.
    key_file: Path | None = None
    # Everything sitecloud installs on the host lives under this directory.
    root: PurePosixPath = _DEFAULT_ROOT
    python: str = "python3"
    # "auto": a systemd unit where systemd is PID 1 on the host, else our hostagent.
    supervisor: Literal["auto", "systemd", "hostagent"] = "auto"


@dataclass(frozen=True)
class ProgressStep:
    """One step of putting a role on a host.

    Steps: wheelhouse (built on the controller when the code changed), connect, upload, install,
    configure, start, healthy.
    """

    step: str
    # "started" when it begins, "done" when it ends (``seconds`` is then how long it took).
    phase: Literal["started", "done"]
    seconds: float = 0.0
    detail: str = ""


ProgressCallback = Callable[[ProgressStep], None]


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

    async def ask_supervisor(self, kind: str) -> tuple[str, str]:
        """(state, reason) as the host's supervisor says now (it may be asked over the network);
        where :meth:`describe` is the supervisor's own view, that."""
        return self.describe(kind)


class FabricProvider(abc.ABC):
    """A source of hosts: ``local`` (this machine), ``ssh`` (existing hosts), ``netns`` (namespaces here)."""

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

    def ssh_target(self, host: str) -> SshTarget:
        """How to reach ``host`` over SSH (for providers whose hosts are reached that way)."""
        raise InvalidInput(f"the {self.name} fabric does not reach its hosts over SSH")
