"""The cloud's home directory on the controller host, and everything first `up` creates in it.

HOME/ca/            the cloud CA (ca.key is 0600 and never leaves this directory)
HOME/controller/    the controller's own identity (it calls roles as OU=controller)
HOME/roles/<kind>/  each local role's own home: role.json, tls/, state/, content
HOME/logs/          one log per role process
HOME/cloud.json     choices that must stay stable across restarts (internal ports), and the admin's
                    role settings under each role's name (e.g. "publisher": {"require_tls": true})
HOME/admin-token    the admin API token (0600)
HOME/endpoints.json what the CLI and people need to reach the cloud
HOME/controller.pid locked by the running `sitecloud up` (see shared/home_lock.py)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from sqlalchemy import select

from roles.controller.config import CloudConfig
from roles.fileserver.config import FileserverConfig
from roles.frontend.config import FrontendConfig
from roles.management.config import ManagementConfig, backup_min_every_from_env
from roles.publisher.config import PublisherConfig
from roles.worker.config import WorkerConfig
from shared.config import RoleConfig, write_role_config
from shared.credentials import hash_token, new_token
from shared.db import ApiToken, Database
from shared.errors import InvalidInput
from shared.files import atomic_write_bytes, atomic_write_json, read_json
from shared.net import free_port
from shared.pki import RENEW_WITHIN_DAYS, CertificateAuthority, IssuedCert, certificate_expiry

__all__ = ["LOCAL_ROLES", "REMOTE_PORTS", "ROLE_SETTINGS", "CloudHome", "role_settings"]

C = TypeVar("C", bound=RoleConfig)

# Start order: what others depend on comes first.
LOCAL_ROLES = ("fileserver", "worker", "publisher", "frontend", "management")

# What an admin may set for every role of a kind in cloud.json, in the object under its name (e.g.
# "publisher": {"require_tls": true}); the rest of a role's config is the controller's to choose. The
# controller's own ("controller") are read by `sitecloud up` (see up.py).
ROLE_SETTINGS: dict[str, frozenset[str]] = {
    "publisher": frozenset(
        {
            "require_tls",
            "ftp_tls",
            "ftp_tls_session_reuse",
            "ftp_tls_cert_file",
            "ftp_tls_key_file",
            "masquerade_address",
            "passive_ports",
            "ftp_login_timeout",
            "ftp_idle_timeout",
            "ftp_max_connections",
            "ftp_max_connections_per_ip",
            "ftp_max_sessions_per_site",
            "login_failures_per_account",
            "login_failures_per_address",
            "login_failure_window",
            "login_throttle_entries",
            "max_deploy_bytes",
            "build_unreached_grace",
        }
    ),
    "frontend": frozenset(
        {"max_connections_per_ip", "handshake_share", "max_stalled_readers", "stalled_grace"}
    ),
    "worker": frozenset(
        {
            "app_home_removal_delay",
            "max_active_apps",
            "subscription_app_starts",
            "subscription_app_start_window",
        }
    ),
    "management": frozenset(
        {
            "role_stale_after",
            "api_reads_per_second",
            "api_read_burst",
            "api_writes_per_second",
            "api_write_burst",
        }
    ),
    "controller": frozenset({"revive_after", "role_stop_timeout"}),
}


def role_settings(state_file: Path, state: dict[str, Any], kind: str) -> dict[str, Any]:
    """The admin's settings for roles of ``kind`` from cloud.json (already read into ``state``)."""
    settings = state.get(kind) or {}
    if not isinstance(settings, dict):
        raise InvalidInput(f'{state_file}: "{kind}" must be an object of {kind} settings')
    allowed = ROLE_SETTINGS.get(kind, frozenset())
    unknown = set(settings) - allowed
    if unknown:
        raise InvalidInput(
            f"{state_file}: unknown {kind} settings {sorted(unknown)}",
            hint=f"settable: {', '.join(sorted(allowed))}" if allowed else f"{kind} has no settings here",
        )
    values = dict(settings)
    for key in ("ftp_tls_cert_file", "ftp_tls_key_file"):
        if values.get(key):
            values[key] = Path(values[key])
    if isinstance(values.get("passive_ports"), list):
        values["passive_ports"] = tuple(values["passive_ports"])
    return values


