"""The controller's typed config: what `sitecloud up` was asked for, resolved once in :func:`load`."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import InvalidInput
from shared.names import validate_hostname

__all__ = ["DEFAULT_HOME", "CloudConfig"]

DEFAULT_HOME = Path.home() / ".local" / "share" / "sitecloud"


@dataclass(frozen=True, kw_only=True)
class CloudConfig:
    home: Path
    domain: str = "sites.localhost"
    bind: str = "127.0.0.1"
    http_port: int = 8080
    https_port: int = 8443
    ftp_port: int = 2121
    api_port: int = 8090
    deploy_port: int = 8172
    passive_ports: tuple[int, int] | None = None
    # SQLAlchemy URL of the runtime DB; empty means the SQLite file under home.
    db_url: str = ""
    log_level: str = "INFO"
    # Seconds between health polls of every role.
    health_interval: float = 1.0
    # A role that answered before and has been silent this long is hung (alive but stuck, so its
    # supervisor sees nothing wrong): the controller restarts it, as an admin's `role restart` would.
    revive_after: float = 15.0
    # Seconds a role process of this machine has to stop on SIGTERM before it is killed.
    role_stop_timeout: float = 10.0
    # Seconds between usage reports of front ends and workers: how soon a daily quota stops a site.
    usage_interval: float = 30.0
    # Serving processes of this machine's front end and worker (each shares its listeners); one per
    # core is the usual choice on a box of their own.
    processes: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    # The roles `up` runs on this machine; "management" alone makes a control-plane box whose data
    # plane lives on other hosts (`sitecloud role add`).
    local_roles: tuple[str, ...] = ("fileserver", "worker", "publisher", "frontend", "management")
    # Where wheelhouses for role hosts are built and kept (one per code version, shared by every cloud
    # home of this user); None means $SITECLOUD_WHEELHOUSE, else ~/.cache/sitecloud/wheelhouse.
    wheelhouse: Path | None = None
    # The address (or DNS name) at which roles on other hosts reach this machine's roles; empty means
    # this machine's roles are reachable only here, and a role on another host that would need one is
    # refused.
    advertise: str = ""
    # The bind address as asked for, before --advertise widened a loopback one: what the next `up`
    # on this home keeps (an `up` without --advertise serves only this machine again).
    bind_asked: str = field(default="", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "domain", validate_hostname(self.domain))
        object.__setattr__(self, "bind_asked", self.bind)
        if self.advertise:
            object.__setattr__(self, "advertise", _address_or_name(self.advertise))
            if self.bind in ("127.0.0.1", "localhost", "::1"):
                # Reachable from elsewhere means listening beyond loopback.
                object.__setattr__(self, "bind", "0.0.0.0")
        object.__setattr__(self, "home", self.home.expanduser().resolve())
        for name in ("revive_after", "role_stop_timeout"):
            seconds = getattr(self, name)
            if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
                raise InvalidInput(f"{name} must be a number of seconds > 0, not {seconds!r}")
        unknown = set(self.local_roles) - {"fileserver", "worker", "publisher", "frontend", "management"}
        if unknown or "management" not in self.local_roles:
            raise InvalidInput(
                f"--local-roles {','.join(self.local_roles)} is not a set of roles that includes management",
                hint="e.g. --local-roles management, or leave it out for all five",
            )

    @property
    def wheelhouse_dir(self) -> Path:
        if self.wheelhouse is not None:
            return self.wheelhouse
        if os.environ.get("SITECLOUD_WHEELHOUSE"):
            return Path(os.environ["SITECLOUD_WHEELHOUSE"])
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cache / "sitecloud" / "wheelhouse"

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home / 'sitecloud.db'}"

    @property
    def public_host(self) -> str:
        """The address people are told to use for the API, FTP and web deploy."""
        return "127.0.0.1" if self.bind in ("127.0.0.1", "0.0.0.0", "") else self.bind

    @staticmethod
    def home_from_env(explicit: str | None) -> Path:
        return Path(explicit or os.environ.get("SITECLOUD_HOME") or DEFAULT_HOME)


def _address_or_name(value: str) -> str:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        try:
            return validate_hostname(value)
        except InvalidInput:
            raise InvalidInput(
                f"--advertise {value!r} is neither an IP address nor a DNS name",
                hint="the address other hosts reach this machine at, e.g. --advertise 10.0.0.5",
            ) from None
    if address.is_loopback or address.is_unspecified:
        raise InvalidInput(
            f"--advertise {value} cannot be reached from another host",
            hint="give this machine's address on the network the role hosts share",
        )
    return str(address)
