"""Where tenants publish to and where management forwards web deploys: the publisher's addresses.

Management's role.json gives a first answer (the publisher `up` runs on this machine, if any); the
controller's snapshot gives the real one, from where a publisher actually runs, and a new one when it
moves to another host.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from roles.management.config import ManagementConfig
from shared.contracts.snapshots import ManagementSnapshot

__all__ = ["PublishingEndpoints"]


@dataclass(frozen=True)
class PublishingEndpoints:
    # The publisher's control URL, where web deploys go over mTLS ("": no publisher runs).
    control_url: str
    # The host and port tenants give their FTP clients.
    ftp_host: str
    ftp_port: int
    # ``https://host:port``: web deploy's base URL (``/api/deploy/<site>``, ``/<site>.git``).
    deploy_url: str

    @classmethod
    def from_config(cls, config: ManagementConfig) -> PublishingEndpoints:
        return cls(config.publisher_url, config.ftp_host, config.ftp_port, config.deploy_url.rstrip("/"))

    @classmethod
    def from_snapshot(cls, snapshot: ManagementSnapshot, config: ManagementConfig) -> PublishingEndpoints:
        if "publisher" not in snapshot.model_fields_set:
            # A controller a release older says nothing about it: role.json stands.
            return cls.from_config(config)
        address = snapshot.publisher
        if address is None:
            # Tenants keep being told the usual address; web deploy says no publisher runs.
            return cls("", config.ftp_host, config.ftp_port, config.deploy_url.rstrip("/"))
        host = f"[{address.public_host}]" if ":" in address.public_host else address.public_host
        return cls(
            address.control_url,
            address.public_host,
            address.ftp_port,
            f"https://{host}:{address.deploy_port}",
        )

    @property
    def host_names(self) -> list[str]:
        """The names in these addresses (no tenant may claim one as a custom hostname)."""
        urls = (self.control_url, self.deploy_url)
        return [self.ftp_host, *(urlsplit(u).hostname or "" for u in urls if u)]