# Internal ports of roles on other hosts: each host has its own address, so they can be fixed.
REMOTE_PORTS = {"fileserver": 7401, "worker": 7402, "publisher": 7403, "frontend": 7404, "management": 7405}
_REMOTE_WORKER_DATA = 7412


class CloudHome:
    def __init__(self, config: CloudConfig) -> None:
        self.config = config
        self.root = config.home
        self.ca_dir = self.root / "ca"
        self.controller_dir = self.root / "controller"
        self.logs_dir = self.root / "logs"
        self.state_file = self.root / "cloud.json"
        self.admin_token_file = self.root / "admin-token"
        self.endpoints_file = self.root / "endpoints.json"
        self.ca: CertificateAuthority | None = None
        self._state: dict[str, Any] = {}

    def role_home(self, kind: str) -> Path:
        return self.root / "roles" / kind

    @property
    def local_roles(self) -> tuple[str, ...]:
        """The roles `up` runs on this machine (all of them unless ``--local-roles`` said otherwise)."""
        return tuple(k for k in LOCAL_ROLES if k in self.config.local_roles)

    @property
    def controller_identity(self) -> RoleConfig:
        """The controller's own identity: it calls roles as OU=controller and serves its internal API."""
        return RoleConfig(
            role="controller",
            host="localhost",
            home=self.controller_dir,
            bind=self.config.bind,
            control_port=self._state["internal_ports"]["controller"],
            log_level=self.config.log_level,
        )

    # -- first run and every run ------------------------------------------------------------------

    def prepare(self) -> None:
        """Create or refresh everything under HOME; idempotent, so a second `up` reuses it all."""
        self.root.mkdir(parents=True, exist_ok=True)
        # Search-only for others: a site's app, running as its own uid, may need to pass through to its
        # content under the worker's home. Nothing here is listable; what is private is 0700/0600.
        os.chmod(self.root, 0o711)  # noqa: S103
        self.logs_dir.mkdir(exist_ok=True)
        os.chmod(self.logs_dir, 0o700)
        (self.root / "roles").mkdir(exist_ok=True)
        os.chmod(self.root / "roles", 0o711)  # noqa: S103
        self._private_sqlite_file()
        self.ca = CertificateAuthority.load_or_create(self.ca_dir)
        self._state = read_json(self.state_file) if self.state_file.exists() else {}
        ports = self._state.setdefault("internal_ports", {})
        for name in (*LOCAL_ROLES, "controller", "worker_data"):
            if not ports.get(name):
                ports[name] = free_port(self.config.bind if self.config.bind != "0.0.0.0" else "127.0.0.1")
        self._write_role_home(self.controller_identity)
        for kind in LOCAL_ROLES:
            self._write_role_home(self._role_config(kind))
        self._write_wildcard()
        c = self.config
        # What the next `up` on this home uses where its command line says nothing (see up.py).
        self._state["up"] = {
            "domain": c.domain,
            "bind": c.bind_asked,
            "advertise": c.advertise,
            "http_port": c.http_port,
            "https_port": c.https_port,
            "ftp_port": c.ftp_port,
            "api_port": c.api_port,
            "deploy_port": c.deploy_port,
            "passive_ports": list(c.passive_ports) if c.passive_ports else None,
            "db": c.db_url,
            "local_roles": ",".join(c.local_roles),
            "usage_interval": c.usage_interval,
            "processes": c.processes,
        }
        atomic_write_json(self.state_file, self._state, mode=0o600)

    @property
    def internal_ports(self) -> dict[str, int]:
        return dict(self._state["internal_ports"])

    def _host_names(self) -> tuple[list[str], list[str]]:
        dns = ["localhost", socket.gethostname()]
        ips = ["127.0.0.1"]
        for name in (self.config.bind, self.config.advertise):
            if not name:
                continue
            try:
                ipaddress.ip_address(name)
            except ValueError:
                dns.append(name)
            else:
                if name not in ("0.0.0.0", "127.0.0.1"):
                    ips.append(name)
        return sorted(set(dns)), sorted(set(ips))

    def _names_cover(self, cert_file: Path) -> bool:
        """Whether ``cert_file`` names every address this machine's roles are reached at now (an
        ``up --advertise`` after a plain ``up`` needs new certificates)."""
        dns, ips = self._host_names()
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (OSError, ValueError, x509.ExtensionNotFound):
            return False
        have_dns = set(sans.get_values_for_type(x509.DNSName))
        have_ips = {str(a) for a in sans.get_values_for_type(x509.IPAddress)}
        return set(dns) <= have_dns and set(ips) <= have_ips

    def _issue(self, kind: str, role: str) -> Any:
        assert self.ca is not None
        dns, ips = self._host_names()
        return self.ca.issue(f"{kind}@localhost", role=role, dns_names=dns, ip_addresses=ips)

    def _role_config(self, kind: str) -> RoleConfig:
        c, ports = self.config, self._state["internal_ports"]
        common: dict[str, Any] = {
            "host": "localhost",
            "home": self.role_home(kind),
            "bind": c.bind,
            "control_port": ports[kind],
            "log_level": c.log_level,
            "controller_url": f"https://localhost:{ports['controller']}",
        }
        if kind == "frontend":
            return self._configured(
                "frontend",
                FrontendConfig,
                **common,
                http_port=c.http_port,
                https_port=c.https_port,
                usage_interval=c.usage_interval,
                processes=c.processes,
                # The worker's serving processes share one listener, so one lane per front-end
                # process may well land on the same one of them: as many lanes as processes
                # spread the load over them.
                lanes_per_worker=c.processes,
            )
        if kind == "worker":
            return self._configured(
                "worker",
                WorkerConfig,
                **common,
                data_port=ports["worker_data"],
                usage_interval=c.usage_interval,
                processes=c.processes,
            )
        if kind == "fileserver":
            return FileserverConfig(**common)
        if kind == "publisher":
            return self._configured(
                "publisher",
                PublisherConfig,
                **common,
                ftp_port=c.ftp_port,
                deploy_port=c.deploy_port,
                passive_ports=c.passive_ports,
                masquerade_address=None if c.bind != "0.0.0.0" else c.public_host,
            )
        if kind == "management":
            return self._configured(
                "management",
                ManagementConfig,
                **common,
                api_port=c.api_port,
                db_url=c.database_url,
                domain=c.domain,
                https_port=c.https_port,
                ftp_host=c.public_host,
                ftp_port=c.ftp_port,
                deploy_url=f"https://{c.public_host}:{c.deploy_port}",
                # Until the controller's snapshot says where a publisher runs: the one `up` runs here.
                publisher_url=f"https://localhost:{ports['publisher']}"
                if "publisher" in self.local_roles
                else "",
                backup_min_every=backup_min_every_from_env(),
            )
        raise ValueError(f"unknown role {kind!r}")

    def _configured(self, kind: str, cls: type[C], **fields: Any) -> C:
        """A role's config: the controller's choices, then the admin's settings from cloud.json."""
        try:
            return cls(**{**fields, **role_settings(self.state_file, self._state, kind)})
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"{self.state_file}: bad {kind} settings: {exc}") from None

    def ensure_controller_address(self, ip: str) -> bool:
        """Make the controller's certificate also name ``ip`` (where netns hosts reach it); True if new."""
        assert self.ca is not None
        identity = self.controller_identity
        cert = x509.load_pem_x509_certificate(identity.cert_file.read_bytes())
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have = {str(a) for a in sans.get_values_for_type(x509.IPAddress)}
        except x509.ExtensionNotFound:
            have = set()
        if ip in have:
            return False
        dns, ips = self._host_names()
        self.ca.issue(
            "controller@localhost", role="controller", dns_names=dns, ip_addresses=[*ips, *sorted(have), ip]
        ).write(identity.key_file, identity.cert_file)
        return True

    # -- roles on other hosts ---------------------------------------------------------------------

    def remote_ports(self, kind: str) -> tuple[int, dict[str, Any]]:
        """(control port, public ports) of a role on a host of its own."""
        c = self.config
        ports: dict[str, Any] = {
            "frontend": {"http": c.http_port, "https": c.https_port},
            "worker": {"data": _REMOTE_WORKER_DATA},
            "publisher": {"ftp": c.ftp_port, "deploy": c.deploy_port},
            "management": {"api": c.api_port},
        }.get(kind, {})
        return REMOTE_PORTS[kind], ports

    def remote_role_config(
        self,
        kind: str,
        host: str,
        home: Path,
        *,
        controller_url: str,
        publisher_url: str = "",
        size: str | None = None,
    ) -> RoleConfig:
        """The bootstrap config of a role on ``host`` (its home is a path on that host)."""
        c = self.config
        control, ports = self.remote_ports(kind)
        common: dict[str, Any] = {
            "host": host,
            "home": home,
            # The host is the role's own: listen on every address it has.
            "bind": "0.0.0.0",
            "control_port": control,
            "log_level": c.log_level,
            "controller_url": controller_url,
        }
        if kind == "frontend":
            return self._configured(
                "frontend",
                FrontendConfig,
                **common,
                http_port=ports["http"],
                https_port=ports["https"],
                usage_interval=c.usage_interval,
            )
        if kind == "worker":
            worker = self._configured(
                "worker", WorkerConfig, **common, data_port=ports["data"], usage_interval=c.usage_interval
            )
            return dataclasses.replace(worker, size=size) if size else worker
        if kind == "fileserver":
            return FileserverConfig(**common)
        if kind == "publisher":
            return self._configured(
                "publisher",
                PublisherConfig,
                **common,
                ftp_port=ports["ftp"],
                deploy_port=ports["deploy"],
                passive_ports=c.passive_ports,
            )
        if kind == "management":
            return self._configured(
                "management",
                ManagementConfig,
                **common,
                api_port=ports["api"],
                db_url=c.database_url,
                domain=c.domain,
                https_port=c.https_port,
                ftp_host=host,
                ftp_port=c.ftp_port,
                deploy_url=f"https://{host}:{c.deploy_port}",
                publisher_url=publisher_url,
                backup_min_every=backup_min_every_from_env(),
            )
        raise ValueError(f"unknown role {kind!r}")

    def issue_role_cert(self, kind: str, host: str, address: str) -> IssuedCert:
        """A role's key and certificate naming its host by name and address (peers verify either)."""
        assert self.ca is not None
        ips: list[str] = []
        dns = [host]
        try:
            ips.append(str(ipaddress.ip_address(address)))
        except ValueError:
            if address and address != host:
                dns.append(address)
        return self.ca.issue(f"{kind}@{host}", role=kind, dns_names=dns, ip_addresses=ips)

    def wildcard_pems(self) -> tuple[bytes, bytes]:
        """(key, certificate) of the front ends' ``*.<domain>`` certificate, for front ends elsewhere."""
        fe = self._role_config("frontend")
        assert isinstance(fe, FrontendConfig)
        return fe.wildcard_key_file.read_bytes(), fe.wildcard_cert_file.read_bytes()

    @property
    def ca_pem(self) -> bytes:
        assert self.ca is not None
        return self.ca.cert_pem

    def _private_sqlite_file(self) -> None:
        """Create the default SQLite DB 0600 before SQLite does: its WAL files inherit that mode."""
        if self.config.db_url:
            return
        path = self.root / "sitecloud.db"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)

    def _write_role_home(self, config: RoleConfig) -> None:
        assert self.ca is not None
        if not config.home.exists():
            # Private when made; afterwards the role owns its mode (a worker opens its home to
            # search-only when its sites' apps live there: roles/worker/apps).
            config.home.mkdir(parents=True)
            os.chmod(config.home, 0o700)
        config.tls_dir.mkdir(exist_ok=True)
        if (
            not config.key_file.exists()
            or not self._names_cover(config.cert_file)
            or _renew_due(config.cert_file)
        ):
            self._issue(config.role, config.role).write(config.key_file, config.cert_file)
        atomic_write_bytes(config.ca_file, self.ca.cert_pem)
        write_role_config(config, config.home / "role.json")

    def renew_certificates(self, kind: str) -> None:
        """Issue this machine's role ``kind`` (and a front end's wildcard) a new certificate where its
        own is within its last 30 days: `role repair` of a role `up` runs, as on another host."""
        self._write_role_home(self._role_config(kind))
        if kind == "frontend":
            self._write_wildcard()

    def _write_wildcard(self) -> None:
        """The front end's ``*.<domain>`` certificate; issued again when the domain changes."""
        assert self.ca is not None
        fe = self._role_config("frontend")
        assert isinstance(fe, FrontendConfig)
        if (
            self._state.get("wildcard_domain") != self.config.domain
            or not fe.wildcard_cert_file.exists()
            or _renew_due(fe.wildcard_cert_file)
        ):
            self.ca.issue_wildcard(self.config.domain).write(fe.wildcard_key_file, fe.wildcard_cert_file)
            self._state["wildcard_domain"] = self.config.domain

    # -- credentials and endpoints ----------------------------------------------------------------

    def ensure_admin_token(self, db: Database) -> None:
        """An admin token that matches the DB; a new one when the file or its DB row is missing."""
        token = self.admin_token_file.read_text().strip() if self.admin_token_file.exists() else ""
        with db.session() as session:
            if token and session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token))):
                return
            token = new_token("sca")
            session.add(ApiToken(token_hash=hash_token(token), name="admin", tenant_id=None))
        atomic_write_bytes(self.admin_token_file, token.encode() + b"\n", mode=0o600)

    def endpoints(self) -> dict[str, Any]:
        c = self.config
        host = c.public_host
        return {
            "domain": c.domain,
            "api": f"https://{host}:{c.api_port}",
            "sites": {
                "https": f"https://<site>.{c.domain}:{c.https_port}/",
                "http": f"http://<site>.{c.domain}:{c.http_port}/",
            },
            "ftp": {"host": host, "port": c.ftp_port},
            "deploy": f"https://{host}:{c.deploy_port}/api/deploy/<site>",
            "ca_cert": str(self.ca_dir / "ca.pem"),
            "admin_token_file": str(self.admin_token_file),
            "database": c.database_url if not c.db_url else c.db_url.split("@")[-1],
            "logs": str(self.logs_dir),
            "controller": f"https://localhost:{self.internal_ports['controller']}",
        }

    def write_endpoints(self) -> dict[str, Any]:
        endpoints = self.endpoints()
        atomic_write_json(self.endpoints_file, endpoints, mode=0o644)
        return endpoints


def _renew_due(cert_file: Path) -> bool:
    """Whether the certificate in ``cert_file`` is within :data:`RENEW_WITHIN_DAYS` of its end (or past
    it, or unreadable): `up` then issues a new one, as `role repair` does for a role on another host."""
    expires = certificate_expiry(cert_file)
    return expires is None or expires - dt.datetime.now(dt.UTC) <= dt.timedelta(days=RENEW_WITHIN_DAYS)
