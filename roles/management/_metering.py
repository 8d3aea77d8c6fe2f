"""Usage per site and UTC day, for tenants (their sites), admins (all, and an export for billing),
and quota stops: what a site used, what its plan allows, and an admin lifting a stop for the day.

The figures are those the controller summed from the front ends' and workers' reports
(``site_usage``); storage is the size the file server gave when someone last looked that day.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from roles.management._store import Principal, require_admin
from shared.db import (
    Database,
    Plan,
    Site,
    SiteUsage,
    Subscription,
    Tenant,
    again_on_conflict,
    bump_generation,
    usage_day,
)
from shared.errors import InvalidInput, NotFound
from shared.quota import next_utc_day, quota_stops

__all__ = ["FIELDS", "Metering", "parse_range", "usage_csv"]

Json = dict[str, Any]

# The figures of a site's day, in export order.
FIELDS = ("requests", "bytes_in", "bytes_out", "cpu_seconds", "memory_mb_seconds", "storage_bytes")
_MAX_DAYS = 366
_DEFAULT_DAYS = 30


def parse_range(start: str | None, end: str | None, today: dt.date) -> tuple[dt.date, dt.date]:
    """``from``/``to`` as YYYY-MM-DD (both included); by default the last 30 days to today."""

    def day(value: str | None, name: str, default: dt.date) -> dt.date:
        if not value:
            return default
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            raise InvalidInput(f"'{name}' must be a date as YYYY-MM-DD, not {value[:40]!r}") from None

    last = day(end, "to", today)
    first = day(start, "from", last - dt.timedelta(days=_DEFAULT_DAYS - 1))
    if first > last:
        raise InvalidInput(f"'from' ({first}) is after 'to' ({last})")
    if (last - first).days >= _MAX_DAYS:
        raise InvalidInput(f"a usage range is at most {_MAX_DAYS} days", hint="ask for it in parts")
    return first, last


def _row(u: SiteUsage | None) -> Json:
    if u is None:
        return dict.fromkeys(FIELDS, 0) | {"storage_bytes": None}
    return {
        "requests": u.requests,
        "bytes_in": u.bytes_in,
        "bytes_out": u.bytes_out,
        "cpu_seconds": round(u.cpu_seconds, 3),
        "memory_mb_seconds": round(u.memory_mb_seconds, 1),
        "storage_bytes": u.storage_bytes,
    }


def _totals(days: list[Json]) -> Json:
    totals: Json = {k: sum(d[k] for d in days) for k in FIELDS if k != "storage_bytes"}
    totals["cpu_seconds"] = round(totals["cpu_seconds"], 3)
    totals["memory_mb_seconds"] = round(totals["memory_mb_seconds"], 1)
    storage = [d["storage_bytes"] for d in days if d["storage_bytes"] is not None]
    totals["storage_bytes_max"] = max(storage) if storage else None
    return totals


def _iso(when: dt.datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


class Metering:
    def __init__(
        self,
        db: Database,
        lock: threading.Lock,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._db = db
        self._lock = lock
        self.clock = clock

    def today(self) -> dt.date:
        return self.clock().astimezone(dt.UTC).date()

    def _site(self, s: Session, who: Principal, name: str) -> Site:
        site = s.execute(select(Site).where(Site.name == name)).scalar_one_or_none()
        if site is None or (not who.is_admin and site.subscription.tenant_id != who.tenant_id):
            raise NotFound(f"no site {name!r}", hint="see `sitecloud site list`")
        return site

    def quota(self, s: Session, site: Site) -> Json:
        """The site's daily limits, today's use against them, and its stop (None: serving)."""
        plan = site.subscription.plan
        now = self.clock()
        today = s.get(SiteUsage, (site.name, now.astimezone(dt.UTC).date()))
        stop = quota_stops(s, now, [site.name]).get(site.name)
        lifted = site.quota_lifted_day == now.astimezone(dt.UTC).date()
        return {
            "bandwidth_mb_per_day": plan.bandwidth_mb_per_day,
            "cpu_minutes_per_day": plan.cpu_minutes_per_day,
            "bandwidth_mb_today": round(((today.bytes_in + today.bytes_out) if today else 0) / 2**20, 2),
            "cpu_minutes_today": round((today.cpu_seconds if today else 0.0) / 60, 2),
            "resets_at": _iso(next_utc_day(now)),
            "lifted_today": lifted,
            "stopped": stop.to_json() if stop is not None else None,
        }

    def site_quota(self, who: Principal, name: str) -> Json:
        with self._db.session() as s:
            return self.quota(s, self._site(s, who, name))

    def site_usage(self, who: Principal, name: str, start: dt.date, end: dt.date) -> Json:
        with self._db.session() as s:
            site = self._site(s, who, name)
            rows = {
                u.day: u
                for u in s.scalars(
                    select(SiteUsage).where(
                        SiteUsage.site == name, SiteUsage.day >= start, SiteUsage.day <= end
                    )
                )
            }
            days = []
            day = start
            while day <= end:
                days.append({"day": day.isoformat(), **_row(rows.get(day))})
                day += dt.timedelta(days=1)
            return {
                "site": name,
                "from": start.isoformat(),
                "to": end.isoformat(),
                "days": days,
                "totals": _totals(days),
                "quota": self.quota(s, site),
            }

    def export(self, who: Principal, start: dt.date, end: dt.date) -> Json:
        """Every site's days with any usage in the range, with tenant, subscription and plan."""
        require_admin(who)
        with self._db.session() as s:
            query = (
                select(SiteUsage, Site.name, Tenant.name, Subscription.id, Plan.name)
                .outerjoin(Site, Site.name == SiteUsage.site)
                .outerjoin(Subscription, Site.subscription_id == Subscription.id)
                .outerjoin(Tenant, Subscription.tenant_id == Tenant.id)
                .outerjoin(Plan, Subscription.plan_id == Plan.id)
                .where(SiteUsage.day >= start, SiteUsage.day <= end)
                .order_by(SiteUsage.day, SiteUsage.site)
            )
            rows = [
                {
                    "day": u.day.isoformat(),
                    "site": u.site,
                    # A deleted site's days stay for billing; it has no tenant any more.
                    "tenant": tenant,
                    "subscription": sub_id,
                    "plan": plan,
                    **_row(u),
                }
                for u, _, tenant, sub_id, plan in s.execute(query)
            ]
        return {"from": start.isoformat(), "to": end.isoformat(), "rows": rows}

    def record_storage(self, sizes: dict[str, int | None]) -> None:
        """Today's storage of each site whose size is known (the day's last look wins)."""
        known = {name: size for name, size in sizes.items() if size is not None}
        if not known:
            return
        today = self.today()

        def note() -> None:
            with self._db.session() as s:
                for name, size in known.items():
                    usage_day(s, name, today).storage_bytes = size

        with self._lock:
            again_on_conflict(note)

    def lift_quota(self, who: Principal, name: str) -> Json:
        """An admin lets a stopped site serve again for the rest of the UTC day."""
        require_admin(who)
        with self._lock, self._db.session() as s:
            site = self._site(s, who, name)
            site.quota_lifted_day = self.today()
            bump_generation(s)
            s.flush()
            return {"site": name, "quota": self.quota(s, site)}


def usage_csv(export: Json) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    head = ("day", "site", "tenant", "subscription", "plan", *FIELDS)
    writer.writerow(head)
    for row in export["rows"]:
        writer.writerow(["" if row[k] is None else row[k] for k in head])
    return out.getvalue()
