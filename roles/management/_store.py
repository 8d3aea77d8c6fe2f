"""The management role's unit-of-work functions over the runtime DB (synchronous; run off the event loop).

Each write is one transaction that also bumps the cloud's generation, so the controller sees either all
of a change or none of it. Every function takes the calling :class:`Principal` and enforces its rights:
another tenant's site, subscription or host name answers exactly like a missing one.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload, object_session, selectinload

from roles.management._certs import describe, load_certificate
from roles.management._domains import check_ownership, parse_resolvers, records_to_create
from roles.management._paging import Page, paged
from roles.management._publishing import PublishingEndpoints
from roles.management._site_backups import BACKUP_KEEP_MAX, Due, check_backup_every
from roles.management.config import ManagementConfig
from shared import appsettings
from shared.acme import BACKOFF_FIRST, AcmeSettings
from shared.appsettings import check_app_setting
from shared.credentials import hash_password, hash_token, new_password, new_token
from shared.db import (
    DEFAULT_WORKER_SIZE,
    ApiToken,
    CustomHostname,
    Database,
    Host,
    Plan,
    PublishingCredential,
    Role,
    Setting,
    Site,
    SiteAssignment,
    Subscription,
    Tenant,
    User,
    bump_generation,
    current_generation,
)
from shared.errors import (
    AlreadyExists,
    Forbidden,
    InUse,
    InvalidInput,
    LimitReached,
    NotFound,
    RateLimited,
    Unavailable,
)
from shared.names import (
    DEFAULT_IP_DNS_SERVICES,
    CertState,
    HostnameState,
    canonical_hostname,
    validate_custom_hostname,
    validate_name,
    validate_site_name,
    validate_slot_name,
)
from shared.states import RoleState, SiteState
from shared.words import counted

__all__ = [
    "COMPUTE_MODES",
    "COUNT_MAX",
    "DAILY_QUOTA_MAX",
    "ID_MAX",
    "INSTANCES_MAX",
    "KEEP_DAYS_MAX",
    "KEEP_VERSIONS_MAX",
    "SCALE_MAX",
    "STORAGE_MB_MAX",
    "WORKER_SIZES",
    "Principal",
    "Store",
    "SwapPlan",
    "iso",
    "require_admin",
]

Json = dict[str, Any]

WORKER_SIZES = ("small", "medium", "large")
COMPUTE_MODES = ("shared", "reserved")
# A plan's bounds (the API's schema is built from these too): counts of sites and hostnames, storage,
# daily quotas (null: unlimited), instances per site; and how far one site may be scaled at all.
COUNT_MAX = 100_000
STORAGE_MB_MAX = 10_000_000
DAILY_QUOTA_MAX = 1_000_000_000
INSTANCES_MAX = 100
# Content versions a plan's sites keep: how many, and how many days of them.
KEEP_VERSIONS_MAX = 1000
KEEP_DAYS_MAX = 3650
SCALE_MAX = 1000
# Ids fit the DB's 32-bit integers.
ID_MAX = 2**31 - 1
# The whole list: what the portals show.
_ALL = Page()


@dataclass(frozen=True)
class Principal:
    """Who is calling: an admin (``tenant_id`` is None) or one tenant; ``user_id`` when a person."""

    tenant_id: int | None
    tenant: str | None = None
    user_id: int | None = None
    username: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.tenant_id is None


def require_admin(who: Principal) -> None:
    if not who.is_admin:
        raise Forbidden("only an admin may do this", hint="sign in as an admin or use the admin token")


def iso(when: dt.datetime | None) -> str | None:
    if when is None:
        return None
    # SQLite hands datetimes back naive; they were written in UTC.
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).isoformat()


def _text(body: Json, key: str) -> str:
    value = body.get(key)
    # Anything but a string counts as missing; the name validators then say what is wanted.
    return value if isinstance(value, str) else ""


def _int(value: Any, key: str, *, minimum: int, maximum: int = ID_MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise InvalidInput(f"{key!r} must be an integer from {minimum} to {maximum}")
    return value


def _positive_int(body: Json, key: str, *, minimum: int) -> int:
    return _int(body.get(key), key, minimum=minimum)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{key!r} must be true or false")
    return value


def _only(body: Json, allowed: set[str], what: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidInput(
            f"unknown field(s) for a {what}: {', '.join(unknown)}",
            hint=f"known: {', '.join(sorted(allowed))}",
        )


_PLAN_FIELDS = {
    "name",
    "max_sites",
    "storage_mb",
    "bandwidth_mb_per_day",
    "cpu_minutes_per_day",
    "max_custom_hostnames",
    "compute_mode",
    "worker_size",
    "always_on",
    "max_instances_per_site",
    "public",
    "retired",
    "keep_versions",
    "keep_days",
    "backup_every_seconds",
    "backup_keep",
}


def _apply_plan_fields(plan: Plan, body: Json, *, backup_min_every: int) -> None:
    """Validate and set the quota fields present in ``body`` (create and update share this)."""
    for key in ("max_sites", "max_custom_hostnames"):
        if key in body:
            setattr(plan, key, _int(body[key], key, minimum=0, maximum=COUNT_MAX))
    if "storage_mb" in body:
        plan.storage_mb = _int(body["storage_mb"], "storage_mb", minimum=1, maximum=STORAGE_MB_MAX)
    for key in ("bandwidth_mb_per_day", "cpu_minutes_per_day"):
        if key in body:
            # null means unlimited.
            value = body[key]
            setattr(
                plan, key, None if value is None else _int(value, key, minimum=1, maximum=DAILY_QUOTA_MAX)
            )
    if "max_instances_per_site" in body:
        plan.max_instances_per_site = _int(
            body["max_instances_per_site"], "max_instances_per_site", minimum=1, maximum=INSTANCES_MAX
        )
    if "keep_versions" in body:
        plan.keep_versions = _int(
            body["keep_versions"], "keep_versions", minimum=1, maximum=KEEP_VERSIONS_MAX
        )
    if "keep_days" in body:
        plan.keep_days = _int(body["keep_days"], "keep_days", minimum=0, maximum=KEEP_DAYS_MAX)
    if "backup_every_seconds" in body:
        plan.backup_every_seconds = check_backup_every(body["backup_every_seconds"], backup_min_every)
    if "backup_keep" in body:
        plan.backup_keep = _int(body["backup_keep"], "backup_keep", minimum=1, maximum=BACKUP_KEEP_MAX)
    for key in ("always_on", "public", "retired"):
        if key in body:
            setattr(plan, key, _bool(body[key], key))
    if "compute_mode" in body:
        if body["compute_mode"] not in COMPUTE_MODES:
            raise InvalidInput("'compute_mode' must be 'shared' or 'reserved'")
        plan.compute_mode = body["compute_mode"]
    if "worker_size" in body:
        size = body["worker_size"]
        if size is not None and size not in WORKER_SIZES:
            raise InvalidInput("'worker_size' must be small, medium, large or null")
        plan.worker_size = size
    if plan.compute_mode == "reserved" and plan.worker_size is None:
        raise InvalidInput("a reserved plan needs a 'worker_size' (small, medium or large)")
    if plan.compute_mode == "shared":
        plan.worker_size = None


def _plan_json(plan: Plan, subscriptions: int = 0) -> Json:
    return {
        "id": plan.id,
        "name": plan.name,
        "max_sites": plan.max_sites,
        "storage_mb": plan.storage_mb,
        "bandwidth_mb_per_day": plan.bandwidth_mb_per_day,
        "cpu_minutes_per_day": plan.cpu_minutes_per_day,
        "max_custom_hostnames": plan.max_custom_hostnames,
        "compute_mode": plan.compute_mode,
        "worker_size": plan.worker_size,
        "always_on": plan.always_on,
        "max_instances_per_site": plan.max_instances_per_site,
        "public": plan.public,
        "retired": plan.retired,
        "keep_versions": plan.keep_versions,
        "keep_days": plan.keep_days,
        "backup_every_seconds": plan.backup_every_seconds,
        "backup_keep": plan.backup_keep,
        "subscriptions": subscriptions,
    }


def _over_limit(s: Session, plan: Plan) -> list[str]:
    """The plan's subscriptions that hold more sites, custom hostnames or instances than it allows."""

    def per_subscription(figure: Any, *joins: Any) -> dict[int, int]:
        query = select(Site.subscription_id, figure)
        for table in joins:
            query = query.join(table)
        query = query.join(Subscription).where(Subscription.plan_id == plan.id)
        return {sub: int(n or 0) for sub, n in s.execute(query.group_by(Site.subscription_id)).all()}

    sites = per_subscription(func.count(Site.id))
    hostnames = per_subscription(func.count(CustomHostname.id), CustomHostname)
    widest = per_subscription(func.max(Site.instances))
    over = []
    for sub_id in sorted(set(sites) | set(hostnames)):
        what = [
            f"{counted(sites.get(sub_id, 0), 'site')} (allowed {plan.max_sites})"
            if sites.get(sub_id, 0) > plan.max_sites
            else "",
            f"{hostnames[sub_id]} custom hostnames (allowed {plan.max_custom_hostnames})"
            if hostnames.get(sub_id, 0) > plan.max_custom_hostnames
            else "",
            f"a site with {counted(widest[sub_id], 'instance')} (allowed {plan.max_instances_per_site})"
            if (widest.get(sub_id) or 1) > plan.max_instances_per_site
            else "",
        ]
        if any(what):
            over.append(f"subscription {sub_id}: " + ", ".join(w for w in what if w))
    return over


