"""SQLAlchemy 2.x models of the runtime DB (desired state and what the controller observed)."""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "ApiToken",
    "Base",
    "CloudState",
    "CustomHostname",
    "Host",
    "PasswordReset",
    "Plan",
    "PortalSession",
    "PublishingCredential",
    "Role",
    "Setting",
    "Site",
    "SiteAssignment",
    "Subscription",
    "Tenant",
    "User",
]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _uid() -> str:
    return uuid.uuid4().hex


def _verification_id() -> str:
    return secrets.token_hex(32).upper()


# A worker added without a size; its apps get this size's limits.
DEFAULT_WORKER_SIZE = "small"


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class CloudState(Base):
    """Key/value facts about the cloud; ``generation`` goes up with every desired-state change."""

    __tablename__ = "cloud_state"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)


class Plan(Base):
    __tablename__ = "plans"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    max_sites: Mapped[int]
    storage_mb: Mapped[int]
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow, server_default=func.now())
    # NULL bandwidth/CPU means unlimited; a site over either for the UTC day is stopped (shared.quota).
    bandwidth_mb_per_day: Mapped[int | None] = mapped_column(default=None)
    cpu_minutes_per_day: Mapped[int | None] = mapped_column(default=None)
    max_custom_hostnames: Mapped[int] = mapped_column(default=0, server_default="0")
    compute_mode: Mapped[str] = mapped_column(String(16), default="shared", server_default="shared")
    # small | medium | large when compute_mode is "reserved"; NULL for shared.
    worker_size: Mapped[str | None] = mapped_column(String(16), default=None)
    always_on: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    max_instances_per_site: Mapped[int] = mapped_column(default=1, server_default="1")
    # Public plans are offered to tenants in the portal; retired plans take no new subscriptions.
    public: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    retired: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Content versions a site keeps: the last ``keep_versions``, and all of the last ``keep_days`` days.
    keep_versions: Mapped[int] = mapped_column(default=20, server_default="20")
    keep_days: Mapped[int] = mapped_column(default=0, server_default="0")
    # Scheduled backups: each site's current content as a zip this often (0: off), the last N kept.
    backup_every_seconds: Mapped[int] = mapped_column(default=0, server_default="0")
    backup_keep: Mapped[int] = mapped_column(default=7, server_default="7")


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow, server_default=func.now())
    subscriptions: Mapped[list[Subscription]] = relationship(back_populates="tenant")


class ApiToken(Base):
    """A bearer token: an admin's when ``tenant_id`` is NULL, else the tenant's. Only the hash is kept."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(64), default="default")
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow, server_default=func.now())
    # The user who made it (NULL for the seeded admin token and tokens made with `tenant create`).
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), default=None)
    # The first characters of the token, so people can tell their tokens apart.
    prefix: Mapped[str] = mapped_column(String(16), default="", server_default="")
    last_used_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class User(Base):
    """A person who signs in to a portal: an admin when ``tenant_id`` is NULL, else a tenant's user."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow, server_default=func.now())
    last_sign_in_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class PortalSession(Base):
    """A signed-in browser. Only a hash of the cookie's value is kept; the CSRF token goes in forms."""

    __tablename__ = "portal_sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow, server_default=func.now())
    expires_at: Mapped[dt.datetime]


