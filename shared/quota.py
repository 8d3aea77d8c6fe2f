"""Daily plan quotas (bandwidth, CPU minutes): whether a site is stopped for the rest of its UTC day.

As in Azure's shared plans: a site that passes its plan's bandwidth or CPU for the day is stopped
until the next UTC day, a plan change that raises the limit, or an admin lifting the stop for the day.
The controller puts the stops into the front ends' snapshots (visitors get a 403 page); management
shows them to the tenant. Both decide through :func:`quota_stop`, a pure function of the figures, and
read those figures through :func:`quota_stops`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import Plan, Site, SiteUsage, Subscription

__all__ = ["QuotaStop", "next_utc_day", "quota_stop", "quota_stops"]


@dataclass(frozen=True, slots=True)
class QuotaStop:
    """Why a site is stopped (``what``: bandwidth or cpu), how far over, and when it serves again."""

    what: str
    used: float
    limit: float
    unit: str
    until: dt.datetime

    @property
    def message(self) -> str:
        label = "bandwidth" if self.what == "bandwidth" else "CPU time"
        return (
            f"the site used {self.used:g} {self.unit} of {label} today; its plan allows {self.limit:g} "
            f"{self.unit} a day. It serves again at {self.until:%Y-%m-%d %H:%M} UTC"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "used": self.used,
            "limit": self.limit,
            "unit": self.unit,
            "until": self.until.isoformat().replace("+00:00", "Z"),
            "message": self.message,
        }


def next_utc_day(now: dt.datetime) -> dt.datetime:
    """Midnight UTC after ``now``: when a day's quota stop ends."""
    today = now.astimezone(dt.UTC).date()
    return dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


def quota_stop(
    *,
    bandwidth_mb_per_day: int | None,
    cpu_minutes_per_day: int | None,
    bytes_today: int,
    cpu_seconds_today: float,
    lifted_day: dt.date | None,
    now: dt.datetime,
) -> QuotaStop | None:
    """The stop a site is under now, if any. A limit of None is no limit; reaching it stops the site
    (what the plan allows is used up)."""
    if lifted_day is not None and lifted_day == now.astimezone(dt.UTC).date():
        return None
    until = next_utc_day(now)
    if bandwidth_mb_per_day is not None and bytes_today >= bandwidth_mb_per_day * 1024 * 1024:
        used = round(bytes_today / (1024 * 1024), 2)
        return QuotaStop("bandwidth", used, bandwidth_mb_per_day, "MB", until)
    if cpu_minutes_per_day is not None and cpu_seconds_today >= cpu_minutes_per_day * 60:
        return QuotaStop("cpu", round(cpu_seconds_today / 60, 2), cpu_minutes_per_day, "minutes", until)
    return None


def quota_stops(
    session: Session, now: dt.datetime, sites: Collection[str] | None = None
) -> dict[str, QuotaStop]:
    """Site name → its stop, for sites (all, or those named) whose plan has a daily limit."""
    today = now.astimezone(dt.UTC).date()
    query = (
        select(
            Site.name,
            Site.quota_lifted_day,
            Plan.bandwidth_mb_per_day,
            Plan.cpu_minutes_per_day,
            SiteUsage.bytes_in,
            SiteUsage.bytes_out,
            SiteUsage.cpu_seconds,
        )
        .join(Subscription, Site.subscription_id == Subscription.id)
        .join(Plan, Subscription.plan_id == Plan.id)
        .join(SiteUsage, (SiteUsage.site == Site.name) & (SiteUsage.day == today))
        .where((Plan.bandwidth_mb_per_day.is_not(None)) | (Plan.cpu_minutes_per_day.is_not(None)))
    )
    if sites is not None:
        query = query.where(Site.name.in_(list(sites)))
    out: dict[str, QuotaStop] = {}
    for name, lifted, bandwidth, cpu, bytes_in, bytes_out, cpu_seconds in session.execute(query):
        stop = quota_stop(
            bandwidth_mb_per_day=bandwidth,
            cpu_minutes_per_day=cpu,
            bytes_today=(bytes_in or 0) + (bytes_out or 0),
            cpu_seconds_today=cpu_seconds or 0.0,
            lifted_day=lifted,
            now=now,
        )
        if stop is not None:
            out[name] = stop
    return out
