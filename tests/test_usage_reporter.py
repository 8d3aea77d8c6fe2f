"""The one usage reporter, in process: a worker's reports reach the controller's real usage route over
mTLS, a report not taken is sent again as it was, and nothing is counted twice or lost."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from roles.controller._usage import UsageBook, usage_routes
from roles.worker._usage import WorkerUsageReporter
from roles.worker.config import WorkerConfig
from shared.db import Database, SiteUsage
from shared.internal import error_middleware
from shared.logs import get_logger
from shared.net import free_port
from tests.support import CloudPKI


async def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class _Controller:
    """The controller's own usage route and book, on an mTLS port of their own."""

    def __init__(self, pki: CloudPKI, db: Database, port: int) -> None:
        cert, key = pki.identity("controller")
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.load_cert_chain(cert, key)
        self._ssl.load_verify_locations(pki.ca_file)
        self._ssl.verify_mode = ssl.CERT_REQUIRED
        self.book = UsageBook(db)
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(middlewares=[error_middleware])
        app.add_routes(usage_routes(self.book))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ssl).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database.sqlite(tmp_path / "runtime.db")
    database.migrate()
    yield database
    database.dispose()


def _day_totals(db: Database, site: str) -> tuple[float, float]:
    with db.session() as s:
        rows = s.query(SiteUsage).filter(SiteUsage.site == site).all()
        return sum(r.cpu_seconds for r in rows), sum(r.memory_mb_seconds for r in rows)


async def test_worker_usage_is_reported_once_each_even_after_the_controller_was_down(
    tmp_path: Path, db: Database
) -> None:
    pki = CloudPKI(tmp_path / "pki")
    port = free_port()
    config = pki.role_config(
        WorkerConfig,
        "worker",
        tmp_path / "worker",
        controller_url=f"https://localhost:{port}",
        usage_interval=0.05,
    )
    totals = {"blog": (1.5, 100.0)}
    reporter = WorkerUsageReporter(config, lambda: dict(totals), get_logger("worker", host="test"))
    controller = _Controller(pki, db, port)
    reporter.start()
    try:
        # Nothing listens yet: the report stays unsent, and is sent again as it was.
        await _until(lambda: reporter.unsent is not None, "a first report")
        first = reporter.unsent
        await asyncio.sleep(0.2)
        assert reporter.unsent is first and reporter.reports_sent == 0
        totals["blog"] = (2.0, 150.0)  # grows meanwhile: that goes in the next report

        await controller.start()
        await _until(lambda: _day_totals(db, "blog") == (2.0, 150.0), "both reports counted")
        # (The controller counts a report before it answers: the reporter's tally follows its answer.)
        await _until(lambda: reporter.reports_sent >= 2, "both reports answered")
        assert reporter.reports_sent == 2
        assert first is not None and first.sites["blog"].cpu_seconds == 1.5
        # A site whose totals fell came back anew: it counts from zero, not negative.
        totals["blog"] = (0.25, 10.0)
        await _until(lambda: _day_totals(db, "blog") == (2.25, 160.0), "a restarted site's report")
    finally:
        await reporter.stop()
        await controller.stop()
    assert reporter.unsent is None
