from __future__ import annotations

from dataclasses import dataclass

from shared.config import RoleConfig

__all__ = ["PublisherConfig"]


@dataclass(frozen=True, kw_only=True)
class PublisherConfig(RoleConfig):
    role: str = "publisher"
    ftp_port: int = 2121
    deploy_port: int = 8172
    # Inclusive range for FTP passive data connections; None lets the OS choose.
    passive_ports: tuple[int, int] | None = None
    # Address given to FTP clients in PASV replies when it differs from ``bind`` (NAT).
    masquerade_address: str | None = None
    # Largest zip accepted by web deploy, before the site's own quota is checked.
    max_deploy_bytes: int = 1024 * 1024 * 1024
    # Seconds before a wrong FTP password is answered (slows down guessing).
    ftp_auth_failed_delay: float = 2.0
    # Seconds an FTP control connection may sit idle before it is closed.
    ftp_idle_timeout: int = 300
