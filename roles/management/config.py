from __future__ import annotations

from dataclasses import dataclass

from shared.config import RoleConfig

__all__ = ["ManagementConfig"]


@dataclass(frozen=True, kw_only=True)
class ManagementConfig(RoleConfig):
    role: str = "management"
    api_port: int = 8090
    db_url: str = ""
    # What a site's JSON tells its owner: where the site and its publishing endpoints are.
    domain: str = "sites.localhost"
    https_port: int = 8443
    ftp_host: str = "127.0.0.1"
    ftp_port: int = 2121
    deploy_url: str = "https://127.0.0.1:8172"
    # The publisher's control URL: management forwards `sitecloud deploy` there over mTLS.
    publisher_url: str = ""