def _subscription_json(sub: Subscription, sites: list[str], hostnames: int) -> Json:
    return {
        "id": sub.id,
        "tenant": sub.tenant.name,
        "plan": sub.plan.name,
        "state": sub.state,
        "created_at": iso(sub.created_at),
        "quotas": {
            k: v
            for k, v in _plan_json(sub.plan).items()
            if k not in ("id", "name", "subscriptions", "public", "retired")
        },
        "usage": {"sites": len(sites), "custom_hostnames": hostnames, "storage_bytes": None},
        # The value of a TXT record asuid.<hostname> that proves the tenant owns a custom hostname.
        "verification_id": sub.verification_id,
        "site_names": sites,
    }


def _claimed_name(hostname: str) -> str:
    """A name in a path as stored: A-labels for a Unicode name; a name stored before today's rules as is."""
    try:
        return canonical_hostname(hostname)
    except InvalidInput:
        return hostname.lower().rstrip(".")


class Store:
    """Desired state in the runtime DB, seen through a caller's rights."""

    def __init__(self, db: Database, config: ManagementConfig, lock: threading.Lock | None = None) -> None:
        self._db = db
        self._config = config
        # Where the publisher runs: replaced whole when the controller says it moved.
        self.publishing = PublishingEndpoints.from_config(config)
        # One writer at a time in this process: a plan's site count is checked, then a site inserted.
        self._write_lock = lock or threading.Lock()

    # -- plans

    def create_plan(self, who: Principal, body: Json) -> Json:
        require_admin(who)
        _only(body, _PLAN_FIELDS, "plan")
        name = validate_name(_text(body, "name"), what="plan")
        plan = Plan(
            name=name,
            max_sites=_positive_int(body, "max_sites", minimum=0),
            storage_mb=_positive_int(body, "storage_mb", minimum=1),
            max_custom_hostnames=0,
            compute_mode="shared",
            always_on=False,
            max_instances_per_site=1,
            public=False,
            retired=False,
            keep_versions=20,
            keep_days=0,
            backup_every_seconds=0,
            backup_keep=7,
        )
        _apply_plan_fields(plan, body, backup_min_every=self._config.backup_min_every)
        with self._write_lock, self._db.session() as s:
            if s.execute(select(Plan.id).where(Plan.name == name)).first():
                raise AlreadyExists(f"plan {name!r} already exists")
            s.add(plan)
            self._flush(s, f"plan {name!r} already exists")
            bump_generation(s)
            return _plan_json(plan)

    def _plan(self, s: Session, name: str) -> Plan:
        plan = s.execute(select(Plan).where(Plan.name == name)).scalar_one_or_none()
        if plan is None:
            raise NotFound(f"no plan {name!r}", hint="see the list of plans")
        return plan

    def _subscription_counts(self, s: Session) -> dict[int, int]:
        rows = s.execute(select(Subscription.plan_id, func.count()).group_by(Subscription.plan_id))
        return {plan_id: count for plan_id, count in rows}

    def list_plans(self, who: Principal, page: Page = _ALL) -> Json:
        """Admins see every plan; tenants see the public plans they may subscribe to."""
        with self._db.session() as s:
            query = select(Plan).order_by(Plan.name)
            if not who.is_admin:
                query = query.where(Plan.public.is_(True), Plan.retired.is_(False))
            counts = self._subscription_counts(s) if who.is_admin else {}
            plans = [_plan_json(p, counts.get(p.id, 0)) for p in s.scalars(query)]
        items, cursor = paged(plans, lambda p: str(p["name"]), page, str)
        return {"plans": items, "next_cursor": cursor}

    def show_plan(self, who: Principal, name: str) -> Json:
        with self._db.session() as s:
            plan = self._plan(s, name)
            if not who.is_admin and (not plan.public or plan.retired):
                raise NotFound(f"no plan {name!r}", hint="see the list of plans")
            return _plan_json(plan, self._subscription_counts(s).get(plan.id, 0) if who.is_admin else 0)

    def update_plan(self, who: Principal, name: str, body: Json) -> Json:
        """Change a plan; every subscription on it gets the new quotas at the next snapshot."""
        require_admin(who)
        _only(body, _PLAN_FIELDS - {"name"}, "plan update")
        with self._write_lock, self._db.session() as s:
            plan = self._plan(s, name)
            _apply_plan_fields(plan, body, backup_min_every=self._config.backup_min_every)
            s.flush()
            bump_generation(s)
            return {
                **_plan_json(plan, self._subscription_counts(s).get(plan.id, 0)),
                "over_limit": _over_limit(s, plan),
            }

    def delete_plan(self, who: Principal, name: str) -> None:
        """Delete a plan no subscription uses; one in use is refused (retiring it stops new ones)."""
        require_admin(who)
        with self._write_lock, self._db.session() as s:
            plan = self._plan(s, name)
            used = self._subscription_counts(s).get(plan.id, 0)
            if used:
                raise InUse(
                    f"plan {name!r} is used by {counted(used, 'subscription')}",
                    hint="delete those subscriptions first, or retire the plan so it takes no new ones",
                )
            s.delete(plan)
            bump_generation(s)

    # -- tenants

    def create_tenant(self, who: Principal, body: Json) -> Json:
        require_admin(who)
        _only(body, {"name"}, "tenant")
        name = validate_name(_text(body, "name"), what="tenant")
        token = new_token()
        with self._write_lock, self._db.session() as s:
            if s.execute(select(Tenant.id).where(Tenant.name == name)).first():
                raise AlreadyExists(f"tenant {name!r} already exists")
            tenant = Tenant(name=name)
            s.add(tenant)
            self._flush(s, f"tenant {name!r} already exists")
            s.add(ApiToken(token_hash=hash_token(token), tenant_id=tenant.id, prefix=token[:8]))
            bump_generation(s)
            return {"id": tenant.id, "name": tenant.name, "token": token}

    def list_tenants(self, who: Principal, page: Page = _ALL) -> Json:
        require_admin(who)
        with self._db.session() as s:
            subs = dict(
                s.execute(select(Subscription.tenant_id, func.count()).group_by(Subscription.tenant_id)).all()
            )
            sites = dict(
                s.execute(
                    select(Subscription.tenant_id, func.count(Site.id))
                    .join(Site)
                    .group_by(Subscription.tenant_id)
                ).all()
            )
            users = dict(s.execute(select(User.tenant_id, func.count()).group_by(User.tenant_id)).all())
            query = select(Tenant).order_by(Tenant.name)
            after = page.after(str)
            if after is not None:
                query = query.where(Tenant.name > after)
            if page.limit is not None:
                query = query.limit(page.limit + 1)
            rows, cursor = page.cut(list(s.scalars(query)), lambda t: t.name)
            return {
                "next_cursor": cursor,
                "tenants": [
                    {
                        "id": t.id,
                        "name": t.name,
                        "subscriptions": subs.get(t.id, 0),
                        "sites": sites.get(t.id, 0),
                        "users": users.get(t.id, 0),
                        "created_at": iso(t.created_at),
                    }
                    for t in rows
                ],
            }

    def _tenant(self, s: Session, name: str) -> Tenant:
        tenant = s.execute(select(Tenant).where(Tenant.name == name)).scalar_one_or_none()
        if tenant is None:
            raise NotFound(f"no tenant {name!r}", hint="see the list of tenants")
        return tenant

    def show_tenant(self, who: Principal, name: str) -> Json:
        """A tenant with its subscriptions, sites and portal users (admin)."""
        require_admin(who)
        with self._db.session() as s:
            tenant = self._tenant(s, name)
            subs = self._subscriptions(
                s, select(Subscription).where(Subscription.tenant_id == tenant.id).order_by(Subscription.id)
            )
            sites = s.scalars(
                select(Site)
                .join(Subscription)
                .where(Subscription.tenant_id == tenant.id)
                .options(joinedload(Site.subscription).joinedload(Subscription.tenant))
                .order_by(Site.name)
            )
            users = s.scalars(select(User).where(User.tenant_id == tenant.id).order_by(User.username))
            return {
                "id": tenant.id,
                "name": tenant.name,
                "created_at": iso(tenant.created_at),
                "subscriptions": subs,
                "sites": [self.site_json(site, who) for site in sites],
                "users": [
                    {
                        "username": u.username,
                        "created_at": iso(u.created_at),
                        "last_sign_in_at": iso(u.last_sign_in_at),
                    }
                    for u in users
                ],
            }

    def delete_tenant(self, who: Principal, name: str) -> None:
        """Delete a tenant with everything it has: subscriptions, sites and their content, users, tokens."""
        require_admin(who)
        with self._write_lock, self._db.session() as s:
            tenant = self._tenant(s, name)
            subs = list(s.scalars(select(Subscription).where(Subscription.tenant_id == tenant.id)))
            _delete_sites(
                s, s.scalars(select(Site).where(Site.subscription_id.in_([sub.id for sub in subs])))
            )
            for sub in subs:
                s.delete(sub)
            s.flush()
            # Users, their sessions and every token go with it (foreign keys ON DELETE CASCADE).
            s.delete(tenant)
            bump_generation(s)

    # -- subscriptions

    def create_subscription(self, who: Principal, body: Json) -> Json:
        """An admin subscribes any tenant to any plan that is not retired; a tenant subscribes itself
        to a public plan."""
        plan_name = body.get("plan")
        if who.is_admin:
            _only(body, {"tenant", "plan"}, "subscription")
            tenant_name = body.get("tenant")
            if not isinstance(tenant_name, str) or not isinstance(plan_name, str):
                raise InvalidInput("a subscription needs 'tenant' and 'plan' (names)")
        else:
            _only(body, {"plan", "tenant"}, "subscription")
            tenant_name = body.get("tenant", who.tenant)
            if tenant_name != who.tenant:
                raise Forbidden("a tenant may only subscribe itself", hint="leave out 'tenant'")
            if not isinstance(plan_name, str):
                raise InvalidInput("a subscription needs a 'plan' (name)", hint="see the list of plans")
        with self._write_lock, self._db.session() as s:
            tenant = s.execute(select(Tenant).where(Tenant.name == tenant_name)).scalar_one_or_none()
            if tenant is None:
                raise NotFound(f"no tenant {tenant_name!r}", hint="see the list of tenants")
            plan = s.execute(select(Plan).where(Plan.name == plan_name)).scalar_one_or_none()
            if plan is None or (not who.is_admin and not plan.public):
                raise NotFound(f"no plan {plan_name!r}", hint="see the list of plans")
            if plan.retired:
                raise Forbidden(
                    f"plan {plan_name!r} is retired and takes no new subscriptions",
                    hint="choose another plan",
                )
            sub = Subscription(tenant=tenant, plan=plan, state="active")
            s.add(sub)
            s.flush()
            bump_generation(s)
            return _subscription_json(sub, [], 0)

    def _subscriptions(self, s: Session, query: Any) -> list[Json]:
        subs = list(s.scalars(query.options(joinedload(Subscription.tenant), joinedload(Subscription.plan))))
        ids = [sub.id for sub in subs]
        names: dict[int, list[str]] = {i: [] for i in ids}
        for sub_id, site in s.execute(
            select(Site.subscription_id, Site.name).where(Site.subscription_id.in_(ids)).order_by(Site.name)
        ):
            names[sub_id].append(site)
        hosts = dict(
            s.execute(
                select(Site.subscription_id, func.count(CustomHostname.id))
                .join(CustomHostname)
                .where(Site.subscription_id.in_(ids))
                .group_by(Site.subscription_id)
            ).all()
        )
        return [_subscription_json(sub, names[sub.id], hosts.get(sub.id, 0)) for sub in subs]

    def list_subscriptions(
        self,
        who: Principal,
        page: Page = _ALL,
        *,
        tenant: str | None = None,
        plan: str | None = None,
        state: str | None = None,
    ) -> Json:
        """Subscriptions the caller may see (a tenant: its own), by id, filtered by tenant, plan, state."""
        with self._db.session() as s:
            query = select(Subscription).order_by(Subscription.id)
            if not who.is_admin:
                query = query.where(Subscription.tenant_id == who.tenant_id)
            if tenant is not None:
                query = query.where(Subscription.tenant.has(Tenant.name == tenant))
            if plan is not None:
                query = query.where(Subscription.plan.has(Plan.name == plan))
            if state is not None:
                query = query.where(Subscription.state == state)
            after = page.after(int)
            if after is not None:
                query = query.where(Subscription.id > after)
            if page.limit is not None:
                query = query.limit(page.limit + 1)
            subs, cursor = page.cut(self._subscriptions(s, query), lambda sub: int(sub["id"]))
            return {"subscriptions": subs, "next_cursor": cursor}

    def _visible_subscription(self, s: Session, who: Principal, sub_id: int) -> Subscription:
        sub = s.get(Subscription, sub_id)
        if sub is None or (not who.is_admin and sub.tenant_id != who.tenant_id):
            raise NotFound(f"no subscription {sub_id}", hint="see the list of subscriptions")
        return sub

    def show_subscription(self, who: Principal, sub_id: int) -> Json:
        with self._db.session() as s:
            self._visible_subscription(s, who, sub_id)
            (answer,) = self._subscriptions(s, select(Subscription).where(Subscription.id == sub_id))
            return answer

    def set_subscription_state(self, who: Principal, sub_id: int, state: str) -> Json:
        """Suspend or resume: a suspended subscription's sites leave every role's snapshot."""
        require_admin(who)
        with self._write_lock, self._db.session() as s:
            sub = self._visible_subscription(s, who, sub_id)
            resuming = state == "active" and sub.state != "active"
            sub.state = state
            generation = bump_generation(s)
            if resuming:
                for site in s.scalars(
                    select(Site).where(Site.subscription_id == sub.id, Site.state == "running")
                ):
                    site.live_from = generation
        return self.show_subscription(who, sub_id)

    def change_plan(self, who: Principal, sub_id: int, plan_name: str, storage_bytes: int | None) -> Json:
        """Move a subscription to another plan: an admin to any plan that takes subscriptions, a
        tenant to a public one. Refused while the subscription holds more than the plan allows
        (``storage_bytes``: its sites' content, when the fileserver could say)."""
        with self._write_lock, self._db.session() as s:
            sub = self._visible_subscription(s, who, sub_id)
            plan = s.execute(select(Plan).where(Plan.name == plan_name)).scalar_one_or_none()
            if plan is None or (not who.is_admin and not plan.public):
                raise NotFound(f"no plan {plan_name!r}", hint="see the list of plans")
            if plan.retired and plan.id != sub.plan_id:
                raise Forbidden(
                    f"plan {plan_name!r} is retired and takes no new subscriptions",
                    hint="choose another plan",
                )
            sites = list(s.scalars(select(Site).where(Site.subscription_id == sub.id)))
            hostnames = (
                s.scalar(
                    select(func.count(CustomHostname.id)).join(Site).where(Site.subscription_id == sub.id)
                )
                or 0
            )
            over = [
                f"{counted(len(sites), 'site')} (it allows {plan.max_sites})"
                if len(sites) > plan.max_sites
                else "",
                f"{counted(hostnames, 'custom hostname')} (it allows {plan.max_custom_hostnames})"
                if hostnames > plan.max_custom_hostnames
                else "",
                f"{storage_bytes / 2**20:.1f} MB of content (it allows {plan.storage_mb} MB)"
                if storage_bytes is not None and storage_bytes > plan.storage_mb * 1024 * 1024
                else "",
                ", ".join(
                    f"site {site.name} runs {counted(site.instances or 1, 'instance')} (it allows {plan.max_instances_per_site})"
                    for site in sites
                    if (site.instances or 1) > plan.max_instances_per_site
                ),
            ]
            if storage_bytes is None and plan.storage_mb < sub.plan.storage_mb:
                raise Unavailable(
                    f"the fileserver cannot say now how much subscription {sub.id} stores, so a move to "
                    "a plan with less storage cannot be checked",
                    hint="try again in a moment",
                )
            if any(over):
                raise LimitReached(
                    f"subscription {sub.id} holds more than plan {plan.name!r} allows: "
                    + "; ".join(o for o in over if o),
                    hint="delete or shrink what is over first, or choose a larger plan",
                )
            sub.plan = plan
            bump_generation(s)
        return self.show_subscription(who, sub_id)

    def delete_subscription(self, who: Principal, sub_id: int) -> None:
        require_admin(who)
        with self._write_lock, self._db.session() as s:
            sub = self._visible_subscription(s, who, sub_id)
            _delete_sites(s, s.scalars(select(Site).where(Site.subscription_id == sub.id)))
            s.delete(sub)
            bump_generation(s)

    # -- sites

    def site_json(self, site: Site, who: Principal) -> Json:
        c, publishing = self._config, self.publishing
        port = "" if c.https_port == 443 else f":{c.https_port}"
        # As the roles see it: a suspended subscription's sites serve nothing, whatever their own.
        state = SiteState.of(site.state, site.subscription.state)
        answer: Json = {
            "name": site.name,
            "url": f"https://{site.name}.{c.domain}{port}/",
            "subscription": site.subscription_id,
            "tenant": site.subscription.tenant.name,
            "state": state,
            "instances": site.instances or 1,
            "hostnames": [h.hostname for h in site.hostnames],
            "ftp": {"host": publishing.ftp_host, "port": publishing.ftp_port, "user": site.name},
            "deploy": {
                "url": f"{publishing.deploy_url}/api/deploy/{site.name}",
                "git": f"{publishing.deploy_url}/{site.name}.git",
                "user": site.name,
            },
            "problems": _site_problems(site, by_host=who.is_admin),
        }
        if state is SiteState.RUNNING and not _not_live_yet(site):
            placement = _placement_problem(site, by_host=who.is_admin)
            if placement is not None:
                answer["problems"].insert(0, placement)
        if state is SiteState.RUNNING and _not_live_yet(site):
            answer["pending"] = (
                f"not live yet: site {site.name} is stored as running, but the cloud's controller has "
                "not applied that; nothing serves it until the controller runs again"
            )
        return answer

    def _visible_site(self, s: Session, who: Principal, name: str) -> Site:
        site = s.execute(select(Site).where(Site.name == name)).scalar_one_or_none()
        # Another tenant's site answers exactly like a missing one: its existence does not leak.
        if site is None or (not who.is_admin and site.subscription.tenant_id != who.tenant_id):
            raise NotFound(f"no site {name!r}", hint="see the list of sites")
        return site

    def create_site(self, who: Principal, body: Json) -> Json:
        _only(body, {"name", "subscription"}, "site")
        name = validate_site_name(_text(body, "name"))
        sub_id = body.get("subscription")
        # Bounded: the DB's integers are 64-bit at most, ids far less.
        if not isinstance(sub_id, int) or isinstance(sub_id, bool) or not 0 <= sub_id <= ID_MAX:
            raise InvalidInput(
                "'subscription' must be a subscription id", hint="see the list of subscriptions"
            )
        password = new_password()
        # scrypt is slow on purpose: hash before taking the write lock.
        password_hash = hash_password(password)
        with self._write_lock, self._db.session() as s:
            sub = s.execute(
                select(Subscription).where(Subscription.id == sub_id).with_for_update()
            ).scalar_one_or_none()
            if sub is None or (not who.is_admin and sub.tenant_id != who.tenant_id):
                raise NotFound(f"no subscription {sub_id}", hint="see the list of subscriptions")
            if sub.state != "active":
                raise Forbidden(f"subscription {sub_id} is {sub.state}, not active")
            site = self._add_site(s, sub, name, password_hash, app_settings={})
            answer = self.site_json(site, who)
        answer["ftp"]["password"] = password
        answer["deploy"]["password"] = password
        return answer

    def _add_site(self, s: Session, sub: Subscription, name: str, password_hash: str, **fields: Any) -> Site:
        """A new site row (a slot is one too, so it counts against the plan's max sites)."""
        if s.execute(select(Site.id).where(Site.name == name)).first():
            raise AlreadyExists(f"site {name!r} already exists", hint="choose another name")
        count = s.scalar(select(func.count(Site.id)).where(Site.subscription_id == sub.id)) or 0
        if count >= sub.plan.max_sites:
            raise LimitReached(
                f"subscription {sub.id} (plan {sub.plan.name!r}) allows {counted(sub.plan.max_sites, 'site')} "
                f"and has {count} (deployment slots count as sites)",
                hint="delete a site or subscribe to a larger plan",
            )
        site = Site(name=name, subscription=sub, **fields)
        site.credentials.append(PublishingCredential(username=name, password_hash=password_hash))
        s.add(site)
        self._flush(s, f"site {name!r} already exists")
        site.live_from = bump_generation(s)
        return site

    def list_sites(
        self,
        who: Principal,
        page: Page = _ALL,
        *,
        tenant: str | None = None,
        subscription: int | None = None,
        state: str | None = None,
    ) -> Json:
        """Sites the caller may see (a tenant: its own), by name, filtered by tenant, subscription, state."""
        with self._db.session() as s:
            query = (
                select(Site)
                .join(Subscription)
                .options(
                    joinedload(Site.subscription).joinedload(Subscription.tenant),
                    selectinload(Site.hostnames),
                    selectinload(Site.assignments).joinedload(SiteAssignment.role).joinedload(Role.host),
                )
                .order_by(Site.name)
            )
            if not who.is_admin:
                query = query.where(Subscription.tenant_id == who.tenant_id)
            if tenant is not None:
                query = query.where(Subscription.tenant.has(Tenant.name == tenant))
            if subscription is not None:
                query = query.where(Site.subscription_id == subscription)
            if state == SiteState.SUSPENDED:
                query = query.where(Subscription.state != "active")
            elif state is not None:
                query = query.where(Site.state == state, Subscription.state == "active")
            after = page.after(str)
            if after is not None:
                query = query.where(Site.name > after)
            if page.limit is not None:
                query = query.limit(page.limit + 1)
            sites, cursor = page.cut(list(s.scalars(query)), lambda site: site.name)
            return {"sites": [self.site_json(site, who) for site in sites], "next_cursor": cursor}

    def show_site(self, who: Principal, name: str) -> Json:
        with self._db.session() as s:
            site = self._visible_site(s, who, name)
            return self.site_json(site, who)

    def site_plan(self, who: Principal, name: str) -> Json:
        """The plan of a site ``who`` may see."""
        with self._db.session() as s:
            return _plan_json(self._visible_site(s, who, name).subscription.plan)

    def check_site(self, who: Principal, name: str) -> None:
        """Raise NotFound unless ``who`` may act on site ``name``."""
        with self._db.session() as s:
            self._visible_site(s, who, name)

    def check_publishable(self, who: Principal, name: str) -> None:
        """As :meth:`check_site`, and ``who`` may change its content: a stopped site may be published
        to (it serves that once started); a suspended subscription's site only by an admin (as a
        backup's restore does), never by its tenant."""
        with self._db.session() as s:
            site = self._visible_site(s, who, name)
            if site.subscription.state != "active" and not who.is_admin:
                raise Forbidden(
                    f"the subscription of site {name} is suspended: nothing can be published to it",
                    hint="its content is kept; ask your hosting provider to resume the subscription",
                )

    def delete_site(self, who: Principal, name: str) -> None:
        """Delete a site; a production site takes its deployment slots along."""
        with self._write_lock, self._db.session() as s:
            site = self._visible_site(s, who, name)
            if site.slot_of_id is not None and (
                site.routed_to_id is not None
                or s.scalar(select(Site.id).where(Site.routed_to_id == site.id)) is not None
            ):
                raise InUse(
                    f"{name} is swapped with its production site",
                    hint=f"swap back first (sitecloud site swap <production> {site.slot_name})",
                )
            _delete_sites(s, [site, *s.scalars(select(Site).where(Site.slot_of_id == site.id))])
            bump_generation(s)

    def set_site_state(self, who: Principal, name: str, state: str) -> Json:
        """Start or stop: only running sites are routed and served."""
        with self._write_lock, self._db.session() as s:
            site = self._visible_site(s, who, name)
            if state == "running" and site.subscription.state != "active":
                raise Forbidden(
                    f"subscription {site.subscription_id} is {site.subscription.state}, not active"
                )
            starting = state == "running" and site.state != "running"
            site.state = state
            generation = bump_generation(s)
            if starting:
                site.live_from = generation
            return self.site_json(site, who)

    def restart_site(self, who: Principal, name: str) -> Json:
        """Ask every worker of a running site to replace its app processes (a new value in their
        snapshot): requests under way finish on the old ones, the next start the new."""
        with self._write_lock, self._db.session() as s:
            site = self._visible_site(s, who, name)
            if site.state != "running" or site.subscription.state != "active":
                state = "suspended" if site.subscription.state != "active" else site.state
                raise InUse(
                    f"site {name} is {state}: it runs no app to restart",
                    hint=f"start it with `sitecloud site start {name}`" if state == "stopped" else None,
                )
            site.restarts += 1
            bump_generation(s)
            return self.site_json(site, who)

    def scale_site(self, who: Principal, name: str, instances: Any) -> Json:
        """Run the site on ``instances`` workers (the front ends balance across them), within its plan."""
        if not isinstance(instances, int) or isinstance(instances, bool) or not 1 <= instances <= SCALE_MAX:
            raise InvalidInput(f"instances must be a whole number from 1 to {SCALE_MAX}")
        with self._write_lock, self._db.session() as s:
            site = self._visible_site(s, who, name)
            most = site.subscription.plan.max_instances_per_site
            if instances > most:
                raise LimitReached(
                    f"the plan of site {name} allows at most {counted(most, 'instance')}",
                    hint="ask for a larger plan",
                )
            site.instances = instances
            bump_generation(s)
            return self.site_json(site, who)

    def reset_publishing_password(self, who: Principal, name: str) -> Json:
        """A new FTP/web deploy password; the old one stops working at the next snapshot."""
        self.check_site(who, name)
        password = new_password()
        password_hash = hash_password(password)
        with self._write_lock, self._db.session() as s:
            site = self._visible_site(s, who, name)
            if site.credentials:
                for cred in site.credentials:
                    cred.password_hash = password_hash
            else:
                site.credentials.append(PublishingCredential(username=site.name, password_hash=password_hash))
            bump_generation(s)
            answer = self.site_json(site, who)
        answer["ftp"]["password"] = password
        answer["deploy"]["password"] = password
        return answer

    # -- deployment slots

    def _production(self, s: Session, who: Principal, name: str) -> Site:
        site = self._visible_site(s, who, name)
        if site.slot_of_id is not None:
            raise InvalidInput(
                f"{name!r} is the {site.slot_name!r} slot of another site, not a production site",
                hint="name the production site and the slot",
            )
        return site

    def _slot(self, s: Session, production: Site, slot: str) -> Site:
        row = s.execute(
            select(Site).where(Site.slot_of_id == production.id, Site.slot_name == slot)
        ).scalar_one_or_none()
        if row is None:
            raise NotFound(f"site {production.name} has no slot {slot!r}", hint="see its slots")
        return row

    def create_slot(self, who: Principal, name: str, slot: Any) -> Json:
        """``<name>-<slot>``: a site of its own (content, credentials, settings) beside a production site;
        its settings start as a copy of production's, less the sticky ones."""
        slot = validate_slot_name(slot)
        password = new_password()
        password_hash = hash_password(password)
        with self._write_lock, self._db.session() as s:
            production = self._production(s, who, name)
            if production.subscription.state != "active":
                # A slot is a site: refused where `site create` is.
                raise Forbidden(
                    f"subscription {production.subscription_id} is {production.subscription.state}, not active"
                )
            sticky = set(production.sticky_settings or [])
            settings = {k: v for k, v in (production.app_settings or {}).items() if k not in sticky}
            site = self._add_site(
                s,
                production.subscription,
                validate_site_name(f"{production.name}-{slot}"),
                password_hash,
                app_settings=settings,
                slot_of_id=production.id,
                slot_name=slot,
                instances=production.instances,
                state=production.state,
            )
            answer = {**self.site_json(site, who), "slot": slot, "production": production.name}
        answer["ftp"]["password"] = password
        answer["deploy"]["password"] = password
        return answer

    def list_slots(self, who: Principal, name: str, page: Page = _ALL) -> Json:
        """The production site and its slots: each slot's address, the site answering it and its sticky
        settings (those stay with the address through swaps)."""
        with self._db.session() as s:
            production = self._production(s, who, name)
            rows = [
                production,
                *s.scalars(select(Site).where(Site.slot_of_id == production.id).order_by(Site.slot_name)),
            ]
            by_id = {r.id: r for r in rows}
            # By site name: production's is a prefix of every slot's, so it comes first.
            shown, cursor = paged(sorted(rows, key=lambda r: r.name), lambda r: r.name, page, str)
            port = "" if self._config.https_port == 443 else f":{self._config.https_port}"
            slots = []
            for row in shown:
                answering = by_id.get(row.routed_to_id or row.id, row)
                sticky = sorted(answering.sticky_settings or [])
                settings = answering.app_settings or {}
                slots.append(
                    {
                        "slot": row.slot_name or "production",
                        "site": row.name,
                        "url": f"https://{row.name}.{self._config.domain}{port}/",
                        "served_by": answering.name,
                        "sticky_settings": {k: settings[k] for k in sticky if k in settings},
                    }
                )
            return {"site": production.name, "slots": slots, "next_cursor": cursor}

    def delete_slot(self, who: Principal, name: str, slot: Any) -> None:
        slot = validate_slot_name(slot)
        with self._write_lock, self._db.session() as s:
            production = self._production(s, who, name)
            row = self._slot(s, production, slot)
            if row.routed_to_id is not None or production.routed_to_id == row.id:
                raise InUse(
                    f"slot {slot!r} of {production.name} is swapped: {row.name} serves the production "
                    "address",
                    hint=f"swap back first (sitecloud site swap {production.name} {slot})",
                )
            s.delete(row)
            bump_generation(s)

    def prepare_swap(self, who: Principal, name: str, slot: Any) -> SwapPlan:
        """Give the site that will answer production the production address's sticky settings (so its
        app starts with them before it is warmed); the plan says what to do at the swap itself."""
        slot = validate_slot_name(slot)
        with self._write_lock, self._db.session() as s:
            production = self._production(s, who, name)
            row = self._slot(s, production, slot)
            if production.state != "running" or row.state != "running":
                raise InUse(f"{production.name} and {row.name} must both be running to swap them")
            a = s.get(Site, production.routed_to_id or production.id) or production
            b = s.get(Site, row.routed_to_id or row.id) or row
            keys = set(a.sticky_settings or []) | set(b.sticky_settings or [])
            a_settings, b_settings = dict(a.app_settings or {}), dict(b.app_settings or {})
            kept = {k: b_settings.get(k) for k in keys}
            for key in keys:
                if key in a_settings:
                    b_settings[key] = a_settings[key]
                else:
                    b_settings.pop(key, None)
            if b_settings != (b.app_settings or {}):
                b.app_settings = b_settings
                bump_generation(s)
            b.sticky_settings = sorted(keys)
            return SwapPlan(production.name, slot, row.name, a.id, b.id, kept)

    def commit_swap(self, plan: SwapPlan) -> Json:
        """One generation: the production address routes to ``b``, the slot's to ``a``; ``a`` takes the
        slot address's sticky settings."""
        with self._write_lock, self._db.session() as s:
            production = s.execute(select(Site).where(Site.name == plan.production)).scalar_one()
            row = s.execute(select(Site).where(Site.name == plan.slot_site)).scalar_one()
            a, b = s.get(Site, plan.a), s.get(Site, plan.b)
            if a is None or b is None or (production.routed_to_id or production.id) != plan.a:
                raise InUse(f"{plan.production} changed during the swap", hint="try the swap again")
            production.routed_to_id = None if plan.b == production.id else plan.b
            row.routed_to_id = None if plan.a == row.id else plan.a
            a.app_settings = self._with(dict(a.app_settings or {}), plan.kept)
            a.sticky_settings = sorted(plan.kept)
            bump_generation(s)
            return {
                "site": production.name,
                "slot": plan.slot,
                "production_served_by": b.name,
                "slot_served_by": a.name,
            }

    def abort_swap(self, plan: SwapPlan) -> None:
        """Give the slot's site its own sticky settings back: the swap did not happen."""
        with self._write_lock, self._db.session() as s:
            b = s.get(Site, plan.b)
            if b is not None:
                b.app_settings = self._with(dict(b.app_settings or {}), plan.kept)
                bump_generation(s)

    @staticmethod
    def _with(settings: dict[str, Any], values: dict[str, str | None]) -> dict[str, Any]:
        for key, value in values.items():
            if value is None:
                settings.pop(key, None)
            else:
                settings[key] = value
        return settings

    def set_sticky(self, who: Principal, name: str, keys: Any) -> Json:
        """Which app settings of a site stay with its address when slots are swapped."""
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(keys) > 100:
            raise InvalidInput("'sticky' must be a list of at most 100 app setting names")
        for key in keys:
            appsettings.setting_name(key)
        with self._write_lock, self._db.session() as s:
            site = self._visible_site(s, who, name)
            site.sticky_settings = sorted(set(keys))
            return self._settings_json(site)

    def _settings_json(self, site: Site) -> Json:
        return {
            "site": site.name,
            "settings": dict(sorted((site.app_settings or {}).items())),
            "sticky": sorted(site.sticky_settings or []),
        }

    def frontend_addresses(self) -> list[tuple[str, int]]:
        """(host, HTTPS port) of every running front end, for warming a site through them."""
        with self._db.session() as s:
            rows = s.execute(
                select(Role.ports, Host.name, Host.address)
                .join(Host)
                .where(Role.kind == "frontend", Role.desired_state == "running")
            )
            return [
                (address or host, int(ports["https"]))
                for ports, host, address in rows
                if isinstance(ports, dict) and ports.get("https")
            ]

    # -- app settings

    def get_settings(self, who: Principal, name: str) -> Json:
        with self._db.session() as s:
            site = self._visible_site(s, who, name)
            return self._settings_json(site)

    def update_settings(self, who: Principal, name: str, changes: Json) -> Json:
        """Merge ``changes`` into the site's app settings; a null value removes the key.

        Every change and the merged whole are checked before anything is stored: all or nothing.
        """
        for key, value in changes.items():
            if value is not None and not isinstance(value, str):
                raise InvalidInput(
                    f"app setting {appsettings.text('name', key, max_chars=200)!r} must be a string, "
                    "or null to remove it"
                )
        with self._write_lock, self._db.session() as s:
            site = self._visible_site(s, who, name)
            settings = dict(site.app_settings or {})
            for key, value in changes.items():
                if value is None:
                    if key not in settings and key not in appsettings.SITE_KEYS:
                        appsettings.setting_name(key)  # a stored setting can always be removed
                    settings.pop(key, None)
                else:
                    check_app_setting(key, value, always_on_allowed=site.subscription.plan.always_on)
                    settings[key] = value
            appsettings.check_settings(settings)
            site.app_settings = settings
            bump_generation(s)
            return self._settings_json(site)

    # -- custom hostnames

    def _domain_settings(self, s: Session) -> tuple[list[tuple[str, int]], list[str]]:
        """The admin's DNS resolvers and wildcard-IP DNS services (cloud settings), or their defaults."""
        rows = {
            r.key: r.value.get("value")
            for r in s.scalars(select(Setting).where(Setting.key.in_(("dns_resolvers", "ip_dns_services"))))
        }
        services = rows.get("ip_dns_services")
        return (
            parse_resolvers(rows.get("dns_resolvers") or []),
            list(services) if isinstance(services, list) else list(DEFAULT_IP_DNS_SERVICES),
        )

    def _platform_names(self) -> list[str]:
        """Host names of the platform's own endpoints, which no tenant may claim."""
        c = self._config
        urls = (c.deploy_url, c.publisher_url, c.controller_url)
        configured = [c.host, c.ftp_host, *(urlsplit(u).hostname or "" for u in urls if u)]
        return [*configured, *self.publishing.host_names]

    def _check_hostname(self, s: Session, hostname: object) -> str:
        _, services = self._domain_settings(s)
        return validate_custom_hostname(
            hostname,
            platform_domain=self._config.domain,
            reserved=self._platform_names(),
            ip_dns_services=services,
        )

    def _site_host(self, site: Site) -> str:
        return f"{site.name}.{self._config.domain}"

    def _hostname_json(self, row: CustomHostname) -> Json:
        answer: Json = {
            "hostname": row.hostname,
            "site": row.site.name,
            "state": row.state,
            "certificate": describe(row.cert_pem) if row.cert_pem else None,
            "verified_at": iso(row.verified_at) if row.verified_at else None,
            "checked_at": iso(row.checked_at) if row.checked_at else None,
            "problem": row.check_result if row.state == HostnameState.PENDING else None,
            "records": [],
            "certificate_state": self._cert_state(row),
        }
        if row.state == HostnameState.PENDING:
            answer["records"] = [
                r.to_json()
                for r in records_to_create(
                    row.hostname, self._site_host(row.site), row.site.subscription.verification_id
                )
            ]
        return answer

    @staticmethod
    def _cert_state(row: CustomHostname) -> Json:
        """Where the name's certificate stands: state, until, reason and retry_at (after a failure), source."""
        until = iso(row.cert_not_after) if row.cert_not_after else None
        out: Json = {"state": CertState.NONE, "source": row.cert_source, "until": until}
        out.update(reason=None, retry_at=None)
        if row.state != HostnameState.VERIFIED:
            out["state"] = CertState.PENDING_VERIFICATION
        elif row.cert_source == "upload":
            out["state"] = CertState.VALID
        elif row.acme_state == CertState.FAILED:
            out.update(state=CertState.FAILED, reason=row.acme_reason)
            out["retry_at"] = iso(row.acme_due_at) if row.acme_due_at else None
        elif row.cert_pem and row.acme_state in (CertState.ISSUING, CertState.VALID):
            # A renewal in flight still serves the certificate it replaces.
            out["state"] = CertState.VALID
        else:
            # No certificate yet: the controller is ordering one, unless ACME is off.
            session = object_session(row)
            values = {}
            if session is not None:
                values = {
                    r.key: r.value.get("value")
                    for r in session.scalars(select(Setting).where(Setting.key == "acme_directory_url"))
                }
            if AcmeSettings.from_settings(values).enabled:
                out["state"] = CertState.ISSUING  # the controller orders one at once
        return out

    def hostname_availability(self, who: Principal, hostname: str) -> Json:
        with self._db.session() as s:
            # A name that is not a host name at all is bad input; one the rules refuse is just not free.
            host = canonical_hostname(hostname)
            try:
                self._check_hostname(s, host)
            except InvalidInput as err:
                return {"hostname": host, "available": False, "reason": err.message}
            row = s.execute(
                select(CustomHostname).where(CustomHostname.hostname == host)
            ).scalar_one_or_none()
            if row is None:
                return {"hostname": host, "available": True, "reason": ""}
            if row.state == HostnameState.VERIFIED:
                reason = "a site already uses this name; it moves only to a site whose owner proves it in DNS"
            else:
                reason = "a site has already claimed this name but not proven it; proving ownership in DNS takes it"
            return {"hostname": host, "available": False, "reason": reason}

    def list_hostnames(
        self, who: Principal, name: str, page: Page = _ALL, *, state: str | None = None
    ) -> Json:
        with self._db.session() as s:
            site = self._visible_site(s, who, name)
            rows = sorted(
                (h for h in site.hostnames if state is None or h.state == state), key=lambda h: h.hostname
            )
            rows, cursor = paged(rows, lambda h: h.hostname, page, str)
            return {
                "site": site.name,
                "verification_id": site.subscription.verification_id,
                "hostnames": [self._hostname_json(h) for h in rows],
                "next_cursor": cursor,
            }

    def add_hostname(self, who: Principal, name: str, body: Json) -> Json:
        """Claim a host name for a site, with its certificate (PEM or base64 PFX); it is pending until proven.

        A name another site claims is taken only when DNS proves this tenant owns it (then the other
        claim is removed), whether that claim is pending or verified.
        """
        _only(body, {"hostname", "certificate", "key", "pfx", "password"}, "custom hostname")
        with self._db.session() as s:
            host = self._check_hostname(s, body.get("hostname"))
            site = self._visible_site(s, who, name)
            resolvers, _ = self._domain_settings(s)
            site_host, verification_id = self._site_host(site), site.subscription.verification_id
            other = s.execute(
                select(CustomHostname).where(CustomHostname.hostname == host)
            ).scalar_one_or_none()
            if other is not None and other.site_id == site.id:
                raise AlreadyExists(f"{site.name} already has {host}", hint="see the site's custom hostnames")
            other_id = other.id if other else None
        cert = self._hostname_certificate(host, body)
        proven = False
        if other_id is not None:
            problem = check_ownership(
                host, site_host=site_host, verification_id=verification_id, resolvers=resolvers
            )
            if problem is not None:
                raise AlreadyExists(
                    f"{host} is claimed by another site; DNS does not prove you own it ({problem})",
                    hint=f"create a TXT record asuid.{host} with {verification_id} (or a CNAME {host} -> "
                    f"{site_host}), then add it again",
                )
            proven = True
        now = dt.datetime.now(dt.UTC)
        with self._write_lock, self._db.session() as s:
            site = self._visible_site(s, who, name)
            if other_id is not None and (old := s.get(CustomHostname, other_id)) is not None:
                # The new owner proved the name: the old claim goes, in the same transaction.
                s.delete(old)
                s.flush()
            sub = site.subscription
            used = (
                s.scalar(
                    select(func.count(CustomHostname.id)).join(Site).where(Site.subscription_id == sub.id)
                )
                or 0
            )
            if used >= sub.plan.max_custom_hostnames:
                allowed = sub.plan.max_custom_hostnames
                raise LimitReached(
                    f"subscription {sub.id} (plan {sub.plan.name!r}) allows "
                    f"{counted(allowed, 'custom hostname')} and has {used}",
                    hint=(
                        f"an admin allows them with `sitecloud plan update {sub.plan.name} "
                        "--max-custom-hostnames N`, or moves the subscription to a plan that does"
                        if allowed == 0
                        else "remove one (`sitecloud site hostname remove SITE HOST`), or ask an admin "
                        f"for more (`sitecloud plan update {sub.plan.name} --max-custom-hostnames N`)"
                    ),
                )
            row = CustomHostname(
                site=site,
                hostname=host,
                cert_pem=cert.cert_pem if cert else None,
                key_pem=cert.key_pem if cert else None,
                cert_not_after=cert.not_after if cert else None,
                cert_source="upload" if cert else None,
                state=HostnameState.VERIFIED if proven else HostnameState.PENDING,
                verified_at=now if proven else None,
                checked_at=now if proven else None,
            )
            s.add(row)
            self._flush(s, f"{host} was claimed by another site at the same time")
            bump_generation(s)
            return self._hostname_json(row)

    @staticmethod
    def _hostname_certificate(host: str, body: Json) -> Any:
        for field in ("certificate", "key", "pfx", "password"):
            if body.get(field) is not None and not isinstance(body[field], str):
                raise InvalidInput(f"{field!r} must be a string")
        if body.get("pfx"):
            try:
                pfx = base64.b64decode(body["pfx"], validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInput("'pfx' must be the PFX file in base64") from None
            return load_certificate(host, pfx=pfx, password=body.get("password"))
        if body.get("certificate"):
            key_text = body.get("key")
            return load_certificate(
                host,
                cert_pem=body["certificate"].encode(),
                key_pem=key_text.encode() if key_text else None,
                password=body.get("password"),
            )
        if body.get("key"):
            raise InvalidInput("a key was given without its certificate")
        return None

    def verify_hostname(self, who: Principal, name: str, hostname: str) -> Json:
        """Ask DNS now whether the site's pending claim on ``hostname`` is proven; verified ones stay so."""
        host = _claimed_name(hostname)
        with self._db.session() as s:
            site = self._visible_site(s, who, name)
            row = next((h for h in site.hostnames if h.hostname == host), None)
            if row is None:
                raise NotFound(f"site {name!r} has no custom hostname {host!r}")
            if row.state == HostnameState.VERIFIED:
                return self._hostname_json(row)
            resolvers, _ = self._domain_settings(s)
            claim = (row.id, host, self._site_host(site), site.subscription.verification_id)
        answer = self._check_claim(claim, resolvers)
        if answer is None:
            raise NotFound(f"site {name!r} has no custom hostname {host!r}")
        return answer

    def _check_claim(self, claim: tuple[int, str, str, str], resolvers: list[tuple[str, int]]) -> Json | None:
        row_id, host, site_host, verification_id = claim
        problem = check_ownership(
            host, site_host=site_host, verification_id=verification_id, resolvers=resolvers
        )
        now = dt.datetime.now(dt.UTC)
        with self._write_lock, self._db.session() as s:
            row = s.get(CustomHostname, row_id)
            if row is None:
                return None
            row.checked_at, row.check_result = now, problem
            if problem is None and row.state == HostnameState.PENDING:
                row.state, row.verified_at = HostnameState.VERIFIED, now
                bump_generation(s)
            return self._hostname_json(row)

    def check_pending_hostnames(
        self, checked_before: dt.datetime, stop: threading.Event | None = None, limit: int = 100
    ) -> list[str]:
        """Re-check pending claims not checked since ``checked_before``; the names that became verified.

        ``stop`` ends the round between two names, so a shutdown waits for one DNS check at most.
        """
        with self._db.session() as s:
            resolvers, _ = self._domain_settings(s)
            rows = s.scalars(
                select(CustomHostname)
                .where(CustomHostname.state == HostnameState.PENDING)
                .where((CustomHostname.checked_at.is_(None)) | (CustomHostname.checked_at < checked_before))
                .order_by(CustomHostname.checked_at.is_not(None), CustomHostname.checked_at)
                .limit(limit)
                .options(joinedload(CustomHostname.site).joinedload(Site.subscription))
            )
            claims = [
                (r.id, r.hostname, self._site_host(r.site), r.site.subscription.verification_id) for r in rows
            ]
        verified = []
        for claim in claims:
            if stop is not None and stop.is_set():
                break
            answer = self._check_claim(claim, resolvers)
            if answer is not None and answer["state"] == HostnameState.VERIFIED:
                verified.append(claim[1])
        return verified

    def renew_hostname(self, who: Principal, name: str, hostname: str) -> Json:
        """Have the controller order the name's certificate now: an early renewal, or a retry at once
        after a failure (its back-off is kept for failures that follow)."""
        host = _claimed_name(hostname)
        with self._write_lock, self._db.session() as s:
            site = self._visible_site(s, who, name)
            row = next((h for h in site.hostnames if h.hostname == host), None)
            if row is None:
                raise NotFound(f"site {name!r} has no custom hostname {host!r}")
            if row.state != HostnameState.VERIFIED:
                raise InvalidInput(
                    f"{host} is not verified yet: no certificate is issued for it",
                    hint=f"create the DNS record, then `sitecloud site hostname verify {name} {host}`",
                )
            if row.cert_source == "upload":
                raise InvalidInput(
                    f"{host} serves the certificate you uploaded; ACME does not replace it",
                    hint="upload a new one, or remove the name and add it again without a certificate",
                )
            values = {
                r.key: r.value.get("value")
                for r in s.scalars(select(Setting).where(Setting.key == "acme_directory_url"))
            }
            if not AcmeSettings.from_settings(values).enabled:
                raise InvalidInput(
                    "ACME certificates are off in this cloud", hint="an admin sets acme_directory_url"
                )
            now = dt.datetime.now(dt.UTC)
            last = row.acme_attempted_at
            if last is not None and not who.is_admin:
                last = last if last.tzinfo else last.replace(tzinfo=dt.UTC)
                if now - last < BACKOFF_FIRST:
                    wait = int((last + BACKOFF_FIRST - now).total_seconds()) + 1
                    # Each order counts against the CA's rate limits for the whole cloud.
                    raise RateLimited(
                        f"a certificate for {host} was ordered less than "
                        f"{int(BACKOFF_FIRST.total_seconds() // 60)} minutes ago",
                        hint=f"try again in {wait} seconds",
                    )
            row.acme_due_at = None
            row.acme_state = CertState.ISSUING
            bump_generation(s)
            return self._hostname_json(row)

    def delete_hostname(self, who: Principal, name: str, hostname: str) -> None:
        host = _claimed_name(hostname)
        with self._write_lock, self._db.session() as s:
            site = self._visible_site(s, who, name)
            row = next((h for h in site.hostnames if h.hostname == host), None)
            if row is None:
                raise NotFound(f"site {name!r} has no custom hostname {host!r}")
            site.hostnames.remove(row)
            bump_generation(s)

    def site_worker_urls(self, who: Principal, name: str) -> list[tuple[str, str]]:
        """(host, control URL) of every worker holding a site the caller may see."""
        with self._db.session() as s:
            site = self._visible_site(s, who, name)
            rows = s.execute(
                select(Host.name, Host.address, Role.control_port)
                .select_from(SiteAssignment)
                .join(Role, SiteAssignment.role_id == Role.id)
                .join(Host, Role.host_id == Host.id)
                .where(SiteAssignment.site_id == site.id)
                .order_by(Host.name)
            )
            return [(host, f"https://{address or host}:{port}") for host, address, port in rows]

    def fileserver_urls(self) -> list[str]:
        with self._db.session() as s:
            rows = s.execute(
                select(Role.control_port, Host.name, Host.address).join(Host).where(Role.kind == "fileserver")
            )
            return [f"https://{address or name}:{port}" for port, name, address in rows]

    def backup_schedule(self) -> tuple[list[Due], set[str]]:
        """The sites whose plan has scheduled backups on, and the names of every site there is."""
        with self._db.session() as s:
            names = set(s.scalars(select(Site.name)))
            rows = s.execute(
                select(Site.name, Plan.backup_every_seconds, Plan.backup_keep)
                .join(Subscription, Site.subscription_id == Subscription.id)
                .join(Plan, Subscription.plan_id == Plan.id)
                .where(Plan.backup_every_seconds > 0)
                .order_by(Site.name)
            )
            return [Due(name, every, keep) for name, every, keep in rows], names

    def generation(self) -> int:
        with self._db.session() as s:
            return current_generation(s)

    def applied(self, generation: int) -> None:
        """Every serving role runs ``generation``: a site that went live by then is live."""
        with self._write_lock, self._db.session() as s:
            s.execute(update(Site).where(Site.live_from <= generation).values(live_from=None))

    @staticmethod
    def _flush(s: Session, conflict: str) -> None:
        # A unique constraint still catches a writer in another process that won the race.
        try:
            s.flush()
        except IntegrityError as exc:
            raise AlreadyExists(conflict) from exc


@dataclass(frozen=True)
class SwapPlan:
    """A swap between its two steps: ``a`` answers the production address now, ``b`` the slot's;
    ``kept`` are ``b``'s sticky settings from before (None: it had none), for ``a`` at the swap."""

    production: str
    slot: str
    slot_site: str
    a: int
    b: int
    kept: dict[str, str | None]


def _delete_sites(s: Session, sites: Iterable[Site]) -> None:
    """Slots before their production sites: the database would delete them along (ON DELETE CASCADE)
    under the session's feet otherwise."""
    ordered = sorted(sites, key=lambda site: site.slot_of_id is None)
    for site in ordered:
        s.delete(site)
        if site.slot_of_id is not None:
            s.flush()
    s.flush()


def _not_live_yet(site: Site) -> bool:
    """Whether a running site waits for the controller: some role that serves (as the controller
    last recorded them) does not run the generation that made it serve yet. With the controller
    down, that record stays as it was: a site created or started since is not live."""
    if site.live_from is None:
        return False
    session = object_session(site)
    assert session is not None
    lowest = session.scalar(
        select(func.min(Role.config_version)).where(
            Role.desired_state == "running", Role.state.in_((RoleState.READY, RoleState.DEGRADED))
        )
    )
    # With no role serving, there is nothing to wait for (nor anything that serves: another matter).
    return lowest is not None and lowest < site.live_from


def _placement_problem(site: Site, *, by_host: bool) -> Json | None:
    """Why a running site runs on no worker, or not on the workers its plan promises (a reserved
    plan's sites fall back to the shared workers while none of its size is reserved for them)."""
    plan, sub = site.subscription.plan, site.subscription_id
    workers = [a.role for a in site.assignments]
    if plan.compute_mode == "reserved":
        size = plan.worker_size or DEFAULT_WORKER_SIZE
        if any(r.reserved_for_id == sub and (r.size or DEFAULT_WORKER_SIZE) == size for r in workers):
            return None
        if workers:
            fix = f"add one: sitecloud role add worker HOST --size {size} --reserved-for {sub}"
            until = fix if by_host else "until the cloud's admin reserves one"
            return {
                "kind": "placement",
                "reason": f"its plan runs it on {size} workers reserved for its subscription; none is, so it "
                f"runs on shared workers for now ({until})",
            }
    if workers:
        return None
    return {
        "reason": "no worker runs it"
        + (" (add one: sitecloud role add worker HOST)" if by_host else " (the cloud's admin must add one)")
    }


def _site_problems(site: Site, *, by_host: bool) -> list[Json]:
    """Why the site's workers said, in their last health answers, they cannot serve it; which worker
    only ``by_host`` (an admin's view): the platform's host names are no tenant's business."""
    problems: list[Json] = []
    for assignment in sorted(site.assignments, key=lambda a: a.role_id):
        failed = (assignment.role.load or {}).get("failed_sites")
        if isinstance(failed, dict) and isinstance(failed.get(site.name), str):
            problem = {"worker": assignment.role.host.name} if by_host else {}
            problem["reason"] = failed[site.name]
            if problem not in problems:  # without hosts, the same reason from two workers is one
                problems.append(problem)
    return problems
