"""Usage reports: requests and bytes per site from the front ends, CPU and memory-seconds from the
workers, summed per UTC day.

A front end (or worker) sends what it counted since its last taken report (see docs/architecture.md, "Usage
reports") and sends the same report again, same id, until it gets a 2xx; repeats are dropped here by
id, so a report that timed out after it was stored is never counted twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web
from sqlalchemy import delete

from shared.db import Database, SiteUsage, UsageReport
from shared.errors import InvalidInput
from shared.internal import require_role
from shared.names import validate_site_name

__all__ = ["UsageBook", "usage_routes"]

# Report ids are kept this long: far longer than a front end keeps resending one.
_KEEP_IDS = dt.timedelta(days=2)
_COUNTERS = ("requests", "bytes_in", "bytes_out")
# From the workers: seconds of CPU and MB held times seconds, as numbers that need not be whole.
_MEASURES = ("cpu_seconds", "memory_mb_seconds")


def _parse(report: Any) -> tuple[str, dt.date, dict[str, dict[str, float]]]:
    if not isinstance(report, dict) or not isinstance(report.get("id"), str) or not report["id"]:
        raise InvalidInput("a usage report needs an 'id'")
    report_id = report["id"][:64]
    to = report.get("to")
    if isinstance(to, bool) or not isinstance(to, int | float):
        raise InvalidInput("a usage report needs 'to' (seconds since the epoch)")
    sites = report.get("sites")
    if not isinstance(sites, dict):
        raise InvalidInput("a usage report needs 'sites'")
    counts: dict[str, dict[str, float]] = {}
    for name, figures in sites.items():
        validate_site_name(name)
        if not isinstance(figures, dict):
            raise InvalidInput(f"usage of {name} must be an object")
        row: dict[str, float] = {}
        for key in _COUNTERS:
            value = figures.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(f"usage {key} of {name} must be a whole number")
            row[key] = value
        for key in _MEASURES:
            value = figures.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e12:
                raise InvalidInput(f"usage {key} of {name} must be a number >= 0")
            row[key] = float(value)
        counts[name] = row
    return report_id, dt.datetime.fromtimestamp(to, dt.UTC).date(), counts


class UsageBook:
    """Adds reports to the runtime DB, one at a time (two adding to one site's day would collide)."""

    def __init__(self, db: Database, on_recorded: Callable[[set[str]], None] = lambda _: None) -> None:
        self._db = db
        self._lock = threading.Lock()
        # Told which sites a new report counted for (the controller checks their quotas).
        self._on_recorded = on_recorded

    def record(self, report: Any) -> bool:
        """Add one report's counts to each site's day; False when that report was taken before."""
        report_id, day, counts = _parse(report)
        now = dt.datetime.now(dt.UTC)
        with self._lock, self._db.session() as s:
            if s.get(UsageReport, report_id) is not None:
                return False
            s.add(UsageReport(id=report_id, received_at=now))
            for site, figures in counts.items():
                row = s.get(SiteUsage, (site, day))
                if row is None:
                    row = SiteUsage(
                        site=site,
                        day=day,
                        requests=0,
                        bytes_in=0,
                        bytes_out=0,
                        cpu_seconds=0.0,
                        memory_mb_seconds=0.0,
                    )
                    s.add(row)
                row.requests += int(figures["requests"])
                row.bytes_in += int(figures["bytes_in"])
                row.bytes_out += int(figures["bytes_out"])
                row.cpu_seconds += figures["cpu_seconds"]
                row.memory_mb_seconds += figures["memory_mb_seconds"]
            s.execute(delete(UsageReport).where(UsageReport.received_at < now - _KEEP_IDS))
        if counts:
            self._on_recorded(set(counts))
        return True


def usage_routes(book: UsageBook) -> list[web.RouteDef]:
    async def take(request: web.Request) -> web.Response:
        require_role(request, "frontend", "worker")
        counted = await asyncio.to_thread(book.record, await request.json())
        return web.json_response({"counted": counted})

    return [web.post("/v1/usage", take)]
