"""The ``local`` fabric: one host, this machine; role processes supervised by the controller itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

from roles.controller.fabric.base import FabricProvider, HostInfo, RoleLauncher, RoleSpec
from roles.controller.supervisor import STOP_TIMEOUT, RoleProcessSupervisor
from shared.errors import InvalidInput, NotFound

__all__ = ["LOCAL_HOST", "LocalFabric", "LocalLauncher"]

LOCAL_HOST = "localhost"


class LocalLauncher(RoleLauncher):
    def __init__(self, log_dir: Path, *, stop_timeout: float = STOP_TIMEOUT) -> None:
        self._log_dir = log_dir
        self._stop_timeout = stop_timeout
        self._roles: dict[str, RoleProcessSupervisor] = {}

    async def start(self, spec: RoleSpec) -> None:
        if spec.kind in self._roles:
            return
        supervisor = RoleProcessSupervisor(
            spec, self._log_dir / f"{spec.kind}.log", stop_timeout=self._stop_timeout
        )
        self._roles[spec.kind] = supervisor
        await supervisor.start()

    async def restart(self, spec: RoleSpec) -> None:
        """A new process for the role on the listeners its supervisor holds (started if it was not)."""
        supervisor = self._roles.get(spec.kind)
        if supervisor is None:
            await self.start(spec)
            return
        await supervisor.restart()

    def listeners(self, kind: str) -> dict[str, int]:
        """The ports held for a role, by listener name (empty when it is not supervised here)."""
        supervisor = self._roles.get(kind)
        return supervisor.listeners if supervisor is not None else {}

    async def stop(self, kind: str) -> None:
        supervisor = self._roles.pop(kind, None)
        if supervisor is not None:
            await supervisor.stop()

    async def stop_all(self) -> None:
        # Front ends first so visitors stop arriving, then the rest together.
        await self.stop("frontend")
        await asyncio.gather(*(self.stop(kind) for kind in list(self._roles)))

    def describe(self, kind: str) -> tuple[str, str]:
        supervisor = self._roles.get(kind)
        if supervisor is None:
            return "stopped", ""
        return supervisor.state, supervisor.reason


class LocalFabric(FabricProvider):
    name = "local"

    def __init__(
        self, log_dir: Path, address: str = "127.0.0.1", *, stop_timeout: float = STOP_TIMEOUT
    ) -> None:
        self._host = HostInfo(LOCAL_HOST, self.name, address)
        self._launcher = LocalLauncher(log_dir, stop_timeout=stop_timeout)

    async def list_hosts(self) -> list[HostInfo]:
        return [self._host]

    async def provision(self, name: str) -> HostInfo:
        if name != LOCAL_HOST:
            raise InvalidInput(
                f"the local fabric has one host, {LOCAL_HOST!r}", hint="use --fabric ssh or netns"
            )
        return self._host

    async def destroy(self, name: str) -> None:
        raise InvalidInput("the local fabric cannot destroy this machine")

    def launcher(self, host: str) -> RoleLauncher:
        if host != LOCAL_HOST:
            raise NotFound(f"host {host!r} is not in the local fabric")
        return self._launcher
