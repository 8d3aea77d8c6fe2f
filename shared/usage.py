"""Sending usage reports to the controller: one reporter for the front ends and the workers.

Every ``interval`` seconds a role's figures since its last taken report are posted to
``{controller_url}/v1/usage`` over mTLS as a :class:`~shared.contracts.usage.UsageReport`. A report
the controller has not taken is sent again as it is (same id) until it is, so a controller that is
down loses nothing and none is counted twice. What the figures are is the role's: a subclass says what
to report now (:meth:`UsageReporter.take`) and learns when a report was taken
(:meth:`UsageReporter.accepted`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid

from shared.config import RoleConfig
from shared.contracts.usage import UsageFigures, UsageReport
from shared.errors import SitecloudError
from shared.internal import InternalClient
from shared.logs import ContextLogger

__all__ = ["UsageReporter"]

# How long a stopping role waits for its last report to be taken.
_LAST_SEND = 3.0


class UsageReporter:
    def __init__(self, config: RoleConfig, log: ContextLogger, *, interval: float) -> None:
        self._config = config
        self._log = log
        self._interval = interval
        self._url = f"{config.controller_url.rstrip('/')}/v1/usage" if config.controller_url else ""
        self._client: InternalClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._since = time.time()
        self._failures = 0
        # A report the controller has not taken yet.
        self.unsent: UsageReport | None = None
        self.reports_sent = 0

    # --- what a role reports

    def take(self) -> dict[str, UsageFigures]:
        """The figures to report now, per site (only sites with any); called when no report is unsent."""
        raise NotImplementedError

    def accepted(self) -> None:
        """The controller took the report made from the last :meth:`take`."""

    # --- sending

    def start(self) -> None:
        if self._url and self._interval > 0:
            self._client = InternalClient(self._config, timeout=10)
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.send()

    def _report(self) -> UsageReport | None:
        now = time.time()
        sites = self.take()
        report = UsageReport(
            id=uuid.uuid4().hex,
            role=self._config.role,
            host=self._config.host,
            pid=os.getpid(),
            start=round(self._since, 3),
            to=round(now, 3),
            sites=sites,
        )
        self._since = now
        return report if sites else None

    async def send(self) -> None:
        if self._client is None:
            return
        if self.unsent is None:
            self.unsent = self._report()
            if self.unsent is None:
                return
        try:
            await self._client.post_json(self._url, self.unsent.to_json())
        except SitecloudError as err:
            self._failures += 1
            if self._failures == 1 or self._failures % 20 == 0:
                self._log.warning("usage report not taken (%s times so far): %s", self._failures, err)
            return
        if self._failures:
            self._log.info("usage reports get through again")
        self._failures = 0
        self.unsent = None
        self.reports_sent += 1
        self.accepted()

    async def stop(self) -> None:
        """Stop sending; one last report goes out, and what it could not deliver is said, not dropped."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is None:
            return
        try:
            await asyncio.wait_for(self.send(), _LAST_SEND)
        except TimeoutError:
            self._log.warning("the last usage report was not taken within %ss", _LAST_SEND)
        if self.unsent is not None:
            self._log.warning(
                "stopping with usage the controller never took: %s sites, report %s",
                len(self.unsent.sites),
                self.unsent.id,
            )
        await self._client.close()
        self._client = None
