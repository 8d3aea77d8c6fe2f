"""The management role's unit-of-work functions over the runtime DB (synchronous; run off the event loop).

Each write is one transaction that also bumps the cloud's generation, so the controller sees either all
of a change or none of it.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from roles.management.config import ManagementConfig
from shared.credentials import hash_password, hash_token, new_password, new_token
from shared.db import (
    ApiToken,
    Database,
    Plan,
    PublishingCredential,
    Role,
    Site,
    Subscription,
    Tenant,
    bump_generation,
    current_generation,
)
from shared.errors import AlreadyExists, Forbidden, InvalidInput, LimitReached, NotFound, Unauthorized
from shared.names import validate_name, validate_site_name

__all__ = ["Principal", "Store"]

Json = dict[str, Any]


@dataclass(frozen=True)
class Principal:
    """Who is calling: an admin (``tenant_id`` is None) or one tenant."""

    tenant_id: int | None
    tenant: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.tenant_id is None


def _require_admin(who: Principal) -> None:
    if not who.is_admin:
        raise Forbidden("only an admin may do this", hint="use the admin token")


def _text(body: Json, key: str) -> str:
    value = body.get(key)
    # Anything but a string counts as missing; the name validators then say what is wanted.
    return value if isinstance(value, str) else ""


def _positive_int(body: Json, key: str, *, minimum: int) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidInput(f"{key!r} must be an integer >= {minimum}")
    return value


def _plan_json(plan: Plan) -> Json:
    return {"id": plan.id, "name": plan.name, "max_sites": plan.max_sites, "storage_mb": plan.storage_mb}


def _subscription_json(sub: Subscription) -> Json:
    return {"id": sub.id, "tenant": sub.tenant.name, "plan": sub.plan.name, "state": sub.state}


def _iso(when: dt.datetime | None) -> str | None:
    if when is None:
        return None
    # SQLite hands datetimes back naive; they were written in UTC.
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).isoformat()


class Store:
    """Desired state in the runtime DB, seen through a caller's rights."""

    def __init__(self, db: Database, config: ManagementConfig) -> None:
        self._db = db
        self._config = config
        # One writer at a time in this process: a plan's site count is checked, then a site inserted.
        self._write_lock = threading.Lock()

    # -- auth

    def authenticate(self, token: str) -> Principal:
        with self._db.session() as s:
            row = s.execute(
                select(ApiToken).where(ApiToken.token_hash == hash_token(token))
            ).scalar_one_or_none()
            if row is None:
                raise Unauthorized("the token is not valid", hint="check --token or SITECLOUD_TOKEN")
            if row.tenant_id is None:
                return Principal(None)
            tenant = s.get(Tenant, row.tenant_id)
            return Principal(row.tenant_id, tenant.name if tenant else None)

    # -- plans

    def create_plan(self, who: Principal, body: Json) -> Json:
        _require_admin(who)
        name = validate_name(_text(body, "name"), what="plan")
        max_sites = _positive_int(body, "max_sites", minimum=0)
        storage_mb = _positive_int(body, "storage_mb", minimum=1)
        with self._write_lock, self._db.session() as s:
            if s.execute(select(Plan.id).where(Plan.name == name)).first():
                raise AlreadyExists(f"plan {name!r} already exists")
            plan = Plan(name=name, max_sites=max_sites, storage_mb=storage_mb)
            s.add(plan)
            self._flush(s, f"plan {name!r} already exists")
            bump_generation(s)
            return _plan_json(plan)

    def list_plans(self, who: Principal) -> Json:
        _require_admin(who)
        with self._db.session() as s:
            return {"plans": [_plan_json(p) for p in s.scalars(select(Plan).order_by(Plan.name))]}

    # -- tenants

    def create_tenant(self, who: Principal, body: Json) -> Json:
        _require_admin(who)
        name = validate_name(_text(body, "name"), what="tenant")
        token = new_token()
        with self._write_lock, self._db.session() as s:
            if s.execute(select(Tenant.id).where(Tenant.name == name)).first():
                raise AlreadyExists(f"tenant {name!r} already exists")
            tenant = Tenant(name=name)
            s.add(tenant)
            self._flush(s, f"tenant {name!r} already exists")
            s.add(ApiToken(token_hash=hash_token(token), tenant_id=tenant.id))
            bump_generation(s)
            return {"id": tenant.id, "name": tenant.name, "token": token}

    def list_tenants(self, who: Principal) -> Json:
        _require_admin(who)
        with self._db.session() as s:
            rows = s.scalars(select(Tenant).order_by(Tenant.name))
            return {"tenants": [{"id": t.id, "name": t.name} for t in rows]}

    # -- subscriptions

    def create_subscription(self, who: Principal, body: Json) -> Json:
        _require_admin(who)
        tenant_name, plan_name = body.get("tenant"), body.get("plan")
        if not isinstance(tenant_name, str) or not isinstance(plan_name, str):
            raise InvalidInput("a subscription needs 'tenant' and 'plan' (names)")
        with self._write_lock, self._db.session() as s:
            tenant = s.execute(select(Tenant).where(Tenant.name == tenant_name)).scalar_one_or_none()
            if tenant is None:
                raise NotFound(f"no tenant {tenant_name!r}", hint="see `sitecloud tenant list`")
            plan = s.execute(select(Plan).where(Plan.name == plan_name)).scalar_one_or_none()
            if plan is None:
                raise NotFound(f"no plan {plan_name!r}", hint="see `sitecloud plan list`")
            sub = Subscription(tenant=tenant, plan=plan, state="active")
            s.add(sub)
            s.flush()
            bump_generation(s)
            return _subscription_json(sub)

    def list_subscriptions(self, who: Principal) -> Json:
        with self._db.session() as s:
            query = (
                select(Subscription)
                .options(joinedload(Subscription.tenant), joinedload(Subscription.plan))
                .order_by(Subscription.id)
            )
            if not who.is_admin:
                query = query.where(Subscription.tenant_id == who.tenant_id)
            return {"subscriptions": [_subscription_json(sub) for sub in s.scalars(query)]}

    # -- sites

    def site_json(self, site: Site) -> Json:
        c = self._config
        port = "" if c.https_port == 443 else f":{c.https_port}"
        return {
            "name": site.name,
            "url": f"https://{site.name}.{c.domain}{port}/",
            "subscription": site.subscription_id,
            "tenant": site.subscription.tenant.name,
            "state": site.state,
            "ftp": {"host": c.ftp_host, "port": c.ftp_port, "user": site.name},
            "deploy": {"url": f"{c.deploy_url.rstrip('/')}/api/deploy/{site.name}", "user": site.name},
        }

    def _visible_site(self, s: Session, who: Principal, name: str) -> Site:
        site = s.execute(select(Site).where(Site.name == name)).scalar_one_or_none()
        # Another tenant's site answers exactly like a missing one: its existence does not leak.
        if site is None or (not who.is_admin and site.subscription.tenant_id != who.tenant_id):
            raise NotFound(f"no site {name!r}", hint="see `sitecloud site list`")
        return site

    def create_site(self, who: Principal, body: Json) -> Json:
        name = validate_site_name(_text(body, "name"))
        sub_id = body.get("subscription")
        if not isinstance(sub_id, int) or isinstance(sub_id, bool):
            raise InvalidInput(
                "'subscription' must be a subscription id", hint="see `sitecloud subscription list`"
            )
        password = new_password()
        # scrypt is slow on purpose: hash before taking the write lock.
        password_hash = hash_password(password)
        with self._write_lock, self._db.session() as s:
            sub = s.execute(
                select(Subscription).where(Subscription.id == sub_id).with_for_update()
            ).scalar_one_or_none()
            if sub is None or (not who.is_admin and sub.tenant_id != who.tenant_id):
                raise NotFound(f"no subscription {sub_id}", hint="see `sitecloud subscription list`")
            if sub.state != "active":
                raise Forbidden(f"subscription {sub_id} is {sub.state}, not active")
            if s.execute(select(Site.id).where(Site.name == name)).first():
                raise AlreadyExists(f"site {name!r} already exists", hint="choose another name")
            count = s.scalar(select(func.count(Site.id)).where(Site.subscription_id == sub.id)) or 0
            if count >= sub.plan.max_sites:
                raise LimitReached(
                    f"subscription {sub.id} (plan {sub.plan.name!r}) allows {sub.plan.max_sites} "
                    f"site(s) and has {count}",
                    hint="delete a site or subscribe to a larger plan",
                )
            site = Site(name=name, subscription=sub)
            site.credentials.append(PublishingCredential(username=name, password_hash=password_hash))
            s.add(site)
            self._flush(s, f"site {name!r} already exists")
            bump_generation(s)
            answer = self.site_json(site)
        answer["ftp"]["password"] = password
        answer["deploy"]["password"] = password
        return answer

    def list_sites(self, who: Principal) -> Json:
        with self._db.session() as s:
            query = (
                select(Site)
                .join(Subscription)
                .options(joinedload(Site.subscription).joinedload(Subscription.tenant))
                .order_by(Site.name)
            )
            if not who.is_admin:
                query = query.where(Subscription.tenant_id == who.tenant_id)
            return {"sites": [self.site_json(site) for site in s.scalars(query)]}

    def show_site(self, who: Principal, name: str) -> Json:
        with self._db.session() as s:
            return self.site_json(self._visible_site(s, who, name))

    def check_site(self, who: Principal, name: str) -> None:
        """Raise NotFound unless ``who`` may act on site ``name``."""
        with self._db.session() as s:
            self._visible_site(s, who, name)

    def delete_site(self, who: Principal, name: str) -> None:
        with self._write_lock, self._db.session() as s:
            s.delete(self._visible_site(s, who, name))
            bump_generation(s)

    # -- roles

    def list_roles(self, who: Principal) -> Json:
        _require_admin(who)
        with self._db.session() as s:
            desired = current_generation(s)
            rows = s.scalars(select(Role).options(joinedload(Role.host)))
            roles = [
                {
                    "role": r.kind,
                    "host": r.host.name,
                    "state": r.state,
                    "reason": r.reason,
                    "config_version": r.config_version,
                    "desired_version": desired,
                    "code_version": r.code_version,
                    "last_heartbeat": _iso(r.last_heartbeat),
                }
                for r in rows
            ]
            roles.sort(key=lambda r: (r["role"], r["host"]))
            return {"roles": roles}

    def generation(self) -> int:
        with self._db.session() as s:
            return current_generation(s)

    @staticmethod
    def _flush(s: Session, conflict: str) -> None:
        # A unique constraint still catches a writer in another process that won the race.
        try:
            s.flush()
        except IntegrityError as exc:
            raise AlreadyExists(conflict) from exc
