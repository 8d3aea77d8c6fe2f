from __future__ import annotations

import os
from dataclasses import dataclass

from shared.config import RoleConfig

__all__ = [
    "BACKUP_MIN_EVERY_ENV",
    "DEFAULT_BACKUP_MIN_EVERY",
    "ManagementConfig",
    "backup_min_every_from_env",
]

# The shortest scheduled-backup interval a plan may ask for: an hour, unless the cloud's operator sets
# another in this variable for `sitecloud up` (tests use a second or two).
DEFAULT_BACKUP_MIN_EVERY = 3600
BACKUP_MIN_EVERY_ENV = "SITECLOUD_BACKUP_MIN_SECONDS"


def backup_min_every_from_env() -> int:
    """``SITECLOUD_BACKUP_MIN_SECONDS`` when set (read where the controller writes management's
    config), else an hour."""
    raw = os.environ.get(BACKUP_MIN_EVERY_ENV, "")
    if not raw:
        return DEFAULT_BACKUP_MIN_EVERY
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{BACKUP_MIN_EVERY_ENV} must be a number of seconds, not {raw!r}") from None
    if value < 1:
        raise ValueError(f"{BACKUP_MIN_EVERY_ENV} must be at least 1 second, not {value}")
    return value


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
    # The shortest scheduled-backup interval a plan may set (see backup_min_every_from_env).
    backup_min_every: int = DEFAULT_BACKUP_MIN_EVERY
    # The controller checks every role each second or two: a state it recorded longer ago than this
    # is not known now, and is shown as Unknown.
    role_stale_after: float = 10.0
    # How fast one tenant may call the REST API (roles/management/_ratelimit.py): reads and changes
    # each a burst, then a steady rate per second; past it, 429 with Retry-After. Admins are not held.
    api_reads_per_second: float = 20.0
    api_read_burst: int = 200
    api_writes_per_second: float = 5.0
    api_write_burst: int = 60

    def __post_init__(self) -> None:
        after = self.role_stale_after
        if not isinstance(after, int | float) or isinstance(after, bool) or after <= 0:
            raise ValueError(f"role_stale_after must be a number of seconds > 0, not {after!r}")
        for name in ("api_reads_per_second", "api_read_burst", "api_writes_per_second", "api_write_burst"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a number of at least 1, not {value!r}")
