from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from shared.config import RoleConfig

__all__ = ["PublisherConfig", "TlsSessionReuse"]

# required: every data connection resumes. checked: one that does not is let in while the session's
# client has never resumed, if it was its data port's only connection. optional: the first one is let in.
TlsSessionReuse = Literal["required", "checked", "optional"]


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
    # Seconds an FTP control connection may sit idle after login before it is closed.
    ftp_idle_timeout: int = 300
    # Seconds from connecting to a completed login; an idle or slow client is closed with 421 after it.
    ftp_login_timeout: float = 30.0
    # FTP control connections at once, in all and from one client address (0 = no limit).
    ftp_max_connections: int = 512
    ftp_max_connections_per_ip: int = 16
    # Logged-in FTP sessions of one site at once (0 = no limit): one tenant, from however many
    # addresses, holds neither the whole connection table nor the passive port range.
    ftp_max_sessions_per_site: int = 16
    # Disk for the publisher's own copies of big files uploaded or downloaded over FTP (0 = none): a
    # download of one is then sent from local disk instead of fetched from the fileserver again.
    ftp_cache_bytes: int = 2 * 1024 * 1024 * 1024
    # Explicit FTPS (AUTH TLS). The certificate is the role's own (issued by the cloud CA for the
    # publisher's DNS names) unless the admin gives one by path.
    ftp_tls: bool = True
    ftp_tls_cert_file: Path | None = None
    ftp_tls_key_file: Path | None = None
    # Refuse USER before AUTH TLS, so no password ever crosses the network in clear text.
    require_tls: bool = False
    # Whether an FTPS data connection (PROT P) must resume its control connection's TLS session: the
    # only proof that it comes from the client rather than from someone else at the same address.
    # "checked" lets in clients that never resume (Python's ftplib.FTP_TLS as it stands) when their
    # data connection was the only one to reach its port; "required" refuses them; "optional" takes
    # whoever at the client's address connects to the data port first.
    ftp_tls_session_reuse: TlsSessionReuse = "checked"
    # Failed logins (FTP and web deploy together) before a client is refused for a while: for one
    # account from one address, and for any accounts from one address; the allowance refills over
    # ``login_failure_window`` seconds. The throttle tables keep at most ``login_throttle_entries``.
    login_failures_per_account: int = 5
    login_failures_per_address: int = 20
    login_failure_window: float = 300.0
    login_throttle_entries: int = 10_000
    # Longest a git push or an async zip deploy follows the site's build on its workers (pip and npm
    # may take up to ten minutes there).
    build_follow_seconds: float = 660.0
    # A worker that cannot be asked whether it serves a deploy (restarting, or stopped) is asked again
    # for this long before the deploy goes on without it.
    build_unreached_grace: float = 5.0

    def __post_init__(self) -> None:
        if self.require_tls and not self.ftp_tls:
            raise ValueError("require_tls needs ftp_tls")
        if self.ftp_tls_session_reuse not in get_args(TlsSessionReuse):
            raise ValueError(
                f"ftp_tls_session_reuse must be one of {', '.join(get_args(TlsSessionReuse))}, "
                f"not {self.ftp_tls_session_reuse!r}"
            )
        if (self.ftp_tls_key_file is not None) and self.ftp_tls_cert_file is None:
            raise ValueError("ftp_tls_key_file needs ftp_tls_cert_file")
        if self.passive_ports is not None:
            low, high = self.passive_ports
            if not 0 < low <= high < 65536:
                raise ValueError(f"passive_ports {low}-{high} is not a range of ports")
        # (name, value, least allowed): 0 connections means no limit; the throttle cannot be off.
        counts = (
            ("ftp_max_connections", self.ftp_max_connections, 0),
            ("ftp_max_connections_per_ip", self.ftp_max_connections_per_ip, 0),
            ("ftp_max_sessions_per_site", self.ftp_max_sessions_per_site, 0),
            ("login_failures_per_account", self.login_failures_per_account, 1),
            ("login_failures_per_address", self.login_failures_per_address, 1),
            ("login_throttle_entries", self.login_throttle_entries, 1),
            ("ftp_cache_bytes", self.ftp_cache_bytes, 0),
        )
        for name, value, least in counts:
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be a whole number >= {least}, not {value!r}")
        for name, seconds in (
            ("ftp_login_timeout", self.ftp_login_timeout),
            ("ftp_idle_timeout", self.ftp_idle_timeout),
            ("login_failure_window", self.login_failure_window),
            ("build_follow_seconds", self.build_follow_seconds),
            ("build_unreached_grace", self.build_unreached_grace),
        ):
            if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
                raise ValueError(f"{name} must be a number of seconds > 0, not {seconds!r}")

    @property
    def ftp_cert_file(self) -> Path:
        return self.ftp_tls_cert_file or self.cert_file

    @property
    def ftp_key_file(self) -> Path:
        return self.ftp_tls_key_file or (
            self.key_file if self.ftp_tls_cert_file is None else self.ftp_tls_cert_file
        )
