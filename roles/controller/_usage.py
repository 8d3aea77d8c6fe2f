"""Usage reports: requests and bytes per site from the front ends, CPU and memory-seconds from the
workers, summed per UTC day.

A front end (or worker) sends what it counted since its last taken report (a
:class:`shared.contracts.usage.UsageReport`) and sends the same report again, same id, until it gets
a 2xx; repeats are dropped here by id, so a report that timed out after it was stored is never
counted twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Callable

from aiohttp import web
from sqlalchemy import delete

from shared.contracts.usage import UsageReport
from shared.db import Database, again_on_conflict, usage_day
from shared.db import UsageReport as TakenReport
from shared.internal import require_role

__all__ = ["UsageBook", "usage_routes"]

# Report ids are kept this long: far longer than a front end keeps resending one.
_KEEP_IDS = dt.timedelta(days=2)
_ID_CHARS = 64


class UsageBook:
    """Adds reports to the runtime DB, one at a time (two adding to one site's day would collide)."""

    def __init__(self, db: Database, on_recorded: Callable[[set[str]], None] = lambda _: None) -> None:
        self._db = db
        self._lock = threading.Lock()
        # Told which sites a new report counted for (the controller checks their quotas).
        self._on_recorded = on_recorded

    def record(self, data: object) -> bool:
        """Add one report's counts to each site's day; False when that report was taken before."""
        report = UsageReport.parse(data, what="usage report")
        report_id = report.id[:_ID_CHARS]
        day = dt.datetime.fromtimestamp(report.to, dt.UTC).date()
        counts = report.sites
        now = dt.datetime.now(dt.UTC)

        def add() -> bool:
            with self._db.session() as s:
                if s.get(TakenReport, report_id) is not None:
                    return False
                s.add(TakenReport(id=report_id, received_at=now))
                for site, figures in counts.items():
                    row = usage_day(s, site, day)
                    row.requests += figures.requests
                    row.bytes_in += figures.bytes_in
                    row.bytes_out += figures.bytes_out
                    row.cpu_seconds += figures.cpu_seconds
                    row.memory_mb_seconds += figures.memory_mb_seconds
                s.execute(delete(TakenReport).where(TakenReport.received_at < now - _KEEP_IDS))
            return True

        with self._lock:
            if not again_on_conflict(add):
                return False
        if counts:
            self._on_recorded(set(counts))
        return True


def usage_routes(book: UsageBook) -> list[web.RouteDef]:
    async def take(request: web.Request) -> web.Response:
        require_role(request, "frontend", "worker")
        counted = await asyncio.to_thread(book.record, await request.json())
        return web.json_response({"counted": counted})

    return [web.post("/v1/usage", take)]
