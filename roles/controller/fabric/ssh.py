"""The ``ssh`` fabric: existing hosts the admin names by DNS name or IP; nothing to provision, only to reach.

``provision`` logs in once (pinning the host key on first contact) and records the host with how to
reach it in ``<cloud home>/fabric/ssh/hosts.json``; ``destroy`` forgets the host and its pinned key.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

from roles.controller.fabric._ssh import SshAccess, run_checked
from roles.controller.fabric._wheelhouse import Wheelhouse
from roles.controller.fabric.base import FabricProvider, HostInfo, SshTarget
from roles.controller.fabric.remote import RemoteLauncher
from shared.errors import NotFound
from shared.files import atomic_write_json, read_json
from shared.names import validate_hostname

__all__ = ["SshAccess", "SshFabric"]


class SshFabric(FabricProvider):
    name = "ssh"

    def __init__(
        self,
        cloud_home: Path,
        *,
        wheelhouse: Wheelhouse | None = None,
        client_ssl: ssl.SSLContext | None = None,
        defaults: SshTarget | None = None,
    ) -> None:
        self.dir = cloud_home / "fabric" / "ssh"
        self.state_file = self.dir / "hosts.json"
        self.access = SshAccess.for_cloud(cloud_home)
        self.wheelhouse = wheelhouse or Wheelhouse(cloud_home / "wheelhouse")
        self._client_ssl = client_ssl
        # User, port, root and so on for hosts added without saying otherwise.
        self._defaults = defaults or SshTarget(address="")
        self._lock = asyncio.Lock()
        self._launchers: dict[str, RemoteLauncher] = {}

    def _hosts(self) -> dict[str, dict[str, Any]]:
        if not self.state_file.exists():
            return {}
        hosts: dict[str, dict[str, Any]] = read_json(self.state_file).get("hosts", {})
        return hosts

    def _save(self, hosts: dict[str, dict[str, Any]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.state_file, {"hosts": hosts}, mode=0o600)

    async def list_hosts(self) -> list[HostInfo]:
        return [HostInfo(name, self.name, h["address"]) for name, h in sorted(self._hosts().items())]

    async def provision(self, name: str) -> HostInfo:
        return await self.add(name)

    async def add(
        self,
        name: str,
        *,
        user: str | None = None,
        port: int | None = None,
        key_file: Path | None = None,
        root: PurePosixPath | None = None,
    ) -> HostInfo:
        """Check ``name`` is reachable over SSH (pinning its key on first contact) and record it."""
        name = validate_hostname(name)
        target = replace(
            self._defaults,
            address=name,
            user=user or self._defaults.user,
            port=port or self._defaults.port,
            key_file=key_file or self._defaults.key_file,
            root=root or self._defaults.root,
        )
        conn = await self.access.connect(target)
        try:
            await run_checked(conn, "true", what=f"logging in to {name}", timeout=15)
            peer = conn.get_extra_info("peername")
        finally:
            conn.close()
            await conn.wait_closed()
        address = str(peer[0]) if peer else name
        async with self._lock:
            hosts = self._hosts()
            hosts[name] = {
                "address": address,
                "user": target.user,
                "port": target.port,
                "key_file": str(target.key_file) if target.key_file else None,
                "root": str(target.root),
            }
            self._save(hosts)
        self._launchers.pop(name, None)
        return HostInfo(name, self.name, address)

    async def destroy(self, name: str) -> None:
        """Forget the host (its machine is left alone) and its pinned key."""
        name = validate_hostname(name)
        async with self._lock:
            hosts = self._hosts()
            entry = hosts.pop(name, None)
            if entry is not None:
                self._save(hosts)
                await self.access.forget(name, int(entry["port"]))
        self._launchers.pop(name, None)

    def ssh_target(self, host: str) -> SshTarget:
        entry = self._hosts().get(host)
        if entry is None:
            raise NotFound(f"host {host!r} is not in the ssh fabric", hint="add it first with its DNS name")
        return replace(
            self._defaults,
            address=host,
            user=entry["user"],
            port=int(entry["port"]),
            key_file=Path(entry["key_file"]) if entry.get("key_file") else None,
            root=PurePosixPath(entry["root"]),
        )

    def launcher(self, host: str) -> RemoteLauncher:
        if host not in self._launchers:
            self._launchers[host] = RemoteLauncher(
                host, self.ssh_target(host), self.access, self.wheelhouse, client_ssl=self._client_ssl
            )
        return self._launchers[host]