class PasswordReset(Base):
    """A one-time link an admin issued so a user can set a new password (there is no mail to send it
    by). Only a hash of its token is kept; it works once, until ``expires_at``."""

    __tablename__ = "password_resets"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow, server_default=func.now())
    expires_at: Mapped[dt.datetime]
    used_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Setting(Base):
    """Cloud-wide settings an admin changes at run time (e.g. whether tenants may sign up)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON)


class Subscription(Base):
    __tablename__ = "subscriptions"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    plan_id: Mapped[int] = mapped_column(ForeignKey("plans.id"))
    state: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow, server_default=func.now())
    # Shown to the tenant: a TXT record asuid.<hostname> holding it proves the tenant owns the name.
    verification_id: Mapped[str] = mapped_column(String(64), default=_verification_id)
    tenant: Mapped[Tenant] = relationship(back_populates="subscriptions")
    plan: Mapped[Plan] = relationship()
    sites: Mapped[list[Site]] = relationship(back_populates="subscription")


class Site(Base):
    __tablename__ = "sites"
    id: Mapped[int] = mapped_column(primary_key=True)
    # Immutable: content is stored by uid, so a name used again starts empty.
    uid: Mapped[str] = mapped_column(String(32), unique=True, default=_uid)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    subscription_id: Mapped[int] = mapped_column(ForeignKey("subscriptions.id", ondelete="CASCADE"))
    # Workers the tenant asked to run the site on (`site scale`); NULL: the platform's default.
    instances: Mapped[int | None] = mapped_column(default=None)
    state: Mapped[str] = mapped_column(String(16), default="running")
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow, server_default=func.now())
    # Key/value app settings; a later issue hands them to the site's app processes.
    app_settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    # The UTC day an admin lifted the site's quota stop: it serves for the rest of that day.
    quota_lifted_day: Mapped[dt.date | None] = mapped_column(Date, default=None)
    # A deployment slot (``<production>-<slot_name>``) is a site of its own linked to its production site.
    slot_of_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), default=None)
    slot_name: Mapped[str | None] = mapped_column(String(20), default=None)
    # After slot swaps: the site whose workers answer this site's host names; NULL: its own.
    routed_to_id: Mapped[int | None] = mapped_column(
        ForeignKey("sites.id", ondelete="SET NULL"), default=None
    )
    # App settings bound to the address, not the content: a swap leaves them where they were.
    sticky_settings: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")
    # The config generation that makes it serve (its creation, its start, its subscription's resume):
    # until the serving roles run that one, nothing serves it. NULL once management saw a generation
    # at least as new applied everywhere; a generation of this cloud, so a backup does not keep it.
    live_from: Mapped[int | None] = mapped_column(default=None)
    # How many times its owner asked to restart its app: each ask is a new value in the workers'
    # snapshot, which replace the site's app processes. A count of this cloud's, so a backup leaves it.
    restarts: Mapped[int] = mapped_column(default=0, server_default="0")
    subscription: Mapped[Subscription] = relationship(back_populates="sites")
    hostnames: Mapped[list[CustomHostname]] = relationship(
        back_populates="site", cascade="all, delete-orphan", order_by="CustomHostname.hostname"
    )
    credentials: Mapped[list[PublishingCredential]] = relationship(
        back_populates="site", cascade="all, delete-orphan"
    )
    assignments: Mapped[list[SiteAssignment]] = relationship(
        back_populates="site", cascade="all, delete-orphan"
    )


class PublishingCredential(Base):
    """FTP / web-deploy user of a site; the password is stored as a scrypt hash only."""

    __tablename__ = "publishing_credentials"
    id: Mapped[int] = mapped_column(primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"))
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    site: Mapped[Site] = relationship(back_populates="credentials")


class CustomHostname(Base):
    """A host name of the tenant's own that also serves a site, with its certificate (PEM) if any."""

    __tablename__ = "custom_hostnames"
    id: Mapped[int] = mapped_column(primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"))
    hostname: Mapped[str] = mapped_column(String(253), unique=True)
    cert_pem: Mapped[str | None] = mapped_column(Text, default=None)
    key_pem: Mapped[str | None] = mapped_column(Text, default=None)
    cert_not_after: Mapped[dt.datetime | None] = mapped_column(default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow, server_default=func.now())
    # "pending" until DNS proves the tenant owns the name, then "verified"; only verified names are routed.
    state: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    verified_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # The last ownership check: when, and what DNS said if it did not prove the claim.
    checked_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    check_result: Mapped[str | None] = mapped_column(Text, default=None)
    # Where the certificate came from: "upload" (the tenant's, never replaced by ACME) or "acme".
    cert_source: Mapped[str | None] = mapped_column(String(8), default=None)
    cert_not_before: Mapped[dt.datetime | None] = mapped_column(default=None)
    # ACME work on the name (the controller's): None before the first order, then issuing/valid/failed.
    acme_state: Mapped[str | None] = mapped_column(String(16), default=None)
    acme_reason: Mapped[str | None] = mapped_column(Text, default=None)
    # Orders failed in a row, for the back-off; 0 after a success.
    acme_failures: Mapped[int] = mapped_column(default=0, server_default="0")
    # When the controller next orders a certificate: the renewal time, the end of a back-off, or now
    # (NULL) for a name just verified or a renewal asked for.
    acme_due_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # When the last order started: a tenant may not ask for another within minutes (the CA's rate limits).
    acme_attempted_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    site: Mapped[Site] = relationship(back_populates="hostnames")


class Host(Base):
    """A machine role processes run on, as the fabric provider knows it."""

    __tablename__ = "hosts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)
    fabric: Mapped[str] = mapped_column(String(32), default="local")
    address: Mapped[str] = mapped_column(String(253), default="")
    state: Mapped[str] = mapped_column(String(16), default="ready")
    roles: Mapped[list[Role]] = relationship(back_populates="host", cascade="all, delete-orphan")


class Role(Base):
    """One role process on one host: where it listens and what the controller last saw of it."""

    __tablename__ = "roles"
    __table_args__ = (UniqueConstraint("kind", "host_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"))
    control_port: Mapped[int]
    # Role-specific listening ports, e.g. {"data": 9101} for a worker, {"ftp": 2121, "deploy": 8172}.
    ports: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="Starting")
    reason: Mapped[str] = mapped_column(String(512), default="")
    code_version: Mapped[str] = mapped_column(String(64), default="")
    config_version: Mapped[int] = mapped_column(default=0)
    last_heartbeat: Mapped[dt.datetime | None]
    # What the admin wants: "running" or "stopped" (role start/stop).
    desired_state: Mapped[str] = mapped_column(String(16), default="running", server_default="running")
    # small | medium | large for workers (NULL: DEFAULT_WORKER_SIZE); NULL elsewhere.
    size: Mapped[str | None] = mapped_column(String(16), default=None)
    # A worker reserved for one subscription's sites (its id); NULL for the shared pool.
    reserved_for_id: Mapped[int | None] = mapped_column(default=None)
    # The code hash (wheelhouse) the controller installed; "" for roles run from the checkout.
    code_hash: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # Load figures from the role's last health answer.
    load: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    host: Mapped[Host] = relationship(back_populates="roles")


class SiteAssignment(Base):
    """A site placed on a worker role."""

    __tablename__ = "site_assignments"
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), primary_key=True)
    role_id: Mapped[int] = mapped_column(ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True)
    # When the site was placed there: its first workers take its requests, one added later stands by
    # (its app's writable folder there starts empty).
    since: Mapped[dt.datetime] = mapped_column(default=_utcnow, server_default=func.now())
    site: Mapped[Site] = relationship(back_populates="assignments")
    role: Mapped[Role] = relationship()


class SiteUsage(Base):
    """A site's usage per UTC day (metering): requests and bytes through the front ends, CPU and
    memory-seconds of its app on the workers, and the storage it held when last seen that day."""

    __tablename__ = "site_usage"
    site: Mapped[str] = mapped_column(String(63), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_in: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_out: Mapped[int] = mapped_column(BigInteger, default=0)
    cpu_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    memory_mb_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    storage_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)


class UsageReport(Base):
    """Report ids already counted: a front end resends a report until it is taken, so drop repeats."""

    __tablename__ = "usage_reports"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(default=_utcnow)
